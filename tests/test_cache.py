"""The facts moekit ships for its presets are the facts the current code computes, and they spare torch."""

import json
import os
import subprocess
import sys

from moekit.cache import SHIPPED_FACTS, compute_shipped_facts, shipped_facts


def test_the_shipped_preset_facts_equal_what_the_current_code_computes():
    shipped = shipped_facts()
    assert len(shipped) > 50  # every preset, full and LoRA
    assert compute_shipped_facts() == shipped, f"stale {SHIPPED_FACTS}: run `python -m moekit.cache` and commit it"


def test_a_first_estimate_and_census_of_a_preset_import_neither_torch_nor_transformers(tmp_path):
    code = (
        "import contextlib, io, sys, json\n"
        "from moekit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main(['models', '--model', 'deepseek-v3'])  # 671B parameters, counted from the shipped census\n"
        "main(['estimate', '--seq', '12288', '--precision', 'fp16', '--json'])\n"
        "print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules]), file=sys.stderr)\n"
    )
    env = {**os.environ, "MOEKIT_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stderr.strip().splitlines()[-1]) == [False, False]
    assert json.loads(result.stdout)["per_gpu"]["total"] > 40 * 2**30  # the article's run, computed in full
