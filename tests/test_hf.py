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

from moekit.estimate import estimate, num_trainable_params
from moekit.hf import HfSetupError, MemoryCallback, example_trainer, read_trainer_logs
from moekit.lessons import without_overhead
from moekit.training_setup import TrainingSetup
from test_train import LORA_GROUPS, run_deepspeed, shm_buffers_left

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
