"""``measure(setup)``: one real training step, memory by category and by phase, on the CPU or on CUDA.

The step is ``moekit.step.run_step``, the same harness ``moekit.simulate`` runs on FakeTensors, so a
measurement and a simulation of one setup are directly comparable (on the ``tiny`` and ``small``
presets they agree to the byte). On real tensors it also reports the bytes autograd saved for
backward (a ``saved_tensors_hooks`` sum; under activation checkpointing the checkpoint's own hooks
hide the kept layer inputs, so trust MemTracker's ``activations`` there). On CUDA it adds the
allocator's view per phase (``torch.cuda`` allocated / reserved, current and peak) and can write an
allocator snapshot to open in https://pytorch.org/memory_viz.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.breakdown import Breakdown
from moekit.errors import MoekitError
from moekit.step import run_step
from moekit.training_setup import TrainingSetup
from moekit.units import GiB

#: Headroom kept free for Python, the allocator and the rest of the machine when checking the fit.
_FIT_MARGIN = 1.25


class MeasureError(MoekitError):
    """A setup that cannot be measured on this machine; the message says what to change."""


@dataclass
class Measurement:
    """A measured step: the Breakdown, MemTracker bytes by category per phase, and allocator figures."""

    breakdown: Breakdown
    phases: dict[str, dict[str, int]]
    saved_for_backward_bytes: int
    device: str
    #: CUDA only: per phase, ``allocated``, ``max_allocated``, ``reserved``, ``max_reserved`` bytes.
    cuda: dict[str, dict[str, int]] = field(default_factory=dict)
    snapshot_path: Path | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# Will it fit this machine?
# --------------------------------------------------------------------------------------------


def step_bytes_here(setup: TrainingSetup, num_layers: int | None = None, device: str = "cpu") -> int:
    """One rank's bytes for a step of ``setup`` here: the estimate without CUDA's context and allocator reserve
    (``overhead``), plus this rank's share of the host states (offload), scaled to ``num_layers`` of the
    model's layers when the step runs a truncated model (roughly: the embeddings and logits scale with them).
    On the CPU DeepSpeed's buckets are left out: allocated whole, only the part a reduction writes becomes
    resident. Used to refuse a step this machine clearly cannot hold.
    """
    from moekit.estimate import estimate, model_facts

    breakdown = estimate(setup)
    per_rank = breakdown.total_bytes - breakdown.per_gpu["overhead"] + sum(breakdown.per_host.values()) // setup.gpus_per_node
    if device == "cpu":
        per_rank -= breakdown.per_gpu["buffers"]
    total_layers = model_facts(setup.model).num_layers
    if num_layers is not None and num_layers < total_layers:
        per_rank = per_rank * num_layers // total_layers
    return per_rank


def check_fits_this_machine(setup: TrainingSetup, device: str, num_layers: int | None = None) -> None:
    """Raise MeasureError when the step clearly cannot run here (rough bytes vs free memory)."""
    need = int(step_bytes_here(setup, num_layers, device) * _FIT_MARGIN)
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        where = "free GPU memory"
    else:
        import psutil

        free = psutil.virtual_memory().available
        where = "available RAM"
    if need > free:
        raise MeasureError(
            f"a real step of {setup.describe()} needs roughly {need / GiB:.1f} GiB but this machine has "
            f"{free / GiB:.1f} GiB of {where}. Measure a smaller preset (tiny, small), fewer layers "
            "(num_layers=1 or 2 keeps the per-layer memory), a shorter --seq, or use `moekit simulate`, "
            "which runs the full-size step on fake tensors without allocating it."
        )


def _check_setup(setup: TrainingSetup, device: str) -> None:
    if device not in ("cpu", "cuda"):
        raise MeasureError(f"device must be 'cpu' or 'cuda', got '{device}'.")
    if device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("device='cuda' but torch sees no CUDA GPU here; use device='cpu'.")
    if device == "cpu" and setup.offload != "none":
        raise MeasureError(
            f"offload='{setup.offload}' moves model states from the GPU to host RAM; on the CPU the host is "
            "the device, so there is nothing to offload. Measure with offload='none' (or on a CUDA GPU); "
            "`moekit simulate` shows what offload frees on a GPU."
        )


# --------------------------------------------------------------------------------------------
# CUDA allocator statistics per phase
# --------------------------------------------------------------------------------------------


class _CudaPhases:
    """Reads torch.cuda's allocated / reserved bytes at each phase boundary, peaks reset per phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, int]] = {}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def __call__(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.phases[phase] = {
            "allocated": torch.cuda.memory_allocated(),
            "max_allocated": torch.cuda.max_memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "max_reserved": torch.cuda.max_memory_reserved(),
        }
        torch.cuda.reset_peak_memory_stats()

    def peak(self, key: str) -> int:
        return max((values[key] for values in self.phases.values()), default=0)


# --------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------


def measure_step(
    setup: TrainingSetup,
    *,
    num_layers: int | None = None,
    device: str | None = None,
    snapshot_path: str | Path | None = None,
    check_fit: bool = True,
) -> Measurement:
    """Run one real training step of ``setup`` and return its Breakdown with per-phase figures.

    device: ``cpu`` or ``cuda`` (default: cuda when torch sees a GPU).
    num_layers: truncate the model to this many decoder layers (full width: same memory per layer).
    snapshot_path (CUDA): also record the allocator's history and dump a snapshot there (a pickle to
      drop onto https://pytorch.org/memory_viz).
    check_fit: refuse before running when the step clearly does not fit this machine.
    """
    device = device or default_device()
    _check_setup(setup, device)
    if check_fit:
        check_fits_this_machine(setup, device, num_layers)
    cuda = _CudaPhases() if device == "cuda" else None
    if snapshot_path is not None and cuda is None:
        raise MeasureError("an allocator snapshot needs CUDA (torch.cuda.memory._dump_snapshot); drop snapshot_path on the CPU.")
    if snapshot_path is not None:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        record = run_step(setup, device=device, num_layers=num_layers, source="measure", on_phase=cuda)
        if snapshot_path is not None:
            snapshot_path = Path(snapshot_path)
            snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(snapshot_path))
    finally:
        if snapshot_path is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
    breakdown = record.breakdown
    breakdown.notes["saved_for_backward_bytes"] = str(record.saved_for_backward_bytes)
    breakdown.notes["device"] = device
    if cuda is not None:
        _add_allocator_view(breakdown, cuda)
    return Measurement(
        breakdown=breakdown,
        phases=record.phases,
        saved_for_backward_bytes=record.saved_for_backward_bytes,
        device=device,
        cuda=dict(cuda.phases) if cuda is not None else {},
        snapshot_path=Path(snapshot_path) if snapshot_path is not None else None,
    )


def _add_allocator_view(breakdown: Breakdown, cuda: _CudaPhases) -> None:
    """On CUDA, what the caching allocator reserved beyond the tracked tensors counts as overhead."""
    max_reserved = cuda.peak("max_reserved")
    breakdown.per_gpu["overhead"] = max(0, max_reserved - breakdown.total_bytes)
    breakdown.notes["cuda_max_allocated_bytes"] = str(cuda.peak("max_allocated"))
    breakdown.notes["cuda_max_reserved_bytes"] = str(max_reserved)
    breakdown.total_bytes = max(breakdown.total_bytes, max_reserved)


def measure(setup: TrainingSetup, *, num_layers: int | None = None, device: str | None = None) -> Breakdown:
    """Per-category memory of one real training step of ``setup`` on this machine (see ``measure_step``).

    The Breakdown's notes carry ``saved_for_backward_bytes`` and, on CUDA, the allocator's peaks.
    """
    return measure_step(setup, num_layers=num_layers, device=device).breakdown
