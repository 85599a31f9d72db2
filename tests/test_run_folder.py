"""Run folders never mix two runs: resume, changed setups, --no-resume, kills, corrupt checkpoints, Ctrl-C, NaN.

Real DeepSpeed runs on the tiny preset, one CPU rank. To pay DeepSpeed's start-up once, a whole sequence
of ``train`` calls runs inside one subprocess (the script below) and reports what it saw as JSON; the
tests then check every step of the sequence. Two processes in all: the second one resumes after the
first was SIGKILLed right after a ``--no-resume`` run saved its step 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import deepspeed_env, output_of

from moekit.train import check_run_folder, read_log, save_setup
from moekit.training_setup import TrainingSetup

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import contextlib, io, json, sys
from pathlib import Path
import torch
from moekit.train import read_log, train
from moekit.training_setup import TrainingSetup

out, phase = Path(sys.argv[1]), sys.argv[2]
setup = TrainingSetup(model="tiny", method="lora", precision="bf16", zero_stage=2, gpus_per_node=1, seq_len=64,
                      micro_batch=2)
seen = {}

def run(name, s=setup, **kw):
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        try:
            train(s, output_dir=out, lr=1e-2, progress=False, **kw)
            error = None
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
    seen[name] = {"said": said.getvalue(), "error": error, "log": [r["step"] for r in read_log(out)]}
    print(json.dumps({name: seen[name]}), file=sys.stderr, flush=True)

def interrupt_on_forward(n):
    calls = []
    def hook(model):
        def pre(module, args, kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
        model.register_forward_pre_hook(pre, with_kwargs=True)
    return hook

def poison(model):
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "embed_tokens" in n).fill_(float("nan"))

if phase == "one":
    run("first", steps=4, save_every=2)
    run("again", steps=4, save_every=2)
    before = (out / "setup.json").read_bytes()
    run("rank8", s=setup.replace(lora_r=8, lora_alpha=16), steps=6)
    run("seq32", s=setup.replace(seq_len=32), steps=6)
    seen["setup_unchanged"] = (out / "setup.json").read_bytes() == before
    (out / "checkpoints" / "step000004" / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    run("corrupt", steps=6, save_every=2)
    run("ctrl_c", steps=9, save_every=2, model_hook=interrupt_on_forward(2))
    run("nan", steps=9, save_every=2, model_hook=poison)
    seen["nan_in_log"] = "NaN" in (out / "log.jsonl").read_text()
    print("SEEN " + json.dumps(seen), flush=True)
    run("no_resume", steps=4, save_every=2, resume=False, kill_after_checkpoint=2)  # SIGKILLs this process
else:
    run("after_kill", steps=3, save_every=2)
    print("SEEN " + json.dumps(seen), flush=True)
'''


def run_phase(out: Path, phase: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out), phase], env=deepspeed_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("SEEN ")]
    assert lines, output_of(result)
    return result, json.loads(lines[-1].removeprefix("SEEN "))


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    first, seen_one = run_phase(out, "one")
    second, seen_two = run_phase(out, "two")
    return out, first, seen_one, second, seen_two


@pytest.mark.slow
def test_resume_refuses_a_changed_setup_naming_the_fields_and_says_when_nothing_is_left(sequence):
    _, _, seen, _, _ = sequence
    assert seen["first"]["error"] is None and seen["first"]["log"] == [1, 2, 3, 4]
    assert "already at step 4: nothing to do" in seen["again"]["said"] and seen["again"]["log"] == [1, 2, 3, 4]
    assert "lora.r 16 -> 8" in seen["rank8"]["error"] and "lora.alpha 32 -> 16" in seen["rank8"]["error"]
    assert "seq_len 64 -> 32" in seen["seq32"]["error"]
    assert seen["setup_unchanged"] and seen["seq32"]["log"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(sequence):
    _, _, seen, _, _ = sequence
    corrupt = seen["corrupt"]
    assert corrupt["error"] is None, corrupt
    assert "checkpoint step000004 cannot be loaded" in corrupt["said"]
    assert "resuming from step 2" in corrupt["said"]
    assert corrupt["log"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_ctrl_c_names_the_step_and_the_checkpoint_to_resume_from_and_nan_never_reaches_the_log(sequence):
    _, _, seen, _, _ = sequence
    assert seen["ctrl_c"]["error"] == (
        "Interrupted: interrupted at step 8; rerun the same command to resume from step 6")
    assert seen["ctrl_c"]["log"] == [1, 2, 3, 4, 5, 6, 7]
    assert seen["nan"]["error"].startswith("TrainingFailed: the loss is nan at step 7")
    assert seen["nan"]["log"] == [1, 2, 3, 4, 5, 6] and not seen["nan_in_log"]


@pytest.mark.slow
def test_no_resume_moves_the_old_run_aside_and_a_killed_new_run_resumes_itself_not_the_old_one(sequence):
    out, first, _, second, seen = sequence  # (its 'moved the old run' line died with the SIGKILLed process)
    assert first.returncode != 0  # SIGKILL after the new run's step 2
    aside = [p for p in out.parent.iterdir() if p.name.startswith("run-old-")]
    assert len(aside) == 1 and [r["step"] for r in read_log(aside[0])] == [1, 2, 3, 4, 5, 6]
    after = seen["after_kill"]
    assert after["error"] is None, output_of(second)
    assert "resuming from step 2" in after["said"] and after["log"] == [1, 2, 3]


def test_a_folder_of_other_files_or_a_file_is_refused_before_anything_is_written(tmp_path):
    setup = TrainingSetup(model="tiny")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and not a moekit run .*notes.txt"):
        check_run_folder(tmp_path, setup, resume=True)
    with pytest.raises(ValueError, match="is a file"):
        check_run_folder(tmp_path / "notes.txt", setup, resume=True)
    save_setup(setup, tmp_path / "run" / "setup.json")
    with pytest.raises(ValueError, match=r"gpus_per_node 8 -> 2"):
        check_run_folder(tmp_path / "run", setup.replace(gpus_per_node=2), resume=True)
    # the card's and the host's memory only feed the fit check: changing them resumes the same run
    assert check_run_folder(tmp_path / "run", setup.replace(gpu_memory_gb=80, host_memory_gb=512), resume=True).start_step == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]


def test_resume_candidates_skip_a_latest_that_names_a_missing_folder(tmp_path):
    from moekit.train import checkpoint_steps

    checkpoints = tmp_path / "checkpoints"
    assert checkpoint_steps(tmp_path) == []
    for step in (2, 4):
        (checkpoints / f"step{step:06d}").mkdir(parents=True)
    assert checkpoint_steps(tmp_path) == []  # no `latest`: DeepSpeed never finished a save
    (checkpoints / "latest").write_text("step000004")
    assert checkpoint_steps(tmp_path) == [4, 2]
    (checkpoints / "latest").write_text("step000006")  # names a folder that is not there
    assert checkpoint_steps(tmp_path) == [4, 2]
    (checkpoints / "latest").write_text("garbage")
    assert checkpoint_steps(tmp_path) == [4, 2]
    (checkpoints / "latest").write_text("step000002")  # older than a folder left by a half-written save
    assert checkpoint_steps(tmp_path) == [2]
