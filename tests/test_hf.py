"""moekit where users train: MemoryCallback on a real Hugging Face Trainer / TRL SFTTrainer, and exported configs.

The two real runs are `deepspeed --num_gpus 2 tests/hf_run.py ...`: DeepSpeed ZeRO-2 (XTuner's preset, "auto"
values resolved by transformers) on 2 CPU ranks, the tiny preset with LoRA on attention and experts, 3 steps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_train import LORA_GROUPS, run_deepspeed, shm_buffers_left

from moekit.estimate import estimate, num_trainable_params
from moekit.hf import HfSetupError, MemoryCallback, adapters_upcast, example_trainer, read_trainer_logs
from moekit.lessons import without_overhead
from moekit.lora import apply_lora
from moekit.models import build_model
from moekit.training_setup import LoraSpec, TrainingSetup

REPO = Path(__file__).resolve().parents[1]


def run_hf(tmp_path_factory, kind: str) -> tuple[str, dict, Path]:
    out = tmp_path_factory.mktemp(kind)
    result = run_deepspeed([str(REPO / "tests" / "hf_run.py"), kind, str(out)])
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    assert shm_buffers_left(result) == []  # the callback unlinked DeepSpeed's CPU all-reduce files
    return text, json.loads((out / "report.json").read_text()), out


def check_run(text: str, report: dict, out: Path) -> TrainingSetup:
    """What both runs must show: the setup read back, the pre-flight estimate, memory per step, guard, comparison."""
    setup = TrainingSetup.from_dict(report["setup"])
    # The setup as the run really is: the preset's "auto" values resolved from the arguments, 2 ranks, LoRA read from peft.
    assert (setup.model, setup.method, setup.zero_stage, setup.precision) == ("tiny", "lora", 2, "bf16")
    assert (setup.gpus_per_node, setup.num_nodes, setup.micro_batch, setup.grad_accum, setup.seq_len) == (2, 1, 2, 2, 64)
    assert (setup.lora.r, setup.lora.alpha) == (16, 32)
    assert num_trainable_params(setup) == report["num_trainable"]  # the LoRA read back counts what peft built
    predicted = without_overhead(estimate(setup)).total_bytes  # a CPU rank has no CUDA context
    assert report["estimate_bytes"] == predicted
    assert f"moekit: {setup.describe()}" in text and "total (peak)" in text
    # Per-step memory in the Trainer's own logs (trainer_state.json), the estimate beside it once.
    steps = [entry for entry in read_trainer_logs(out) if "loss" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert [entry["memory_rss_bytes"] for entry in steps] == [s["memory_rss_bytes"] for s in report["steps"]]
    assert all(2**27 < entry["memory_rss_bytes"] < 2**33 for entry in steps)
    assert [entry.get("moekit_estimate_bytes") for entry in steps] == [predicted, None, None]
    # The guard after the first optimizer step and at each save (steps 2 and 3): every adapter group moved.
    assert [(v["step"], set(v["moved"]), v["stuck"]) for v in report["guard"]] == [
        (1, LORA_GROUPS, []), (2, LORA_GROUPS, []), (3, LORA_GROUPS, [])]
    assert "moekit guard at step 1: moved" in text
    # The final comparison, with the numbers the run had.
    peak = max(s["memory_rss_bytes"] for s in report["steps"])
    assert report["peak_bytes"] == peak
    line = re.search(r"moekit: predicted peak ([\d.]+) GiB per rank, measured memory_rss_bytes peak ([\d.]+) GiB", text)
    assert line and float(line[1]) == round(predicted / 2**30, 3) and float(line[2]) == round(peak / 2**30, 3)
    return setup


@pytest.mark.slow
def test_trainer_with_zero2_on_two_cpu_ranks_shows_estimate_memory_guard_and_comparison(tmp_path_factory):
    check_run(*run_hf(tmp_path_factory, "trainer"))


@pytest.mark.slow
def test_sft_trainer_takes_the_sequence_length_from_max_length(tmp_path_factory):
    check_run(*run_hf(tmp_path_factory, "sft"))


def test_a_run_that_does_not_fit_is_stopped_before_its_first_step(tmp_path):
    setup = TrainingSetup(model="tiny", gpus_per_node=1, zero_stage=0, seq_len=64, micro_batch=2)
    callback = MemoryCallback(seq_len=64, gpu_memory_gb=0.001, stop_if_not_fit=True)
    trainer = example_trainer(setup, tmp_path, callbacks=[callback], use_cpu=True, max_steps=2, save_strategy="no")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(HfSetupError, match="stopped before the first step: this run needs .* more than the 0.001 GB") as err:
        trainer.train()
    assert "ladder" in str(err.value) and "Planner:" in str(err.value)
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------
# Exported plans load back into TrainingArguments, TRL, peft and accelerate as written
# --------------------------------------------------------------------------------------------


def test_exported_hf_files_load_into_training_arguments_sft_config_and_peft(tmp_path, monkeypatch):
    import transformers.training_args
    from peft import LoraConfig
    from transformers import TrainingArguments
    from trl import SFTConfig

    from moekit.export import export_hf
    from moekit.lora import peft_config
    from moekit.train import load_setup

    # bf16 arguments are checked against this machine's GPU; the file is meant for one that has bf16.
    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
    setup = TrainingSetup(model="tiny", zero_stage=3, offload="optimizer", gpus_per_node=2, seq_len=64, micro_batch=2,
                          grad_accum=3, activation_checkpointing=True)
    files = export_hf(setup, tmp_path / "hf export")
    args = TrainingArguments(**json.loads(files["training_args"].read_text()))
    assert args.hf_deepspeed_config.mismatches == []
    resolved = args.hf_deepspeed_config.config  # the "auto" values as transformers filled them from the arguments
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]) == (2, 3)
    assert resolved["bf16"]["enabled"] is True and resolved["fp16"]["enabled"] is False
    assert resolved["zero_optimization"]["stage"] == 3
    assert resolved["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert resolved["optimizer"]["params"]["lr"] == args.learning_rate == 2e-4
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    sft = SFTConfig(**json.loads(files["sft_config"].read_text()))
    assert (sft.max_length, sft.packing, sft.per_device_train_batch_size) == (64, True, 2)
    lora = LoraConfig.from_pretrained(str(files["lora"].parent))
    assert lora.to_dict() == peft_config(setup.lora, "tiny").to_dict()
    assert load_setup(files["setup"]) == setup


def test_plan_exports_the_best_setup_as_an_accelerate_config_accelerate_reads(tmp_path, capsys):
    from accelerate.commands.config.config_args import load_config_from_file

    from moekit.cli import main
    from moekit.train import load_setup

    hf_dir, yaml_path = tmp_path / "hf", tmp_path / "acc.yaml"
    argv = ["plan", "--model", "tiny", "--gpus", "2", "--gpu-mem", "4", "--seq", "64", "--methods", "lora", "--top", "1",
            "--export", "hf", str(hf_dir), "--export", "accelerate", str(yaml_path)]
    assert main(argv) == 0
    assert "exported: tiny lora" in capsys.readouterr().out
    best = load_setup(hf_dir / "setup.json")
    config = load_config_from_file(str(yaml_path))
    assert (config.distributed_type, config.num_processes, config.mixed_precision) == ("DEEPSPEED", 2, best.precision)
    ds_path = Path(config.deepspeed_config["deepspeed_config_file"])
    assert ds_path == tmp_path / "acc.ds_config.json"
    assert json.loads(ds_path.read_text())["zero_optimization"]["stage"] == best.zero_stage
    # What `accelerate launch --config_file acc.yaml ...` makes of it, through accelerate's own argument checks.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    launch_args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "--module", "moekit.train"])
    launch_args = _validate_launch_command(launch_args)[0]
    assert (launch_args.use_deepspeed, launch_args.num_processes, launch_args.deepspeed_config_file) == (True, 2, str(ds_path))
    assert main(["plan", "--model", "tiny", "--export", "pdf", str(tmp_path)]) == 2
    assert "unknown --export kind pdf" in capsys.readouterr().err


def test_a_model_config_that_is_no_preset_is_estimated_from_a_config_file_moekit_writes():
    from moekit.hf import model_name_for
    from moekit.models import as_config, load_config, parameter_census

    assert model_name_for(as_config("tiny")) == "tiny"
    config = as_config("tiny")
    config.name_or_path, config.num_hidden_layers = "", 3  # built in memory, e.g. from_config with changes
    path = model_name_for(config)
    assert Path(path).is_file() and model_name_for(config) == path  # one file per content
    assert load_config(path).num_hidden_layers == 3
    assert parameter_census(path).num_params > parameter_census("tiny").num_params


def test_the_adapters_dtype_is_read_from_the_adapters_peft_made():
    # peft upcasts 16-bit adapters to fp32 unless told not to; under ZeRO-3 the setup takes what the model holds
    assert adapters_upcast(apply_lora(build_model("tiny", "cpu", dtype=torch.bfloat16), LoraSpec()))
    kept = apply_lora(build_model("tiny", "cpu", dtype=torch.bfloat16), LoraSpec(), autocast_adapter_dtype=False)
    assert not adapters_upcast(kept)
    assert {p.dtype for n, p in kept.named_parameters() if ".lora_" in n} == {torch.bfloat16}
