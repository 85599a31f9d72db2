"""The launch commands: 8 GPUs, 2 nodes x 8 GPUs, quoting, the fit check, and one real run on CPU processes."""

from __future__ import annotations

import json
import shlex
import socket
import sys
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.launch import LaunchError, TrainArgs, launch, run_plan
from moekit.train import load_setup, read_log
from moekit.training_setup import TrainingSetup
from moekit.zero import validate_ds_config

REPO = Path(__file__).resolve().parents[1]


def fitting_setup(**changes) -> TrainingSetup:
    """Mixtral 8x7B LoRA r=8 on attention, ZeRO-3, checkpointing, seq 2048 on 80 GB cards: it fits."""
    base = dict(zero_stage=3, gpu_memory_gb=80, seq_len=2048, activation_checkpointing=True)
    return TrainingSetup(**{**base, **changes}).replace(lora_r=8, lora_targets=("attention",))


def test_single_node_8_gpus_command_quotes_a_path_with_a_space(tmp_path):
    run_dir = tmp_path / "my runs" / "mixtral lora"
    plan = launch(fitting_setup(), run_dir=run_dir, train_args=TrainArgs(steps=100, save_every=50, lr=1e-4))
    script = ["--module", "moekit.train", "--setup-json", str(run_dir / "setup.json"), "--ds-config",
              str(run_dir / "ds_config.json"), "--output-dir", str(run_dir), "--steps", "100", "--save-every", "50",
              "--seed", "0", "--lr", "0.0001"]
    assert plan.deepspeed_argv() == ["deepspeed", "--num_gpus", "8", "--master_port", "29500", *script]
    line = plan.commands()["deepspeed"][0]
    assert shlex.split(line) == plan.deepspeed_argv()
    assert f"--setup-json '{run_dir}/setup.json'" in line
    (torchrun,) = plan.commands()["torchrun"]
    assert torchrun.startswith("torchrun --standalone --nproc_per_node 8 -m moekit.train --setup-json '")
    assert shlex.split(torchrun)[6:] == script[2:]
    assert "hostfile" not in plan.files and plan.fits is True


def test_two_nodes_of_8_gpus_get_a_hostfile_and_one_torchrun_per_node(tmp_path):
    run_dir = tmp_path / "run dir"
    setup = fitting_setup(num_nodes=2)
    plan = launch(setup, run_dir=run_dir, hosts=["gpu-a", "gpu-b"], master_port=29611)
    assert plan.hostfile_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    argv = plan.deepspeed_argv()
    assert argv[:12] == ["deepspeed", "--hostfile", str(run_dir / "hostfile"), "--num_nodes", "2", "--master_addr", "gpu-a",
                         "--num_gpus", "8", "--master_port", "29611", "--module"]
    assert shlex.split(plan.commands()["deepspeed"][0]) == argv
    torchruns = [shlex.split(line) for line in plan.commands()["torchrun"]]
    assert [cmd[cmd.index("--node_rank") + 1] for cmd in torchruns] == ["0", "1"]
    for cmd in torchruns:
        assert cmd[:5] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"]
        assert cmd[cmd.index("--master_addr") + 1] == "gpu-a" and cmd[cmd.index("--master_port") + 1] == "29611"

    files = plan.write()
    assert files["hostfile"].read_text() == "gpu-a slots=8\ngpu-b slots=8\n"
    assert load_setup(files["setup"]) == setup
    config = json.loads(files["ds_config"].read_text())
    validate_ds_config(config, 16)
    assert config["train_batch_size"] == 16 and config["optimizer"]["type"] == "AdamW"


def test_dry_run_cli_writes_the_files_and_prints_the_commands(tmp_path, capsys):
    run_dir = tmp_path / "two nodes"
    argv = ["launch", "--zero", "3", "--gpu-mem", "80", "--seq", "2048", "--checkpointing", "--r", "8", "--targets", "attention",
            "--nodes", "2", "--hosts", "gpu-a,gpu-b", "--run-dir", str(run_dir), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "-> fits" in out and "#   gpu-b slots=8" in out
    lines = [line for line in out.splitlines() if line.startswith(("deepspeed ", "torchrun "))]
    assert len(lines) == 3
    assert shlex.split(lines[0])[:3] == ["deepspeed", "--hostfile", str(run_dir / "hostfile")]
    assert sorted(p.name for p in run_dir.iterdir()) == ["accelerate.yaml", "ds_config.json", "hostfile", "setup.json"]
    accelerate_lines = [shlex.split(line) for line in out.splitlines() if line.startswith("accelerate launch")]
    assert [a[a.index("--machine_rank") + 1] for a in accelerate_lines] == ["0", "1"]
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(run_dir / "accelerate.yaml"))  # accelerate launch reads it as written
    assert (config.num_processes, config.num_machines, config.main_process_ip) == (16, 2, "gpu-a")
    assert config.deepspeed_config["deepspeed_config_file"] == str((run_dir / "ds_config.json").resolve())


def test_a_setup_that_does_not_fit_is_refused_unless_forced(tmp_path, capsys):
    plan = launch(TrainingSetup(method="full"), run_dir=tmp_path / "full")  # Mixtral full fine-tune, ZeRO-2, 40 GB
    assert plan.fits is False and "DOES NOT FIT" in plan.describe()
    with pytest.raises(LaunchError, match="refusing to launch: estimate: .* GiB per GPU of 40 GB -> DOES NOT FIT"):
        run_plan(plan)
    assert not (tmp_path / "full").exists()  # nothing written, nothing started
    assert main(["launch", "--method", "full", "--run-dir", str(tmp_path / "cli")]) == 2
    assert "--force" in capsys.readouterr().err


def test_hosts_must_match_the_nodes(tmp_path):
    with pytest.raises(LaunchError, match="3 hosts given .* 2 nodes"):
        launch(fitting_setup(num_nodes=2), run_dir=tmp_path, hosts=["a", "b", "c"])


@pytest.mark.slow
def test_launch_runs_the_same_command_as_cpu_processes_zero2_offload(tmp_path):
    """Without --dry-run: `deepspeed --num_gpus 2` on a machine without GPUs, ZeRO-2 + optimizer offload (CPU Adam)."""
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "cpu run"
    from moekit.lessons import training_env

    env = {**training_env(), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "moekit.cli", "launch", "--model", "tiny", "--method", "full", "--precision", "fp32",
            "--zero", "2", "--offload", "optimizer", "--gpus", "2", "--seq", "64", "--micro-batch", "2", "--steps", "4",
            "--lr", "1e-3", "--run-dir", str(run_dir), "--master-port", str(port)]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    printed = [line for line in result.stdout.splitlines() if line.startswith("deepspeed ")][0]
    assert shlex.split(printed)[:3] == ["deepspeed", "--num_gpus", "2"]
    log = read_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["loss"] < log[0]["loss"] - 0.05
    config = json.loads((run_dir / "ds_config.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    checks = [json.loads(line) for line in (run_dir / "guard.jsonl").read_text().splitlines()]
    expected = {"embeddings", "attention", "router", "experts gate_up_proj", "experts down_proj", "norms", "lm_head"}
    assert all({g for g, moved in c["moved"].items() if moved} == expected for c in checks)


def test_run_options_survive_the_trip_through_a_ranks_command_line_and_the_cli_shares_their_defaults():
    from moekit.cli import build_parser as cli_parser
    from moekit.run_options import RunOptions
    from moekit.train import build_parser as rank_parser

    options = RunOptions(steps=7, save_every=3, data="d.txt", weights="w", lr=1e-3, seed=5)
    assert RunOptions.from_args(rank_parser().parse_args(["--setup-json", "s.json", *options.argv()])) == options
    assert RunOptions.from_args(rank_parser().parse_args(["--setup-json", "s.json"])) == RunOptions()
    for command in ("train", "launch"):
        assert RunOptions.from_args(cli_parser().parse_args([command])) == RunOptions()
        assert RunOptions.from_args(cli_parser().parse_args([command, *options.argv()])) == options
