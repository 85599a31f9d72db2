"""DeepSpeed configs: XTuner's presets, a grid of generated configs, all parsed by DeepSpeed itself."""

from __future__ import annotations

import itertools
import json

import pytest

from moekit.cli import main
from moekit.training_setup import TrainingSetup
from moekit.zero import (
    PRESETS,
    ZeroConfigError,
    _DataParallelWorld,
    _rank_zero_without_process_group,
    ds_config,
    optimizer_section,
    preset_config,
    setup_for_preset,
    validate_ds_config,
    validated_ds_config,
    xtuner_preset,
)

#: xtuner/configs/deepspeed/*.json, as ../shared/REFERENCE.md lists them.
XTUNER_ZERO = {
    "zero1": {"stage": 1, "overlap_comm": True},
    "zero2": {"stage": 2, "overlap_comm": True},
    "zero2_offload": {"stage": 2, "overlap_comm": True, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "zero3": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
    "zero3_offload": {
        "stage": 3,
        "overlap_comm": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_xtuner_and_resolve_auto_from_the_setup(name):
    raw = xtuner_preset(name)
    assert raw["zero_optimization"] == XTUNER_ZERO[name]
    assert raw["gradient_accumulation_steps"] == raw["train_micro_batch_size_per_gpu"] == raw["gradient_clipping"] == "auto"
    assert raw["fp16"] == {"enabled": "auto", "initial_scale_power": 16} and raw["bf16"] == {"enabled": "auto"}
    assert raw["zero_allow_untested_optimizer"] is True and raw["zero_force_ds_cpu_optimizer"] is False

    setup = setup_for_preset(TrainingSetup(precision="fp16", micro_batch=2, grad_accum=16), name)
    config = validated_ds_config(setup, name)
    assert "auto" not in json.dumps(config)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (2, 16)
    assert config["fp16"]["enabled"] is True and config["bf16"]["enabled"] is False
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == XTUNER_ZERO[name]
    for world_size in (1, 16):
        validate_ds_config(config, world_size)


def test_preset_must_agree_with_the_setup_stage():
    with pytest.raises(ZeroConfigError, match=r"preset 'zero3' is ZeRO-3 .* setup says ZeRO-2"):
        preset_config("zero3", TrainingSetup(zero_stage=2))
    with pytest.raises(ZeroConfigError, match="unknown DeepSpeed preset 'zero4'"):
        xtuner_preset("zero4")


STAGE_OFFLOADS = [(0, "none"), (1, "none"), (1, "optimizer"), (2, "none"), (2, "optimizer"), (3, "none"),
                  (3, "optimizer"), (3, "optimizer+params")]


@pytest.mark.parametrize(("stage", "offload"), STAGE_OFFLOADS)
def test_generated_configs_pass_deepspeeds_parser_across_a_grid(stage, offload, tmp_path):
    for precision, device, (gpus, nodes), (micro, accum) in itertools.product(
        ("fp32", "fp16", "bf16"), ("cpu", "nvme"), ((1, 1), (8, 1), (8, 2)), ((1, 1), (2, 8))
    ):
        if device == "nvme" and offload == "none":
            continue
        setup = TrainingSetup(
            model="tiny", precision=precision, zero_stage=stage, offload=offload, offload_device=device,
            nvme_path=str(tmp_path / "nvme swap") if device == "nvme" else None,
            gpus_per_node=gpus, num_nodes=nodes, micro_batch=micro, grad_accum=accum,
        )
        config = validated_ds_config(setup)
        validate_ds_config({**config, "optimizer": optimizer_section(1e-4)}, setup.world_size)
        assert config["train_batch_size"] == micro * accum * gpus * nodes
        zero = config["zero_optimization"]
        assert zero["stage"] == stage
        assert config["fp16"]["enabled"] == (precision == "fp16") and config["bf16"]["enabled"] == (precision == "bf16")
        assert config["fp16"]["initial_scale_power"] == 16 and config["fp16"]["loss_scale"] == 0  # dynamic
        assert ("offload_optimizer" in zero) == (offload != "none")
        assert ("offload_param" in zero) == (offload == "optimizer+params")
        if offload != "none":
            assert zero["offload_optimizer"]["device"] == device
            assert (zero["offload_optimizer"].get("nvme_path") is not None) == (device == "nvme")
            assert ("aio" in config) == (device == "nvme")
        if stage == 3:
            assert zero["stage3_gather_16bit_weights_on_model_save"] is True
            assert zero["leaf_module"] == {"classes": ["MixtralSparseMoeBlock"]}
        if stage in (1, 2, 3):
            assert zero["reduce_bucket_size"] == 500_000_000


def test_dense_models_get_no_leaf_modules():
    zero = ds_config(TrainingSetup(model="mistral-7b", method="full", zero_stage=3))["zero_optimization"]
    assert "leaf_module" not in zero


def test_deepspeeds_parser_checks_the_batch_at_the_real_world_size():
    """Without a process group DeepSpeedConfig falls back to world size 1; moekit makes it use the given one."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}
    with _rank_zero_without_process_group():
        parsed = DeepSpeedConfig(dict(config), mpu=_DataParallelWorld(8))
        assert parsed.world_size == 8 and parsed.train_batch_size == 32
        with pytest.raises(AssertionError, match=r"32 != 2 \* 2 \* 4"):
            DeepSpeedConfig(dict(config), mpu=_DataParallelWorld(4))
    import deepspeed.comm as dist

    with pytest.raises(Exception):  # noqa: B017  the patch is gone again: no process group here
        dist.get_rank()


def test_global_batch_that_does_not_divide_names_the_numbers():
    setup = TrainingSetup(gpus_per_node=8, micro_batch=2)
    assert ds_config(setup, global_batch=64)["gradient_accumulation_steps"] == 4
    with pytest.raises(ZeroConfigError) as err:
        ds_config(setup, global_batch=100)
    message = str(err.value)
    assert "100" in message and "micro-batch 2 x 8 ranks = 16" in message and "96 or 112" in message


def test_inconsistent_configs_are_clear_errors():
    config = validated_ds_config(TrainingSetup(zero_stage=2))
    both = {**config, "fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(ZeroConfigError, match="fp16 and bf16 are both enabled"):
        validate_ds_config(both, 8)
    params = {**config, "zero_optimization": {**config["zero_optimization"], "offload_param": {"device": "cpu"}}}
    with pytest.raises(ZeroConfigError, match="offload_param needs ZeRO stage 3.*stage is 2"):
        validate_ds_config(params, 8)
    with pytest.raises(ZeroConfigError, match=r"train_batch_size 8 != micro-batch 1 x gradient accumulation 1 x 4 ranks = 4"):
        validate_ds_config(config, 4)
    unknown = {**config, "zero_optimization": {**config["zero_optimization"], "stage3_prefetch_bucket": 1}}
    with pytest.raises(ZeroConfigError, match="DeepSpeed rejects this config.*stage3_prefetch_bucket"):
        validate_ds_config(unknown, 8)
    with pytest.raises(ZeroConfigError, match="still holds 'auto'"):
        validate_ds_config(xtuner_preset("zero2"), 8)


def test_the_config_writes_deepspeeds_own_defaults_and_deepspeed_reads_back_each_knob_a_setup_sets():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from moekit.zero_knobs import KNOBS, read_deepspeed_defaults, zero_knobs

    default = TrainingSetup(zero_stage=3)
    zero = ds_config(default)["zero_optimization"]
    parsed = DeepSpeedZeroConfig(**zero)
    assert {knob: getattr(parsed, attribute) for knob, attribute in KNOBS.items()} == read_deepspeed_defaults()
    assert zero_knobs(default) == zero_knobs(default.replace(**read_deepspeed_defaults()))
    changed = {knob: 1000 + i for i, knob in enumerate(KNOBS)}
    for stage, written in ((2, ["reduce_bucket_size", "allgather_bucket_size"]),
                           (3, [knob for knob in KNOBS if knob != "allgather_bucket_size"])):  # ZeRO-1/2 only
        section = ds_config(default.replace(zero_stage=stage, **changed))["zero_optimization"]
        parsed = DeepSpeedZeroConfig(**section)
        assert {knob: getattr(parsed, KNOBS[knob]) for knob in written} == {knob: changed[knob] for knob in written}


def test_cli_ds_config_prints_a_validated_preset(capsys, tmp_path):
    out = tmp_path / "ds.json"
    assert main(["ds-config", "--model", "tiny", "--preset", "zero3_offload", "--gpus", "2", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["zero_optimization"] == XTUNER_ZERO["zero3_offload"]
    assert main(["ds-config", "--zero", "3", "--offload", "optimizer+params", "--offload-device", "nvme"]) == 2
    assert "nvme_path" in capsys.readouterr().err
    assert main(["ds-config", "--gpus", "8", "--global-batch", "100"]) == 2
    assert "not a multiple" in capsys.readouterr().err
