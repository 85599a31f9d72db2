"""Resident memory of a plain LoRA training loop on the CPU, step by step, in bf16 and in fp32.

A bf16 run's RSS climbs for ~100 steps and then stays flat; fp32 stays flat from the start. No
DeepSpeed here, so the climb is PyTorch's own (oneDNN kernels cached per matrix shape, and MoE
routing gives each expert a new token count every step); see docs/training.md, Limits.

    python benchmarks/cpu_rss.py --dtype bf16 --steps 600
    python benchmarks/cpu_rss.py --dtype fp32 --steps 600
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=8 python benchmarks/cpu_rss.py --dtype bf16 --steps 60

One dtype per process, so each starts from a fresh interpreter.
"""

from __future__ import annotations

import argparse

import psutil
import torch

from moekit.lora import apply_lora
from moekit.models import build_model
from moekit.training_setup import LoraSpec

MiB = 2**20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def rss_per_step(dtype: torch.dtype, steps: int, seq_len: int = 64, micro_batch: int = 2) -> list[int]:
    """RSS in bytes after each optimizer step of the tiny preset with LoRA on attention and experts."""
    torch.manual_seed(0)
    model = apply_lora(build_model("tiny", "cpu"), LoraSpec()).to(dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    process = psutil.Process()
    readings = []
    for _ in range(steps):
        ids = torch.randint(3, 250, (micro_batch, seq_len))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        readings.append(process.memory_info().rss)
    return readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="training dtype (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--every", type=int, default=None, help="print every Nth step (default: 20 values)")
    args = parser.parse_args()
    every = args.every or max(1, args.steps // 20)
    readings = rss_per_step(DTYPES[args.dtype], args.steps)
    shown = ", ".join(f"{r / MiB:.0f}" for r in readings[::every])
    print(f"{args.dtype}: RSS MiB every {every} steps: {shown}  (first {readings[0] / MiB:.0f}, last {readings[-1] / MiB:.0f})")


if __name__ == "__main__":
    main()
