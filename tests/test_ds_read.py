"""`--ds-config FILE`: a user's DeepSpeed JSON read into the setup, "auto" resolved by transformers' own code."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.ds_read import DsConfigError, setup_from_ds_config
from moekit.estimate import estimate, model_facts
from moekit.training_setup import TrainingSetup
from moekit.zero import PRESETS, ds_config, xtuner_preset
from moekit.zero_knobs import zero_knobs

BASE = TrainingSetup(model="mixtral-8x7b", gpus_per_node=8, micro_batch=2, grad_accum=4)


@pytest.mark.parametrize("setup", [
    BASE, BASE.replace(zero_stage=3, offload="optimizer+params", precision="fp16", activation_checkpointing=True),
    BASE.replace(zero_stage=1, precision="fp32", reduce_bucket_size=10_000_000),
    BASE.replace(zero_stage=3, stage3_prefetch_bucket_size=0, sub_group_size=5_000_000),
])
def test_moekits_own_config_reads_back_to_the_same_run(setup):
    read = setup_from_ds_config(ds_config(setup), TrainingSetup(model=setup.model, gpus_per_node=8,
                                                               activation_checkpointing=setup.activation_checkpointing))
    for name in ("precision", "zero_stage", "offload", "micro_batch", "grad_accum"):
        assert getattr(read, name) == getattr(setup, name), name
    assert zero_knobs(read) == zero_knobs(setup)
    assert estimate(read).total_bytes == estimate(setup).total_bytes


@pytest.mark.parametrize("preset", PRESETS)
def test_xtuners_auto_presets_resolve_as_the_hugging_face_trainer_resolves_them(preset):
    hidden = model_facts("mixtral-8x7b").hidden
    read = setup_from_ds_config(xtuner_preset(preset), BASE.replace(precision="fp16"))
    stage, offload = PRESETS[preset]
    assert (read.zero_stage, read.offload, read.precision) == (stage, offload, "fp16")
    assert (read.micro_batch, read.grad_accum) == (2, 4)  # "auto" takes the flags'
    knobs, written = zero_knobs(read), xtuner_preset(preset)["zero_optimization"]
    if written.get("reduce_bucket_size") == "auto":  # transformers: "auto" reduce_bucket_size = hidden^2
        assert knobs.reduce_bucket_size == hidden * hidden
    else:  # not in the file: DeepSpeed's default
        assert knobs.reduce_bucket_size == zero_knobs(TrainingSetup()).reduce_bucket_size
    if written.get("stage3_prefetch_bucket_size") == "auto":
        assert knobs.stage3_prefetch_bucket_size == int(0.9 * hidden * hidden)
        assert knobs.stage3_param_persistence_threshold == 10 * hidden


def test_a_file_on_disk_is_read_and_its_explicit_values_win(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "train_batch_size": 64, "bf16": {"enabled": True},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8}}))
    read = setup_from_ds_config(str(path), BASE)
    assert (read.micro_batch, read.grad_accum, read.zero_stage) == (4, 2, 2)  # 64 = 4 x 2 x 8 ranks
    assert read.reduce_bucket_size == 200_000_000


@pytest.mark.parametrize(("config", "message"), [
    ({"zero_optimization": {"stage": 2, "reduce_bucket_sise": 5e7}},
     "zero_optimization.reduce_bucket_sise is not a DeepSpeed ZeRO setting: did you mean reduce_bucket_size"),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1},
     "ds train_batch_size=16 vs hf train_batch_size"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "enables both fp16 and bf16"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
])
def test_unknown_or_contradictory_keys_are_one_line_errors(config, message):
    with pytest.raises(DsConfigError, match=message.replace("(", r"\(")) as caught:
        setup_from_ds_config(config, BASE)
    assert "\n" not in str(caught.value)


def test_cli_estimate_reads_the_file_and_refuses_a_flag_that_disagrees(tmp_path, capsys):
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(xtuner_preset("zero3")))
    assert main(["estimate", "--ds-config", str(path)]) == 0
    assert " bf16 ZeRO-3 " in capsys.readouterr().out.splitlines()[0]  # the setup line
    assert main(["estimate", "--ds-config", str(path), "--zero", "1"]) == 2
    assert f"--zero 1 contradicts {path}, which gives zero_stage = 3" in capsys.readouterr().err
    assert main(["plan", "--ds-config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read the DeepSpeed config" in capsys.readouterr().err
