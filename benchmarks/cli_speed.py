"""Wall time of the quick commands beside ``python -c "import torch"`` (the target: every one of them faster).

    python benchmarks/cli_speed.py [--repeats 5]

Each command runs as a fresh process (what a user waits for), ``--repeats`` times; the table prints the
median and the fastest. The model facts the estimate needs are cached on disk (``moekit.cache``): the
"warm" rows run with a cache one earlier call filled; the "cold" row runs the article's estimate with an
empty cache (it builds Mixtral on the meta device once, importing torch and transformers).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "moekit --help": [sys.executable, "-m", "moekit", "--help"],
    "moekit estimate (the article's run)": [sys.executable, "-m", "moekit", "estimate"],
    "moekit plan": [sys.executable, "-m", "moekit", "plan"],
    "moekit models": [sys.executable, "-m", "moekit", "models"],
}


def seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cold_dir, tempfile.TemporaryDirectory() as warm_dir:
        warm = {**os.environ, "MOEKIT_CACHE_DIR": warm_dir}
        cold = {**os.environ, "MOEKIT_CACHE_DIR": cold_dir}
        for argv in COMMANDS.values():  # fill the warm cache (and the OS file cache) once
            seconds(argv, warm)
        print(f"{'command':<40}{'median s':>10}{'fastest s':>11}")
        for name, argv in COMMANDS.items():
            times = [seconds(argv, warm) for _ in range(args.repeats)]
            print(f"{name:<40}{statistics.median(times):>10.3f}{min(times):>11.3f}")
        cold_s = seconds(COMMANDS["moekit estimate (the article's run)"], cold)
        print(f"{'moekit estimate, empty cache (once)':<40}{cold_s:>10.3f}")


if __name__ == "__main__":
    main()
