"""The moekit command line: tables, JSON, and one-line errors for user mistakes."""

import json
import subprocess
import sys
from pathlib import Path

from moekit.cli import main


def test_models_json_lists_every_preset(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    mixtral = rows["mixtral-8x7b"]
    assert mixtral["num_params"] == 46_702_792_704
    assert mixtral["num_active_params"] == 12_879_925_248
    assert (mixtral["num_experts"], mixtral["experts_per_token"]) == (8, 2)
    assert rows["mistral-7b"]["num_experts"] == 0


def test_models_table_is_readable(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704" in out and "active/token" in out


def test_unknown_model_is_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "models", "--model", "nope"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Known presets:" in result.stderr and "Traceback" not in result.stderr


def test_console_script_help_explains():
    console_script = Path(sys.executable).parent / "moekit"  # installed beside this interpreter
    result = subprocess.run([str(console_script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "models" in result.stdout


def test_ds_config_stdout_is_pure_json_with_the_nvme_offload_flags():
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "ds-config", "--zero", "3", "--offload", "optimizer+params",
         "--offload-device", "nvme", "--nvme-path", "/local/nvme"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    zero = json.loads(result.stdout)["zero_optimization"]  # DeepSpeed's own log lines went to stderr
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "nvme"
    assert zero["offload_param"]["nvme_path"] == "/local/nvme"


def test_nvme_offload_without_a_path_says_which_flag_is_missing(capsys):
    assert main(["estimate", "--zero", "3", "--offload", "optimizer+params", "--offload-device", "nvme"]) == 2
    assert "needs nvme_path" in capsys.readouterr().err


def test_the_article_run_is_told_to_deal_with_its_weights_first(capsys):
    assert main(["estimate"]) == 0
    out = capsys.readouterr().out
    assert "the weights alone (87.4 GiB per GPU) exceed the 40 GiB card" in out and "ZeRO-3 (--zero 3)" in out
    assert "largest category" not in out  # activations are larger, but nothing helps until the weights fit


def test_host_ram_is_part_of_the_one_fit_verdict(capsys):
    argv = ["estimate", "--zero", "3", "--offload", "optimizer+params", "--checkpointing", "--json"]
    assert main([*argv, "--host-mem", "1"]) == 0
    short = json.loads(capsys.readouterr().out)
    assert (short["gpu_fits"], short["host_fits"], short["fits"]) == (True, False, False)
    assert sum(short["per_host"].values()) > 80 * 2**30  # the offloaded weights alone
    assert main([*argv, "--host-mem", "512"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_plan_keeps_the_users_rank_unless_asked_and_says_how_it_ranks(capsys):
    assert main(["plan", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)
    ranks = {c["setup"]["lora"]["r"] for c in kept["fits"] if c["setup"]["method"] == "lora"}
    assert ranks == {16} and "relative" in kept["ranking"] and "not a promise" in kept["ranking"]
    assert main(["plan", "--json", "--ranks", "8,64", "--top", "50"]) == 0
    asked = json.loads(capsys.readouterr().out)
    assert {c["setup"]["lora"]["r"] for c in asked["fits"] if c["setup"]["method"] == "lora"} == {8, 64}


def test_plan_no_offload_keeps_offload_out_of_the_search_and_the_ladder(capsys):
    assert main(["plan", "--json", "--no-offload", "--top", "50"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {c["setup"]["offload"] for c in result["fits"]} == {"none"}
    assert not [r for r in result["ladder"] if "offload" in r["change"]]
