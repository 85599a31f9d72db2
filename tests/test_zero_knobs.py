"""ZeRO's size knobs: DeepSpeed's defaults read from DeepSpeed itself, shipped for a fast estimate, and each knob
checked where it lands (setup, config, estimate)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.training_setup import SetupError, TrainingSetup
from moekit.zero_knobs import KNOBS, SHIPPED_DEFAULTS, deepspeed_version, read_deepspeed_defaults, zero_knobs


def test_shipped_defaults_are_what_the_installed_deepspeed_says():
    from importlib import resources

    shipped = json.loads(resources.files("moekit").joinpath(SHIPPED_DEFAULTS).read_text())
    assert shipped == {"deepspeed": deepspeed_version(), "defaults": read_deepspeed_defaults()}, (
        "DeepSpeed's defaults changed: run `python -m moekit.zero_knobs` to ship the new ones"
    )
    assert shipped["defaults"]["reduce_bucket_size"] == 500_000_000  # what DeepSpeed 0.19's config.py says


def test_a_fresh_estimate_reads_the_defaults_without_importing_deepspeed(tmp_path):
    code = ("import sys\nfrom moekit.estimate import estimate\nfrom moekit.training_setup import TrainingSetup\n"
            "estimate(TrainingSetup(model='tiny', zero_stage=3))\n"
            "print(sorted({'torch', 'deepspeed'} & set(sys.modules)))")
    env = {"MOEKIT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_setup_values_win_over_defaults_and_bad_values_are_one_line_errors():
    knobs = zero_knobs(TrainingSetup(reduce_bucket_size=5_000_000, sub_group_size=7))
    assert knobs.reduce_bucket_size == 5_000_000 and knobs.sub_group_size == 7
    assert knobs.allgather_bucket_size == read_deepspeed_defaults()["allgather_bucket_size"]
    assert list(KNOBS) == [name for name in TrainingSetup.__dataclass_fields__ if name in KNOBS]
    with pytest.raises(SetupError, match="reduce_bucket_size must be a whole number"):
        TrainingSetup(reduce_bucket_size=-1)
    with pytest.raises(SetupError, match="sub_group_size must be at least 1"):
        TrainingSetup(sub_group_size=0)
    assert "+reduce_bucket_size=5,000,000" in TrainingSetup(reduce_bucket_size=5_000_000).describe()
