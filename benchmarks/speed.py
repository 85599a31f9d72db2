"""Speed of the instant parts: one estimate (target < 1 ms, so a widget can call it on every slider move)
and a full planner search (target < 2 s).

    python benchmarks/speed.py
"""

from __future__ import annotations

import time

from moekit.estimate import estimate
from moekit.plan import constraints_from_setup, plan
from moekit.training_setup import TrainingSetup


def time_per_call(function, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def census_seconds(model: str) -> float:
    """Seconds for the exact census of a preset built on the meta device, after transformers' imports."""
    import importlib

    from moekit.configs import causal_lm_class
    from moekit.models import load_config, parameter_census

    importlib.import_module(causal_lm_class(load_config(model)).__module__)  # the one-time import
    start = time.perf_counter()
    parameter_census(model)
    return time.perf_counter() - start


def main() -> None:
    print(f"census: DeepSeek-V3 (671B, 61 layers) in {census_seconds('deepseek-v3') * 1e3:.0f} ms "
          "once its transformers modeling code is imported")
    setup = TrainingSetup(seq_len=12288, precision="fp16")
    first_start = time.perf_counter()
    estimate(setup)
    first = time.perf_counter() - first_start
    varied = [setup.replace(seq_len=s, zero_stage=z) for s in (2048, 4096, 8192, 12288) for z in (0, 1, 2, 3)]
    for s in varied:  # every model fact is computed once per model; warm them like a dashboard session would
        estimate(s)
    per_estimate = time_per_call(lambda: [estimate(s) for s in varied], 200) / len(varied)
    print(f"estimate: first call (builds the meta-device census) {first * 1e3:.1f} ms; then {per_estimate * 1e6:.1f} us per estimate")
    constraints = constraints_from_setup(setup, min_seq_len=11000)
    plan(constraints)
    start = time.perf_counter()
    result = plan(constraints)
    print(f"plan: {result.num_searched} setups searched in {(time.perf_counter() - start) * 1e3:.1f} ms; {result.num_fit} fit")


if __name__ == "__main__":
    main()
