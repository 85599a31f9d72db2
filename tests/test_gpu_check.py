"""scripts/gpu_check.py runs end to end at tiny scale on the CPU and writes its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--scale", "tiny", "--layers", "1", "2", "--seqs", "256", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_table_has_one_row_per_layers_seq_and_checkpointing(tiny_check):
    lines = (tiny_check / "gpu_check.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| layers")]
    assert [row.split(" | ")[:3] for row in rows] == [
        ["| 1", "256", "off"],
        ["| 1", "256", "on"],
        ["| 2", "256", "off"],
        ["| 2", "256", "on"],
    ]
    assert all(row.split(" | ")[7:9] == ["n/a", "n/a"] for row in rows)  # no CUDA columns on the CPU


def test_json_holds_estimate_simulate_and_measure_of_each_row(tiny_check):
    data = json.loads((tiny_check / "gpu_check.json").read_text())
    assert data["scale"] == "tiny" and data["machine"]["cuda"] is False
    rows = {(row["layers"], row["checkpointing"]): row for row in data["rows"]}
    assert len(rows) == 4
    for row in rows.values():
        assert [row[source]["source"] for source in ("estimate", "simulate", "measure")] == ["estimate", "simulate", "measure"]
        assert row["measure"]["per_gpu"]["total"] > 0 and row["cuda_max_allocated"] is None
    activations = {key: row["measure"]["per_gpu"]["activations"] for key, row in rows.items()}
    assert activations[(2, True)] < activations[(2, False)]
    assert activations[(1, False)] < activations[(2, False)]


def test_full_scale_without_a_gpu_says_to_use_tiny(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "--scale tiny" in result.stderr
