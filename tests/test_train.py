"""Training for real: DeepSpeed with 2 CPU processes on the tiny preset, the guard, checkpoints and resume.

Each DeepSpeed run is a subprocess (`deepspeed --num_gpus 2 --module moekit.train ...`) of a handful of
steps; the assertions for one run are combined in one test. The first run on a machine JIT-builds
DeepSpeed's C++ ops (about 2 minutes, cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.data import IGNORE_INDEX, BatchOrder, ByteTokenizer, DataError, load_documents, tokenize
from moekit.guard import TrainingGuard, TrainingGuardError, _moved, fingerprint, param_groups
from moekit.launch import free_port
from moekit.models import build_model
from moekit.train import TrainingError, read_log, save_setup, train
from moekit.training_setup import TrainingSetup

REPO = Path(__file__).resolve().parents[1]
EXPERT_LORA = {"experts LoRA gate_up_proj", "experts LoRA down_proj"}
LORA_GROUPS = {"attention LoRA", *EXPERT_LORA}
FULL_GROUPS = {"embeddings", "attention", "router", "experts gate_up_proj", "experts down_proj", "norms", "lm_head"}


def tiny(**changes) -> TrainingSetup:
    base = dict(model="tiny", method="lora", precision="bf16", zero_stage=2, gpus_per_node=2, seq_len=64, micro_batch=2)
    return TrainingSetup(**{**base, **changes})


def deepspeed_env() -> dict[str, str]:
    """What a lesson's run gets: this Python's bin first (one ninja), the checkout's cache of C++ ops, offline."""
    from moekit.lessons import training_env

    return {**training_env(), "HF_HUB_OFFLINE": "1"}


def run_deepspeed(target: list[str], *, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus 2 <target>` on this machine's CPU; output captured, the port kept as ``master_port``."""
    port = free_port()
    argv = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), *target]
    result = subprocess.run(argv, env=deepspeed_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    result.master_port = port
    return result


def shm_buffers_left(result: subprocess.CompletedProcess) -> list[str]:
    """DeepSpeed's CPU all-reduce workspaces of that run still named in /dev/shm (69 MB each)."""
    return sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{result.master_port}_*"))


def run_training(tmp_path: Path, name: str, setup: TrainingSetup, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name
    setup_path = save_setup(setup, tmp_path / f"{name}-setup.json")
    result = run_deepspeed(["--module", "moekit.train", "--setup-json", str(setup_path), "--output-dir", str(out),
                            "--no-progress", *args])
    return result, out


def output_of(result: subprocess.CompletedProcess) -> str:
    return (result.stdout + result.stderr)[-6000:]


def guard_checks(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "guard.jsonl").read_text().splitlines()]


def assert_trained(out: Path, trainable: set[str], *, frozen_checked: bool) -> list[float]:
    """Loss fell; every group meant to train moved at every check; frozen ones (when checked) never did."""
    losses = [r["loss"] for r in read_log(out)]
    assert losses[-1] < losses[0] - 0.05, losses
    checks = guard_checks(out)
    assert checks and checks[0]["step"] == 1
    for check in checks:
        moved = {g for g, m in check["moved"].items() if m}
        meant = {g for g, t in check["trainable"].items() if t}
        assert meant == trainable, check
        assert trainable <= moved, check
        if frozen_checked:
            frozen = set(check["moved"]) - meant
            assert frozen and not frozen & moved, check
    return losses


# --------------------------------------------------------------------------------------------
# Data (no DeepSpeed)
# --------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_and_fits_the_tiny_vocabulary():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("ZeRO-3 → experts")
    assert ids[0] == tokenizer.bos_token_id and min(ids[1:]) >= 3 and tokenizer.vocab_size == 259
    assert tokenizer.decode(ids) == "ZeRO-3 → experts"


def test_bundled_text_packs_into_full_rows_and_pads_per_batch():
    documents = load_documents()
    assert 20_000 <= sum(len(d) for d in documents) <= 40_000
    packed = tokenize(documents, ByteTokenizer(), 64, packing=True)
    assert all(len(row) == 64 for row in packed.rows)
    assert packed.num_tokens > 0.95 * sum(len(d.encode()) for d in documents)
    padded = tokenize(documents, ByteTokenizer(), 4096, packing=False)
    lengths = sorted({len(row) for row in padded.rows})
    assert len(lengths) > 5  # one row per document, of its own length
    batch = padded.collate([0, 1])
    longest = max(len(padded.rows[0]), len(padded.rows[1]))
    assert batch["input_ids"].shape == (2, longest)
    shorter = 0 if len(padded.rows[0]) < longest else 1
    assert (batch["labels"][shorter, len(padded.rows[shorter]):] == IGNORE_INDEX).all()
    assert int(batch["attention_mask"].sum()) == len(padded.rows[0]) + len(padded.rows[1])


def test_batch_order_is_a_function_of_the_step_and_splits_ranks():
    order = BatchOrder(num_rows=100, micro_batch=2, grad_accum=3, world_size=2, seed=7)
    again = BatchOrder(num_rows=100, micro_batch=2, grad_accum=3, world_size=2, seed=7)
    assert order.row_indices(5, 1, 1) == again.row_indices(5, 1, 1)
    epoch = [i for step in range(100 // 12) for m in range(3) for r in range(2) for i in order.row_indices(step, m, r)]
    assert len(epoch) == len(set(epoch))  # no row twice within an epoch
    assert BatchOrder(100, 2, 3, 2, seed=8).row_indices(0, 0, 0) != order.row_indices(0, 0, 0)


def test_jsonl_without_text_is_a_clear_error(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2 has no \"text\""):
        load_documents(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert load_documents(good) == ["one", "two"]


# --------------------------------------------------------------------------------------------
# Groups and the guard, in this process (no DeepSpeed engine)
# --------------------------------------------------------------------------------------------


def test_setup_round_trips_through_json(tmp_path):
    setup = tiny(offload="optimizer").replace(lora_r=4, lora_targets=("attention",))
    assert TrainingSetup.from_dict(json.loads(save_setup(setup, tmp_path / "s.json").read_text())) == setup


def test_lora_groups_name_each_fused_expert_tensor_and_the_frozen_base():
    from moekit.lora import apply_lora

    setup = tiny()
    model = apply_lora(build_model("tiny", "cpu"), setup.lora)
    groups = {g.label: g for g in param_groups(model, setup)}
    assert {label for label, g in groups.items() if g.trainable} == LORA_GROUPS
    assert groups["experts LoRA gate_up_proj"].num_params == 2 * 16 * 4 * (64 + 256)  # layers x r x experts x (in+out)
    assert groups["experts LoRA down_proj"].num_params == 2 * 16 * 4 * (128 + 64)
    assert {"frozen experts gate_up_proj", "frozen attention", "frozen router"} <= set(groups)
    full = {g.label for g in param_groups(build_model("tiny", "cpu"), tiny(method="full"))}
    assert full == FULL_GROUPS


def test_guard_names_the_groups_that_did_not_move():
    from moekit.lora import apply_lora

    setup = tiny()
    model = apply_lora(build_model("tiny", "cpu"), setup.lora)
    guard = TrainingGuard(model, param_groups(model, setup), check_frozen=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "self_attn" in name and "lora_B" in name:
                param.add_(1e-3)
    with pytest.raises(TrainingGuardError) as err:
        guard.check(1)
    message = str(err.value)
    assert "experts LoRA gate_up_proj" in message and "experts LoRA down_proj" in message
    assert "attention LoRA (" not in message and "a falling loss does not show" in message


def test_fingerprint_sees_one_changed_element_and_ignores_denormal_noise():
    weights = torch.randn(1000, 100)
    before = fingerprint(weights)
    assert not _moved(before, fingerprint(weights.clone()))
    weights[123, 45] += 1e-4
    assert _moved(before, fingerprint(weights))
    zero = torch.zeros(64, 16)
    assert _moved(fingerprint(zero), fingerprint(zero + 1e-4))
    assert not _moved(fingerprint(zero), fingerprint(zero + 1e-35))


def test_train_refuses_zero_init_below_zero3_and_fp16_without_a_gpu():
    with pytest.raises(TrainingError, match="only ZeRO-3"):
        train(tiny(zero_stage=2), zero_init=True)
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        with pytest.raises(TrainingError, match="precision='fp16' is not supported .* use precision='bf16'"):
            train(tiny(precision="fp16"))


# --------------------------------------------------------------------------------------------
# DeepSpeed runs, 2 CPU processes each
# --------------------------------------------------------------------------------------------

TRAIN_ARGS = ["--steps", "6", "--save-every", "2", "--lr", "1e-2", "--check-frozen"]


@pytest.fixture(scope="module")
def zero2_lora_reference(tmp_path_factory):
    """ZeRO-2, LoRA on attention and both fused expert tensors, bf16: the uninterrupted run."""
    tmp_path = tmp_path_factory.mktemp("zero2")
    result, out = run_training(tmp_path, "reference", tiny(), *TRAIN_ARGS)
    assert result.returncode == 0, output_of(result)
    return tmp_path, out


@pytest.mark.slow
def test_zero2_lora_bf16_trains_every_adapter_and_saves_them(zero2_lora_reference):
    _, out = zero2_lora_reference
    assert_trained(out, LORA_GROUPS, frozen_checked=True)
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["memory_bytes"] > 50 * 2**20 and r["memory_kind"] == "rss" for r in log)
    assert [c["step"] for c in guard_checks(out)] == [1, 2, 4, 6]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000006"
    adapter = out / "checkpoints" / "step000006" / "hf"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_matches_the_uninterrupted_run(zero2_lora_reference):
    tmp_path, reference = zero2_lora_reference
    killed, out = run_training(tmp_path, "killed", tiny(), *TRAIN_ARGS, "--kill-after-checkpoint", "4")
    assert killed.returncode != 0
    assert shm_buffers_left(killed) == []  # unlinked once both ranks mapped them, so a SIGKILL leaks nothing
    assert (out / "checkpoints" / "latest").read_text().strip() == "step000004"
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]

    resumed, out = run_training(tmp_path, "killed", tiny(), *TRAIN_ARGS)
    assert resumed.returncode == 0, output_of(resumed)
    assert shm_buffers_left(resumed) == []
    assert "steps 5-6" in resumed.stdout
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    expected = {r["step"]: r["loss"] for r in read_log(reference)}
    for record in log:
        assert record["loss"] == pytest.approx(expected[record["step"]], rel=1e-5, abs=1e-6)
    assert guard_checks(out)[-1]["step"] == 6


@pytest.mark.slow
def test_zero3_full_fine_tune_under_zero_init_moves_every_component(tmp_path):
    """Full fine-tuning, ZeRO-3, built under zero.Init, with activation checkpointing, padding and accumulation."""
    setup = tiny(method="full", zero_stage=3, activation_checkpointing=True, packing=False, grad_accum=2)
    result, out = run_training(tmp_path, "zero3-full", setup, "--steps", "5", "--lr", "1e-3")
    assert result.returncode == 0, output_of(result)
    assert_trained(out, FULL_GROUPS, frozen_checked=False)
    config = json.loads((out / "ds_config.json").read_text())
    assert (config["train_batch_size"], config["gradient_accumulation_steps"]) == (8, 2)
    weights = out / "checkpoints" / "step000005" / "hf"
    assert (weights / "model.safetensors").is_file() and (weights / "config.json").is_file()


@pytest.mark.slow
def test_cli_train_runs_one_rank_here_without_zero(tmp_path):
    """`moekit train` without a launcher: one rank, ZeRO-0, bf16 (masters kept by DeepSpeed's FP16_Optimizer)."""
    argv = [sys.executable, "-m", "moekit.cli", "train", "--model", "tiny", "--method", "full", "--zero", "0", "--seq", "64",
            "--micro-batch", "2", "--steps", "3", "--lr", "1e-3", "--output-dir", str(tmp_path / "one rank")]
    result = subprocess.run(argv, env=deepspeed_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, output_of(result)
    assert "the setup describes 8 ranks but 1 started" in result.stderr
    assert "steps 1-3: loss" in result.stdout
    assert "guard at step 1: moved embeddings, attention, router, experts gate_up_proj, experts down_proj, norms, lm_head" in result.stdout
    assert json.loads((tmp_path / "one rank" / "ds_config.json").read_text())["train_batch_size"] == 2


@pytest.fixture(scope="module")
def tiny_weights_folder(tmp_path_factory) -> Path:
    """A local Hugging Face folder (config.json + model.safetensors) of the tiny preset, in a path with a space."""
    folder = tmp_path_factory.mktemp("weights") / "tiny mixtral"
    build_model("tiny", "cpu", seed=3).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("offload", "zero_init", "from_folder"),
    # Two corners of (offload x zero.Init): each path runs once (CI time); lesson 06 runs ZeRO-3 + offload too.
    [("none", "on", True), ("optimizer+params", "off", False)],
    ids=["zero3-from_pretrained-under-zero.Init", "zero3-offload-built-normally"],
)
def test_zero3_expert_lora_trains_built_normally_and_under_zero_init(tmp_path, tiny_weights_folder, offload, zero_init, from_folder):
    setup = tiny(zero_stage=3, offload=offload)
    weights = ["--weights", str(tiny_weights_folder)] if from_folder else []
    result, out = run_training(tmp_path, "run", setup, "--steps", "4", "--save-every", "2", "--lr", "1e-2",
                               "--check-frozen", "--zero-init", zero_init, *weights)
    assert result.returncode == 0, output_of(result)
    assert_trained(out, LORA_GROUPS, frozen_checked=True)
    config = json.loads((out / "ds_config.json").read_text())["zero_optimization"]
    assert config["leaf_module"] == {"classes": ["MixtralSparseMoeBlock"]}
    assert ("offload_param" in config) == (offload != "none")


GUARD_DRIVER = '''
import argparse
from moekit.launch import free_port
from moekit.errors import MoekitError
from moekit.train import load_setup, train

def freeze_expert_down_lora(model):
    for name, param in model.named_parameters():
        if ".experts.lora_" in name:  # the outer ParamWrapper: LoRA on down_proj
            param.requires_grad_(False)

parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int)
parser.add_argument("setup")
parser.add_argument("out")
args = parser.parse_args()
try:
    train(load_setup(args.setup), steps=3, output_dir=args.out, lr=1e-2, model_hook=freeze_expert_down_lora, progress=False)
except MoekitError as err:
    print(f"GUARD: {err}")
    raise SystemExit(3)
'''


@pytest.mark.slow
def test_guard_stops_a_run_whose_expert_lora_was_frozen_on_purpose(tmp_path):
    driver = tmp_path / "freeze_and_train.py"
    driver.write_text(GUARD_DRIVER)
    setup_path = save_setup(tiny(), tmp_path / "setup.json")
    result = run_deepspeed([str(driver), str(setup_path), str(tmp_path / "out")])
    assert result.returncode != 0
    guard_lines = [line for line in result.stdout.splitlines() if line.startswith("GUARD:")]
    assert guard_lines, output_of(result)
    message = guard_lines[0]
    assert "training guard at step 1" in message
    assert "experts LoRA down_proj" in message and "did not change" in message
    assert "experts LoRA gate_up_proj (" not in message and "attention LoRA (" not in message
    assert [r["step"] for r in read_log(tmp_path / "out")] == [1]  # stopped right after the first step
