"""Measure real GPU peaks of Mixtral 8x7B, truncated to 1-2 layers at full width, beside moekit's predictions.

Each row is one LoRA training step (r=16 on attention and experts, bf16, SDPA, batch 1, one GPU, no
ZeRO) of the model cut to a few decoder layers. A layer keeps its full width, so the per-layer memory
is the full model's (weights, LoRA states, activations); the difference of the 1- and 2-layer rows is
one layer's share. For every row it prints, in GiB:

- ``estimate``: ``moekit.estimate.estimate(setup, num_layers=...)``, allocated (total minus its
  CUDA-context/allocator overhead) and total;
- ``simulate``: ``moekit.simulate.simulate`` (the same step on FakeTensors);
- ``measure``: the real step (``moekit.profile.measure_step``), MemTracker's peak of live tensors;
- on CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the step, and per
  phase (model ready, forward, backward, optimizer step) in the JSON.

    python scripts/gpu_check.py --out results/gpu_check            # CUDA machine, about 4 minutes
    python scripts/gpu_check.py --scale tiny --out /tmp/gpu_check   # any CPU, seconds (the tests run this)

Writes ``gpu_check.json`` (every breakdown and phase) and ``gpu_check.md`` (the table) to --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.breakdown import Breakdown, GiB
from moekit.estimate import estimate
from moekit.profile import measure_step
from moekit.simulate import simulate
from moekit.training_setup import LoraSpec, TrainingSetup


@dataclass(frozen=True)
class Scale:
    model: str
    device: str
    layers: tuple[int, ...]
    seqs: tuple[int, ...]
    unit: str = "GiB"

    @property
    def unit_bytes(self) -> int:
        return {"GiB": 2**30, "MiB": 2**20}[self.unit]


SCALES = {
    "full": Scale(model="mixtral-8x7b", device="cuda", layers=(1, 2), seqs=(2048, 4096, 8192, 12288)),
    "tiny": Scale(model="tiny", device="cpu", layers=(1, 2), seqs=(256, 512), unit="MiB"),
}


def setup_for(model: str, seq_len: int, checkpointing: bool, gpu_memory_gb: float) -> TrainingSetup:
    """The checked setup: the article's LoRA (r=16, attention + experts) on one GPU, batch 1."""
    return TrainingSetup(
        model=model,
        method="lora",
        lora=LoraSpec(r=16, alpha=32, targets=("attention", "experts")),
        precision="bf16",
        zero_stage=0,
        gpus_per_node=1,
        gpu_memory_gb=gpu_memory_gb,
        seq_len=seq_len,
        micro_batch=1,
        activation_checkpointing=checkpointing,
        attn_implementation="sdpa",
    )


@dataclass
class Row:
    layers: int
    seq_len: int
    checkpointing: bool
    estimate: Breakdown
    simulate: Breakdown
    measure: Breakdown  # on CUDA its total and overhead include the allocator's reserve
    tracked_peak_bytes: int  # MemTracker's peak of live tensors in the real step
    cuda_phases: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def cuda_peak(self, key: str) -> int | None:
        return max(values[key] for values in self.cuda_phases.values()) if self.cuda_phases else None

    def as_dict(self) -> dict:
        return {
            "layers": self.layers,
            "seq_len": self.seq_len,
            "checkpointing": self.checkpointing,
            "estimate": self.estimate.as_dict(),
            "simulate": self.simulate.as_dict(),
            "measure": self.measure.as_dict(),
            "measure_tracked_peak": self.tracked_peak_bytes,
            "cuda_phases": self.cuda_phases,
            "cuda_max_allocated": self.cuda_peak("max_allocated"),
            "cuda_max_reserved": self.cuda_peak("max_reserved"),
            "seconds": round(self.seconds, 2),
        }


def check_row(scale: Scale, layers: int, seq_len: int, checkpointing: bool, gpu_memory_gb: float) -> Row:
    """Estimate, simulate and really run one setup."""
    began = time.monotonic()
    setup = setup_for(scale.model, seq_len, checkpointing, gpu_memory_gb)
    predicted = estimate(setup, num_layers=layers)
    simulated = simulate(setup, num_layers=layers, progress=False)
    if scale.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    measured = measure_step(setup, num_layers=layers, device=scale.device)
    tracked_peak = sum(measured.phases["peak"].values())
    row = Row(layers, seq_len, checkpointing, predicted, simulated, measured.breakdown, tracked_peak, measured.cuda)
    row.seconds = time.monotonic() - began
    return row


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

COLUMNS = (
    "layers",
    "seq",
    "ckpt",
    "estimate alloc",
    "estimate total",
    "simulate",
    "measure",
    "CUDA max alloc",
    "CUDA max reserved",
    "act estimate",
    "act simulate",
    "act measure",
)


def table_row(row: Row, unit_bytes: int) -> list[str]:
    def cell(num_bytes: int | None) -> str:
        return "n/a" if num_bytes is None else f"{num_bytes / unit_bytes:.2f}"

    overhead = row.estimate.per_gpu["overhead"]
    return [
        str(row.layers),
        str(row.seq_len),
        "on" if row.checkpointing else "off",
        cell(row.estimate.total_bytes - overhead),
        cell(row.estimate.total_bytes),
        cell(row.simulate.total_bytes),
        cell(row.tracked_peak_bytes),
        cell(row.cuda_peak("max_allocated")),
        cell(row.cuda_peak("max_reserved")),
        cell(row.estimate.per_gpu["activations"]),
        cell(row.simulate.per_gpu["activations"]),
        cell(row.measure.per_gpu["activations"]),
    ]


def markdown_table(rows: list[Row], unit_bytes: int) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(row, unit_bytes)) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpu_memory_bytes": properties.total_memory}
    return info


def write_outputs(out: Path, scale_name: str, rows: list[Row], seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    scale = SCALES[scale_name]
    header = (
        f"# GPU check: {SCALES[scale_name].model}, LoRA r=16 attention+experts, bf16, sdpa, batch 1\n\n"
        f"Scale `{scale_name}` on {machine().get('gpu', 'the CPU')}, {seconds:.0f} s. All figures {scale.unit} per GPU; "
        "`estimate alloc` leaves out the estimate's CUDA context and allocator reserve, so it compares with "
        "`CUDA max alloc`; `measure` is MemTracker's peak of live tensors in the same real step.\n\n"
    )
    (out / "gpu_check.md").write_text(header + markdown_table(rows, scale.unit_bytes) + "\n")
    data = {"scale": scale_name, "machine": machine(), "seconds": round(seconds, 1), "rows": [row.as_dict() for row in rows]}
    (out / "gpu_check.json").write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default="full", help="full: Mixtral 8x7B on CUDA; tiny: the tiny preset on the CPU"
    )
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers to keep (default: 1 2)")
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default: 2048 4096 8192 12288; tiny: 256 512)")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both", help="activation checkpointing")
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json and gpu_check.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    if scale.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --scale full needs a CUDA GPU and torch sees none; use --scale tiny on the CPU.", file=sys.stderr)
        return 2
    gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GiB if scale.device == "cuda" else 80.0
    checkpointing = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    began = time.monotonic()
    rows = []
    for layers in args.layers or scale.layers:
        for seq_len in args.seqs or scale.seqs:
            for ckpt in checkpointing:
                rows.append(check_row(scale, layers, seq_len, ckpt, gpu_memory_gb))
                cells = zip(COLUMNS, table_row(rows[-1], scale.unit_bytes))
                print(" | ".join(f"{name} {value}" for name, value in cells) + f" ({scale.unit})", flush=True)
    seconds = time.monotonic() - began
    write_outputs(args.out, args.scale, rows, seconds)
    print()
    print(markdown_table(rows, scale.unit_bytes))
    print(f"\nwrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
