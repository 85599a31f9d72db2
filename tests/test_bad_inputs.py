"""Bad input, as a new user types it: one line on stderr that names the fix, the right exit code, no
traceback, and no file created or changed. CLI cases run in-process (``moekit.cli.main``) from an empty
folder; a handful run as real subprocesses; API cases check the exception and its message."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.errors import MoekitError
from moekit.train import save_setup
from moekit.training_setup import LoraSpec, TrainingSetup

NOT_UTF8 = b"\xff\xfe\x00bad \xc3\x28"

# (id, argv, exit code, a piece of the one line). {dir} is the empty working folder of the case.
CLI_CASES = [
    ("gpu-mem-nan", ["estimate", "--gpu-mem", "nan"], 2, "expected a finite number, got 'nan'"),
    ("gpu-mem-inf", ["estimate", "--gpu-mem", "inf"], 2, "expected a finite number, got 'inf'"),
    ("gpu-mem-negative", ["estimate", "--gpu-mem", "-5"], 2, "gpu_memory_gb must be positive"),
    ("gpu-mem-word", ["estimate", "--gpu-mem", "forty"], 2, "expected a number, got 'forty'"),
    ("host-mem-nan", ["estimate", "--host-mem", "nan"], 2, "expected a finite number"),
    ("host-mem-zero", ["estimate", "--host-mem", "0"], 2, "host_memory_gb must be positive"),
    ("seq-zero", ["estimate", "--seq", "0"], 2, "seq_len must be a positive integer"),
    ("seq-past-positions", ["estimate", "--seq", "1000000000"], 2, "use a sequence length <= 32768"),
    ("rank-zero", ["estimate", "--r", "0"], 2, "try r=8 or r=16"),
    ("rank-fraction", ["estimate", "--r", "8.5"], 2, "invalid int value: '8.5'"),
    ("dropout-one", ["estimate", "--dropout", "1"], 2, "LoRA dropout must be in [0, 1)"),
    ("lora-rank-with-full", ["estimate", "--method", "full", "--r", "8"], 2, "drop them or use --method lora"),
    ("lora-targets-with-full", ["estimate", "--method", "full", "--targets", "attention"], 2, "--targets set LoRA"),
    ("adapter-upcast-with-full", ["estimate", "--method", "full", "--no-adapter-upcast"], 2,
     "--no-adapter-upcast set LoRA"),
    ("offload-zero0", ["estimate", "--offload", "optimizer", "--zero", "0"], 2, "set zero_stage>=1"),
    ("param-offload-zero2", ["estimate", "--offload", "optimizer+params", "--zero", "2"], 2, "use zero_stage=3"),
    ("qlora-zero3", ["estimate", "--method", "qlora", "--zero", "3"], 2, "use zero_stage<=2"),
    ("qlora-fp32", ["estimate", "--method", "qlora", "--precision", "fp32"], 2, "use precision='bf16'"),
    ("unknown-model", ["estimate", "--model", "mixtral-9x9b"], 2, "Known presets"),
    ("model-folder-missing", ["estimate", "--model", "{dir}/no/such/folder"], 2, "no/such/folder"),
    ("model-config-not-utf8", ["estimate", "--model", "{dir}/bad/config.json"], 2, "UTF-8"),
    ("unknown-target", ["estimate", "--model", "tiny", "--targets", "feathers"], 2, "feathers"),
    ("article-w1-w2", ["estimate", "--targets", "w1,w2"], 2, "w3"),
    ("zero-stage-5", ["estimate", "--zero", "5"], 2, "invalid choice: 5"),
    ("zero-init-zero2", ["estimate", "--load-path", "zero_init"], 2, "use zero_stage=3"),
    ("8bit-adam-offload", ["estimate", "--optimizer", "adamw_8bit", "--offload", "optimizer"], 2, "with offload"),
    ("router-loss-word", ["estimate", "--router-aux-loss", "yes"], 2, "invalid choice: 'yes'"),
    ("train-8bit-adam", ["train", "--model", "tiny", "--optimizer", "adamw_8bit"], 2, "modelled by `moekit estimate`"),
    ("gpus-zero", ["estimate", "--gpus", "0"], 2, "gpus_per_node must be a positive integer"),
    ("nodes-negative", ["estimate", "--nodes", "-1"], 2, "num_nodes must be a positive integer"),
    ("micro-batch-zero", ["estimate", "--micro-batch", "0"], 2, "micro_batch must be a positive integer"),
    ("grad-accum-zero", ["estimate", "--grad-accum", "0"], 2, "grad_accum must be a positive integer"),
    ("nvme-without-path", ["estimate", "--zero", "3", "--offload", "optimizer", "--offload-device", "nvme"], 2, "--nvme-path"),
    ("unknown-flag", ["estimate", "--gpu-memory", "40"], 2, "unrecognized arguments: --gpu-memory"),
    ("no-command", [], 2, "required: COMMAND"),
    ("unknown-command", ["estimat"], 2, "invalid choice: 'estimat'"),
    ("plan-top-zero", ["plan", "--top", "0"], 2, "expected a positive whole number, got 0"),
    ("plan-top-negative", ["plan", "--top", "-1"], 2, "expected a positive whole number, got -1"),
    ("plan-offload-and-no-offload", ["plan", "--offload", "optimizer", "--no-offload"], 2, "contradict"),
    ("plan-no-offload-order", ["plan", "--no-offload", "--order", "zero2_offload"], 2, "--no-offload forbids"),
    ("plan-unknown-mitigation", ["plan", "--order", "pray"], 2, "unknown mitigations ['pray']"),
    ("plan-unknown-method", ["plan", "--methods", "lora,magic"], 2, "methods must be a non-empty tuple from full"),
    ("plan-min-seq-zero", ["plan", "--min-seq", "0"], 2, "must be between 1 and seq_len"),
    ("plan-min-seq-above", ["plan", "--min-seq", "99999"], 2, "must be between 1 and seq_len"),
    ("plan-ranks-word", ["plan", "--ranks", "8,x"], 2, "comma-separated whole numbers"),
    ("plan-ranks-zero", ["plan", "--ranks", "0"], 2, "positive whole numbers"),
    ("plan-global-batch-zero", ["plan", "--global-batch", "0"], 2, "global_batch must be a positive"),
    ("plan-global-batch-indivisible", ["plan", "--global-batch", "3"], 2, "multiple of 8"),
    ("ds-config-out-folder", ["ds-config", "--out", "{dir}"], 2, "is a folder; give a file name"),
    ("ds-config-out-under-file", ["ds-config", "--out", "{dir}/a-file/ds.json"], 2, "cannot write --out"),
    ("ds-config-bad-preset", ["ds-config", "--preset", "zero9"], 2, "invalid choice: 'zero9'"),
    ("train-steps-negative", ["train", "--model", "tiny", "--steps", "-5"], 2, "steps must be a positive number"),
    ("train-save-every-negative", ["train", "--model", "tiny", "--save-every", "-2"], 2, "save_every must be 0"),
    ("train-lr-negative", ["train", "--model", "tiny", "--lr", "-1"], 2, "learning rate must be a finite positive"),
    ("train-lr-nan", ["train", "--model", "tiny", "--lr", "nan"], 2, "expected a finite number"),
    ("train-data-missing", ["train", "--model", "tiny", "--data", "{dir}/none.txt"], 2, "does not exist"),
    ("train-data-not-utf8", ["train", "--model", "tiny", "--data", "{dir}/bad/data.txt"], 2, "is not UTF-8 text"),
    ("train-output-is-file", ["train", "--model", "tiny", "--output-dir", "{dir}/a-file"], 2, "is a file"),
    ("train-output-under-file", ["train", "--model", "tiny", "--output-dir", "{dir}/a-file/run"], 2, "inside the file"),
    ("train-output-foreign", ["train", "--model", "tiny", "--output-dir", "{dir}/bad"], 2, "not a moekit run"),
    ("train-weights-missing", ["train", "--model", "tiny", "--weights", "{dir}/no-weights"], 2, "weights folder"),
    ("train-changed-setup", ["train", "--model", "tiny", "--r", "8", "--output-dir", "{dir}/run"], 2, "lora.r 16 -> 8"),
    ("train-defaults-on-cpu", ["train"], 2, "train a small preset here"),
    ("launch-host-semicolon", ["launch", "--dry-run", "--nodes", "2", "--hosts", "a;reboot,b"], 2, "not a host name"),
    ("launch-host-subshell", ["launch", "--dry-run", "--nodes", "2", "--hosts", "$(reboot),b"], 2, "not a host name"),
    ("launch-host-space", ["launch", "--dry-run", "--nodes", "2", "--hosts", "a b,c"], 2, "not a host name"),
    ("launch-host-empty", ["launch", "--dry-run", "--nodes", "2", "--hosts", "a,,b"], 2, "has an empty name"),
    ("launch-host-twice", ["launch", "--dry-run", "--nodes", "2", "--hosts", "a,a"], 2, "repeat a name"),
    ("launch-host-count", ["launch", "--dry-run", "--nodes", "2", "--hosts", "a"], 2, "give one host per node"),
    ("launch-master-addr", ["launch", "--dry-run", "--master-addr", "x;y"], 2, "not a host name"),
    ("launch-master-port", ["launch", "--dry-run", "--master-port", "70000"], 2, "master_port must be a TCP port"),
    ("launch-steps-negative", ["launch", "--dry-run", "--steps", "-5"], 2, "steps must be a positive number"),
    ("launch-save-every-negative", ["launch", "--dry-run", "--save-every", "-2"], 2, "save_every must be 0"),
    ("launch-lr-negative", ["launch", "--dry-run", "--lr", "-1"], 2, "learning rate must be a finite positive"),
    ("launch-changed-setup", ["launch", "--dry-run", "--model", "tiny", "--seq", "64", "--run-dir", "{dir}/run"], 2,
     "seq_len 4096 -> 64"),
    ("monitor-interval-zero", ["monitor", "--interval", "0"], 2, "--interval must be positive"),
    ("monitor-interval-nan", ["monitor", "--interval", "nan"], 2, "expected a finite number"),
    ("monitor-count-zero", ["monitor", "--count", "0"], 2, "--count must be a positive number"),
    ("models-unknown", ["models", "--model", "nope"], 2, "Known presets"),
    ("lora-rank-zero", ["lora", "--r", "0"], 2, "try r=8 or r=16"),
]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """An empty working folder with the files the cases point at: a file, a non-UTF-8 config and data, a run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_bytes(NOT_UTF8)
    (tmp_path / "bad" / "data.txt").write_bytes(NOT_UTF8)
    save_setup(TrainingSetup(model="tiny"), tmp_path / "run" / "setup.json")
    return tmp_path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(root.rglob("*"))}


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(("argv", "code", "says"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_a_bad_command_line_is_one_line_naming_the_fix_and_touches_no_file(folder, capsys, argv, code, says):
    before = snapshot(folder)
    assert main([a.replace("{dir}", str(folder)) for a in argv]) == code
    err = capsys.readouterr().err
    line = one_line(err)
    assert line.startswith("moekit") and ": error: " in line, line
    assert says in line, line
    assert snapshot(folder) == before


def test_json_errors_are_one_json_object_on_stderr(folder, capsys):
    assert main(["estimate", "--json", "--seq", "0"]) == 2
    error = json.loads(one_line(capsys.readouterr().err))
    assert error["command"] == "moekit estimate" and error["exit_code"] == 2
    assert "seq_len must be a positive integer" in error["error"]
    assert main(["plan", "--json", "--top", "0"]) == 2  # argparse's own errors too
    assert "expected a positive whole number" in json.loads(one_line(capsys.readouterr().err))["error"]


def last_line(err: str) -> str:
    """A run that started may have logged (DeepSpeed's own lines); its failure is the last line, alone."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_a_failed_run_exits_1_and_ctrl_c_130_with_the_resume_step(folder, capsys, monkeypatch):
    train_module = importlib.import_module("moekit.train")  # moekit.train is the function
    from moekit.errors import Interrupted
    from moekit.guard import TrainingGuardError

    def interrupted(*args, **kwargs):
        raise Interrupted("interrupted at step 7; rerun the same command to resume from step 4")

    monkeypatch.setattr(train_module, "train", interrupted)
    assert main(["train", "--model", "tiny"]) == 130
    assert last_line(capsys.readouterr().err) == (
        "moekit train: error: interrupted at step 7; rerun the same command to resume from step 4")

    def stuck(*args, **kwargs):
        raise TrainingGuardError("experts LoRA down_proj did not move at step 1")

    monkeypatch.setattr(train_module, "train", stuck)
    assert main(["train", "--model", "tiny"]) == 1
    assert last_line(capsys.readouterr().err) == "moekit train: error: experts LoRA down_proj did not move at step 1"


@pytest.mark.parametrize(
    ("argv", "says"),
    [(["estimate", "--gpu-mem", "nan"], "expected a finite number"),
     (["plan", "--top", "0"], "expected a positive whole number"),
     (["launch", "--dry-run", "--nodes", "2", "--hosts", "a;b,c"], "not a host name"),
     (["ds-config", "--out", "."], "is a folder")],
    ids=["estimate", "plan", "launch", "ds-config"],
)
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, argv, says):
    result = subprocess.run([sys.executable, "-m", "moekit", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and says in one_line(result.stderr)
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# The API: the same rules, as MoekitError (a ValueError) with the fix in the message
# --------------------------------------------------------------------------------------------


def _api_cases():
    from moekit.estimate import estimate
    from moekit.launch import TrainArgs, launch
    from moekit.plan import Constraints, ladder, plan
    from moekit.train import train

    tiny = TrainingSetup(model="tiny", gpus_per_node=1)
    return [
        ("estimate-of-a-name", lambda: estimate("mixtral-8x7b"), "estimate takes a TrainingSetup"),
        ("gpu-memory-string", lambda: TrainingSetup(gpu_memory_gb="40"), "gpu_memory_gb must be a finite number"),
        ("gpu-memory-nan", lambda: TrainingSetup(gpu_memory_gb=math.nan), "finite number"),
        ("host-memory-inf", lambda: TrainingSetup(host_memory_gb=math.inf), "finite number"),
        ("checkpointing-no", lambda: TrainingSetup(activation_checkpointing="no"), "must be True or False"),
        ("packing-one", lambda: TrainingSetup(packing=1), "must be True or False"),
        ("zero-stage-true", lambda: TrainingSetup(zero_stage=True), "zero_stage must be 0, 1, 2 or 3"),
        ("gpus-float", lambda: TrainingSetup(gpus_per_node=2.0), "gpus_per_node must be a positive integer"),
        ("model-number", lambda: TrainingSetup(model=7), "model must be a preset name"),
        ("lora-dict", lambda: TrainingSetup(lora={"r": 8}), "lora must be LoraSpec"),
        ("method-none", lambda: TrainingSetup(method=None), "method must be one of"),
        ("lora-rank-fraction", lambda: LoraSpec(r=8.5), "r must be a whole number"),
        ("lora-alpha-string", lambda: LoraSpec(alpha="32"), "lora_alpha must be a whole number"),
        ("lora-dropout-nan", lambda: LoraSpec(dropout=math.nan), "dropout must be a finite number"),
        ("lora-targets-number", lambda: LoraSpec(targets=5), "targets must be names"),
        ("constraints-gpus-zero", lambda: Constraints(gpus_per_node=0), "gpus_per_node must be a positive integer"),
        ("constraints-no-micro-batch", lambda: Constraints(micro_batches=()), "micro_batches must be a non-empty"),
        ("constraints-rank-fraction", lambda: Constraints(lora_ranks=(8.5,)), "lora_ranks must be"),
        ("constraints-offload-typo", lambda: Constraints(offloads=("optimiser",)), "offloads must be"),
        ("constraints-global-batch", lambda: Constraints(global_batch=-8), "global_batch must be a positive"),
        ("plan-top-zero", lambda: plan(Constraints(model="tiny", gpus_per_node=1), top=0), "top must be a positive"),
        ("plan-of-a-setup", lambda: plan(tiny), "plan takes Constraints"),
        ("ladder-unknown", lambda: ladder(tiny, ["pray"]), "unknown mitigations"),
        ("train-args-steps", lambda: TrainArgs(steps=0), "steps must be a positive number"),
        ("train-args-lr-nan", lambda: TrainArgs(lr=math.nan), "learning rate must be a finite positive"),
        ("launch-of-a-name", lambda: launch("tiny"), "launch takes a TrainingSetup"),
        ("launch-host", lambda: launch(tiny.replace(num_nodes=2), hosts=["a", "b c"]), "not a host name"),
        ("train-of-a-name", lambda: train("tiny"), "train takes a TrainingSetup"),
        ("train-steps", lambda: train(tiny, steps=-5), "steps must be a positive number"),
        ("setup-from-dict-unknown", lambda: TrainingSetup.from_dict({"gpus": 8}), "unknown setup fields gpus"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize(("call", "says"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_a_bad_api_call_raises_a_moekit_error_naming_the_fix(tmp_path, monkeypatch, call, says):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoekitError) as caught:
        call()
    assert says in str(caught.value)
    assert list(tmp_path.iterdir()) == []

