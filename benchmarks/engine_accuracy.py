"""The estimate against the real DeepSpeed engine: every rank's peak under the allocator, on this machine.

Each setup runs ``moekit.measure_engine.measure_engine`` (2 ranks: CPU processes with gloo here, GPUs where
present; a few tens of seconds each on a laptop CPU) and prints each rank's peak over the optimizer steps,
the estimate it is compared with (``per_gpu`` without overhead, plus on the CPU the rank's share of
``per_host``) and ``real / estimate - 1``. The target is within 3% on every rank of every setup.

    python benchmarks/engine_accuracy.py                  # the issue's rows and a covering slice (~25 runs)
    python benchmarks/engine_accuracy.py --grid full      # ZeRO 0-3 x full/LoRA x bf16/fp32 x accum 1/2 x
                                                          # checkpointing x offload (about 100 runs: hours)
    python benchmarks/engine_accuracy.py --markdown docs/accuracy_engine_table.md
"""

from __future__ import annotations

import argparse
import itertools
import time

from moekit.measure_engine import EngineMeasureError, measure_engine
from moekit.training_setup import TrainingSetup

MiB = 2**20
TOLERANCE = 0.03


def _setup(**changes) -> TrainingSetup:
    base = dict(model="small", method="full", precision="bf16", zero_stage=2, gpus_per_node=2, seq_len=2048)
    return TrainingSetup(**{**base, **changes})


#: The table of issue 14, re-measured.
ISSUE_ROWS = [
    _setup(seq_len=512),
    _setup(seq_len=4096),
    _setup(method="lora", seq_len=4096),
    _setup(zero_stage=3, seq_len=2048, micro_batch=2),
    _setup(method="lora", zero_stage=3, seq_len=4096, activation_checkpointing=True),
    _setup(zero_stage=1, grad_accum=2),
    _setup(zero_stage=0, precision="fp32"),
]


def full_grid() -> list[TrainingSetup]:
    """ZeRO 0/1/2/3 x full/LoRA x bf16/fp32 x accumulation 1/2 x checkpointing x offload none/optimizer."""
    setups = []
    for stage, method, precision, accum, ckpt, offload in itertools.product(
        (0, 1, 2, 3), ("full", "lora"), ("bf16", "fp32"), (1, 2), (False, True), ("none", "optimizer")
    ):
        if offload != "none" and stage == 0:
            continue  # DeepSpeed offloads the partitioned optimizer: stage >= 1
        micro_batch = 2 if (stage + accum) % 2 else 1
        setups.append(_setup(model="small", method=method, precision=precision, zero_stage=stage, grad_accum=accum,
                             activation_checkpointing=ckpt, offload=offload, micro_batch=micro_batch, seq_len=1024))
    return setups


def covering_grid() -> list[TrainingSetup]:
    """Every value of every knob at least once, on both presets, besides the issue's rows."""
    return ISSUE_ROWS + [
        _setup(method="lora", zero_stage=0, seq_len=2048, micro_batch=2),
        _setup(method="lora", zero_stage=1, precision="fp32", seq_len=1024),
        _setup(method="full", zero_stage=2, precision="fp32", seq_len=1024, grad_accum=2),
        _setup(method="lora", zero_stage=2, grad_accum=2, activation_checkpointing=True, micro_batch=2),
        _setup(method="lora", zero_stage=2, offload="optimizer"),
        _setup(method="full", zero_stage=2, offload="optimizer", seq_len=1024),
        _setup(method="full", zero_stage=3, activation_checkpointing=True, seq_len=4096),
        _setup(method="full", zero_stage=3, precision="fp32", seq_len=1024),
        _setup(method="lora", zero_stage=3, offload="optimizer", grad_accum=2),
        # a small bucket, so that ZeRO-3 LoRA's fp32 adapter inputs weigh (moekit.traps.adapter_precision)
        _setup(method="lora", zero_stage=3, offload="optimizer", grad_accum=2, reduce_bucket_size=2**24),
        _setup(method="lora", zero_stage=3, offload="optimizer", grad_accum=2, reduce_bucket_size=2**24,
               autocast_adapter_dtype=False),  # ... and peft told not to upcast them
        _setup(method="full", zero_stage=1, activation_checkpointing=True, micro_batch=2),
        _setup(method="full", zero_stage=0, grad_accum=2, activation_checkpointing=True),
        _setup(model="tiny", method="full", zero_stage=2, seq_len=2048, micro_batch=2),
        _setup(model="tiny", method="lora", zero_stage=3, seq_len=2048, grad_accum=2),
        _setup(model="tiny", method="full", zero_stage=0, precision="fp32", seq_len=2048),
    ]


def describe(setup: TrainingSetup) -> str:
    method = "LoRA" if setup.uses_lora else "full"
    parts = [setup.model, method, setup.precision, f"ZeRO-{setup.zero_stage}", f"{setup.seq_len} x {setup.micro_batch}"]
    if setup.grad_accum > 1:
        parts.append(f"accum {setup.grad_accum}")
    if setup.activation_checkpointing:
        parts.append("ckpt")
    if setup.offload != "none":
        parts.append(f"offload {setup.offload}")
    if not setup.autocast_adapter_dtype:
        parts.append("adapters not upcast")
    if setup.reduce_bucket_size is not None:
        parts.append(f"bucket {setup.reduce_bucket_size:.3g}")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("covering", "issue", "full"), default="covering")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="also write the table as markdown here")
    args = parser.parse_args()
    setups = {"covering": covering_grid, "issue": lambda: ISSUE_ROWS, "full": full_grid}[args.grid]()
    header = "| setup (2 ranks) | rank 0 MiB | rank 1 MiB | estimate MiB | real / estimate - 1 |"
    lines = [header, "|---|---:|---:|---:|---|"]
    print(header, flush=True)
    worst, failures, began = 0.0, [], time.time()
    for setup in setups:
        try:
            result = measure_engine(setup, steps=args.steps, progress=False)
        except EngineMeasureError as err:
            failures.append(describe(setup))
            line = f"| {describe(setup)} | failed: {str(err).splitlines()[0]} | | | |"
        else:
            errors = [result.error(r.rank) for r in result.ranks]
            worst = max(worst, *map(abs, errors))
            peaks = " | ".join(f"{r.step_peak_bytes / MiB:.1f}" for r in result.ranks)
            flags = " ".join(f"{e:+.1%}" + ("" if abs(e) <= TOLERANCE else " **") for e in errors)
            line = f"| {describe(setup)} | {peaks} | {result.estimate_bytes / MiB:.1f} | {flags} |"
        lines.append(line)
        print(line, flush=True)
    summary = (f"{len(setups)} setups in {time.time() - began:.0f} s; largest |real / estimate - 1| {worst:.1%}; "
               f"{sum(1 for line in lines[2:] if '**' in line)} rows beyond {TOLERANCE:.0%} (marked **)"
               + (f"; failed: {', '.join(failures)}" if failures else ""))
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(lines) + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
