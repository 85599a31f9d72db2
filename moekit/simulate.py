"""``simulate(setup)``: one full-size training step on PyTorch FakeTensors, memory tracked by MemTracker.

The step is ``moekit.step.run_step`` (the same harness ``measure`` runs on real tensors), executed
inside ``FakeTensorMode(allow_non_fake_inputs=True)`` on the CPU: every tensor has its real shape,
dtype and storage size but no data, so Mixtral 8x7B at 4096 tokens runs in tens of seconds and a few
hundred MiB of RAM. Two things differ on FakeTensors and are patched for the duration of the run only:

- transformers cannot read FakeTensor values, so it assumes the batch may hold packed sequences and
  materializes a ``seq x seq`` attention mask, which the real run does not (it sees one sequence per
  row and lets SDPA use ``is_causal``). The batches here hold one sequence per row, so the simulation
  tells transformers so (``find_packed_sequence_indices`` returns None, as on real tensors).
- PyTorch's meta kernel for ``aten._grouped_mm`` (the fused-expert matmul) accepts only bf16, while
  the CPU kernel also runs fp32 and fp16. For those precisions the meta kernel computes the output
  shape in bf16 and returns the output in the inputs' dtype; the bytes autograd saves are unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch

from moekit.breakdown import Breakdown
from moekit.models import as_config
from moekit.step import StepRecord, breakdown_from_phases, run_step
from moekit.training_setup import TrainingSetup


def _no_packed_sequences(position_ids: torch.Tensor) -> None:
    """One sequence per row: what transformers finds on the real tensors of this harness."""
    return None


def _grouped_mm_meta_any_float(original):
    def meta(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        if scale_a is None and mat_a.dtype == mat_b.dtype and mat_a.dtype in (torch.float32, torch.float16):
            out = original(mat_a.to(torch.bfloat16), mat_b.to(torch.bfloat16), None, None, offs, bias, None, None, use_fast_accum)
            return out.to(out_dtype or mat_a.dtype)
        return original(mat_a, mat_b, scale_a, scale_b, offs, bias, scale_result, out_dtype, use_fast_accum)

    return meta


@contextlib.contextmanager
def fake_step_patches() -> Iterator[None]:
    """The two FakeTensor differences above, patched only while the simulation runs."""
    import torch._meta_registrations as meta_registrations
    import transformers.masking_utils as masking_utils

    original = meta_registrations._meta_grouped_mm_common
    with (
        mock.patch.object(masking_utils, "find_packed_sequence_indices", _no_packed_sequences),
        mock.patch.object(meta_registrations, "_meta_grouped_mm_common", _grouped_mm_meta_any_float(original)),
    ):
        yield


def simulate_step(setup: TrainingSetup, *, num_layers: int | None = None, progress: bool = True) -> StepRecord:
    """The simulated step with its per-phase figures (see ``moekit.step.StepRecord``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with fake_step_patches(), FakeTensorMode(allow_non_fake_inputs=True):
        return run_step(setup, device="fake", num_layers=num_layers, progress=progress, source="simulate")


def simulate(setup: TrainingSetup, *, num_layers: int | None = None, progress: bool = True) -> Breakdown:
    """Per-GPU (and per-host) memory of one training step of ``setup``, simulated at full size.

    num_layers: simulate the model truncated to this many decoder layers (default: all of them).
    progress: show a progress bar over the layers (tqdm; a notebook widget in Jupyter).
    """
    return simulate_step(setup, num_layers=num_layers, progress=progress).breakdown


@dataclass
class LayerCosts:
    """Bytes of each phase and category split into ``outside`` the decoder layers and ``per_layer``.

    From simulations of 1 and 2 layers: per_layer = two - one, outside = one - per_layer. Exact when
    the decoder layers are identical (every preset here).
    """

    outside: dict[str, dict[str, int]]
    per_layer: dict[str, dict[str, int]]
    per_host_outside: dict[str, int]
    per_host_per_layer: dict[str, int]
    saved_outside_bytes: int
    saved_per_layer_bytes: int

    def phases_at(self, num_layers: int) -> dict[str, dict[str, int]]:
        return {
            phase: {c: self.outside[phase][c] + num_layers * self.per_layer[phase][c] for c in self.outside[phase]}
            for phase in self.outside
        }

    def per_host_at(self, num_layers: int) -> dict[str, int]:
        return {k: self.per_host_outside[k] + num_layers * self.per_host_per_layer[k] for k in self.per_host_outside}


def _split(one: dict[str, int], two: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    per_layer = {k: two[k] - one[k] for k in one}
    return {k: one[k] - per_layer[k] for k in one}, per_layer


def layer_costs(setup: TrainingSetup, *, progress: bool = True) -> LayerCosts:
    """Simulate 1 and 2 decoder layers of the setup and split every figure into outside + per layer.

    Models with dense first layers (DeepSeek, GLM) simulate those plus 1 and 2 MoE layers: ``outside``
    then holds the dense layers and ``per_layer`` is one MoE layer."""
    from moekit.arch import arch_of

    num_dense = arch_of(setup.model).num_dense_layers if arch_of(setup.model).is_moe else 0
    one = simulate_step(setup, num_layers=num_dense + 1, progress=progress)
    two = simulate_step(setup, num_layers=num_dense + 2, progress=progress)
    outside, per_layer = {}, {}
    for phase in one.phases:
        outside[phase], per_layer[phase] = _split(one.phases[phase], two.phases[phase])
    host_outside, host_per_layer = _split(one.breakdown.per_host, two.breakdown.per_host)
    saved_outside, saved_per_layer = _split({"s": one.saved_for_backward_bytes}, {"s": two.saved_for_backward_bytes})
    return LayerCosts(outside, per_layer, host_outside, host_per_layer, saved_outside["s"], saved_per_layer["s"])


def simulate_per_layer(setup: TrainingSetup, *, progress: bool = True) -> Breakdown:
    """Simulate 1 and 2 decoder layers and extrapolate every phase linearly to the full depth.

    Exact when the decoder layers are identical (every preset here), because each phase's bytes are
    then ``outside + num_layers * per_layer``. Two caveats: ZeRO partitions are padded per rank (a few
    elements, not per layer), and the peak is extrapolated phase by phase, which is exact as long as
    the peak of each phase happens at the same point of the step at both depths (the start of backward
    or the optimizer step, for the presets here).
    """
    from moekit.arch import arch_of

    full_depth = as_config(setup.model).num_hidden_layers
    arch = arch_of(setup.model)
    repeated = arch.num_moe_layers if arch.is_moe else full_depth  # dense first layers are simulated whole
    costs = layer_costs(setup, progress=progress)
    phases = costs.phases_at(repeated)
    phases["peak"] = max((phases[p] for p in ("forward_peak", "backward_peak", "optimizer_peak")), key=lambda c: sum(c.values()))
    breakdown = breakdown_from_phases(phases, setup, costs.per_host_at(repeated), "simulate")
    dense = f"{full_depth - repeated} dense + " if repeated != full_depth else ""
    breakdown.notes["method"] = f"{dense}1 and 2 layers simulated, extrapolated linearly to {full_depth}"
    return breakdown
