"""The TrainingSetup object: validation that says what to change, and derived values."""

import dataclasses

import pytest

from moekit.training_setup import LoraSpec, SetupError, TrainingSetup


def test_defaults_are_the_articles_cluster():
    setup = TrainingSetup()
    assert setup.world_size == 8
    assert setup.gpu_memory_bytes == 40 * 2**30
    assert setup.global_batch == 8


def test_setup_is_immutable_and_replace_validates():
    setup = TrainingSetup()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setup.seq_len = 1  # type: ignore[misc]
    longer = setup.replace(seq_len=12288, grad_accum=25, lora_r=8)
    assert (longer.seq_len, longer.global_batch, longer.lora.r) == (12288, 200, 8)
    with pytest.raises(SetupError, match="offload"):
        setup.replace(zero_stage=0, offload="optimizer")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"zero_stage": 0, "offload": "optimizer"}, "needs ZeRO stage 1, 2 or 3"),
        ({"zero_stage": 2, "offload": "optimizer+params"}, "offloading parameters needs ZeRO-3"),
        ({"zero_stage": 4}, "zero_stage must be 0, 1, 2 or 3"),
        ({"precision": "fp8"}, "precision must be one of fp32, fp16, bf16"),
        ({"micro_batch": 0}, "micro_batch must be a positive integer"),
        ({"seq_len": -5}, "seq_len must be a positive integer"),
        ({"offload_device": "nvme", "offload": "optimizer"}, "needs nvme_path"),
        ({"method": "qlora", "precision": "fp32"}, "QLoRA computes in 16 bits"),
        ({"gpu_memory_gb": 0}, "gpu_memory_gb must be positive"),
        ({"router_aux_loss": "yes"}, "router_aux_loss must be True, False or None"),
        ({"expandable_segments": 1}, "expandable_segments must be True or False"),
        ({"load_path": "mmap"}, "load_path must be one of auto, from_pretrained"),
        ({"loss_impl": "liger"}, "loss_impl must be one of hf, chunked, fused"),
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, adamw_8bit, paged_adamw"),
        ({"load_path": "4bit"}, "use method='qlora' or another load_path"),
        ({"method": "qlora", "load_path": "from_pretrained"}, "QLoRA loads its base in 4 bits"),
        ({"load_path": "zero_init"}, "only ZeRO-3 does"),
    ],
)
def test_invalid_setups_say_what_to_change(changes, message):
    with pytest.raises(SetupError, match=message):
        TrainingSetup(**changes)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"r": 0}, "r must be a positive integer"), ({"alpha": -1}, "lora_alpha must be positive"),
     ({"dropout": 1.0}, "dropout must be in"), ({"targets": ()}, "at least one target")],
)
def test_invalid_lora_specs(kwargs, message):
    with pytest.raises(SetupError, match=message):
        LoraSpec(**kwargs)


def test_lora_targets_accept_a_comma_string():
    assert LoraSpec(targets="attention, experts").targets == ("attention", "experts")


def test_as_dict_round_trips():
    setup = TrainingSetup(seq_len=2048, lora=LoraSpec(r=4, targets=("q_proj",)))
    data = setup.as_dict()
    data["lora"] = LoraSpec(**data["lora"])
    assert TrainingSetup(**data) == setup


def test_from_dict_reads_back_as_dict_and_names_unknown_fields():
    setup = TrainingSetup(method="lora", lora=LoraSpec(r=8, alpha=32, targets=("attention", "experts")), zero_stage=3, seq_len=4096)
    assert TrainingSetup.from_dict(setup.as_dict()) == setup
    assert TrainingSetup.from_dict({"zero_stage": 1}) == TrainingSetup(zero_stage=1)
    with pytest.raises(SetupError, match=r"unknown setup fields seq_length; known: .*seq_len"):
        TrainingSetup.from_dict({"seq_length": 4096})
