"""The estimate against the fake-tensor simulation on the full-width presets of every MoE family.

Each preset is truncated to its dense first layers plus 2 MoE layers (full width, real head counts, real
expert counts) and simulated on fake tensors; the estimate of the same truncated model is printed beside
it: activations (saved for backward at the end of forward) and weights, full fine-tune and LoRA on
attention + experts, bf16, one rank without ZeRO.

    python benchmarks/families.py [--seq 2048] [--models qwen3-30b-a3b,deepseek-v3]
"""

from __future__ import annotations

import argparse
import time
import warnings

from moekit.arch import arch_of
from moekit.estimate import estimate
from moekit.simulate import simulate
from moekit.training_setup import TrainingSetup

GiB = 2**30
PRESETS = ("qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v2-lite", "deepseek-v3", "gpt-oss-20b", "gpt-oss-120b",
           "glm-4.5-air", "phi-3.5-moe", "mixtral-8x7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--models", default=",".join(PRESETS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' checkpointing rename
    print(f"{'model':<18}{'method':<7}{'layers':>7}{'est act GiB':>13}{'sim act GiB':>13}{'error':>9}"
          f"{'weights equal':>15}{'sim s':>7}  note")
    for model in args.models.split(","):
        num_layers = arch_of(model).num_dense_layers + 2
        for method in ("full", "lora"):
            setup = TrainingSetup(model=model, method=method, seq_len=args.seq, zero_stage=0, gpus_per_node=1)
            est = estimate(setup, num_layers=num_layers)
            start = time.perf_counter()
            sim = simulate(setup, num_layers=num_layers, progress=False)
            seconds = time.perf_counter() - start
            act_est, act_sim = est.per_gpu["activations"], sim.per_gpu["activations"]
            note = "probe-calibrated" if "probe" in est.notes.get("activations", "") else ""
            print(f"{model:<18}{method:<7}{num_layers:>7}{act_est / GiB:>13.3f}{act_sim / GiB:>13.3f}"
                  f"{100 * (act_est / act_sim - 1):>+8.2f}%{str(est.per_gpu['weights'] == sim.per_gpu['weights']):>15}"
                  f"{seconds:>7.1f}  {note}", flush=True)


if __name__ == "__main__":
    main()
