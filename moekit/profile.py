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
from moekit.units import GiB, width

#: Rough bytes saved per token per decoder layer, in units of hidden size x dtype width / 2
#: (REFERENCE: about 85h for Mixtral in bf16 without checkpointing); used only for the fit check.
_ROUGH_ACTIVATION_H_PER_TOKEN = 100
#: Rough bytes per token per vocabulary entry outside the layers (logits, fp32 upcast, loss).
_ROUGH_LOGIT_BYTES_PER_VOCAB = 12
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


def rough_step_bytes(setup: TrainingSetup, num_layers: int | None = None) -> int:
    """A deliberately rough upper estimate of one real step's bytes, from the parameter census.

    Weights at the working width; gradients and fp32 master + Adam moments (16 bytes) for the
    trainable parameters without ZeRO sharing; activations at ~100h bytes per token per layer;
    logits at ~12 bytes per token per vocabulary entry. Used only to refuse clearly before a step
    that cannot fit, never as a prediction (that is ``estimate``).
    """
    from moekit.models import as_config, config_with_layers, parameter_census

    config = config_with_layers(as_config(setup.model), num_layers)
    census = parameter_census(config)
    num_bytes = width(setup.precision)
    num_trainable = census.num_params if setup.method == "full" else census.num_params // 100
    tokens = setup.micro_batch * setup.seq_len
    layers = config.num_hidden_layers
    activations = tokens * layers * _ROUGH_ACTIVATION_H_PER_TOKEN * config.hidden_size * num_bytes // 2
    if setup.attn_implementation == "eager":
        activations += 6 * config.num_attention_heads * setup.seq_len**2 * setup.micro_batch * layers * num_bytes // 2
    logits = tokens * config.vocab_size * _ROUGH_LOGIT_BYTES_PER_VOCAB
    return census.num_params * num_bytes + num_trainable * (num_bytes + 16) + activations + logits


def check_fits_this_machine(setup: TrainingSetup, device: str, num_layers: int | None = None) -> None:
    """Raise MeasureError when the step clearly cannot run here (rough bytes vs free memory)."""
    need = int(rough_step_bytes(setup, num_layers) * _FIT_MARGIN)
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
