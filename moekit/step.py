"""One training step of a ``TrainingSetup``, arranged like one DeepSpeed rank, with memory tracked by phase.

The same harness runs on real tensors (``moekit.profile.measure``) and on PyTorch FakeTensors
(``moekit.simulate.simulate``: full size, no memory). It builds the transformers model, applies LoRA
with ``moekit.lora.apply_lora``, turns on activation checkpointing when asked, and runs forward (with
labels, so the loss is computed by the model), backward and the optimizer step on ``micro_batch x
seq_len`` random tokens, under ``torch.distributed._tools.mem_tracker.MemTracker``.

How each DeepSpeed structure of one data-parallel rank is represented (N ranks; the per-rank rules
are the ones ``moekit.estimate`` follows, checked against DeepSpeed 0.19's ZeRO code; only trainable
parameters get gradients and optimizer state; stage 0 is modeled like stage 1 with N = 1):

- 16-bit weights: the model's own parameters, built in the working dtype (DeepSpeed casts the whole
  module, LoRA adapters included, to bf16/fp16, so the adapters are cast too). ZeRO-1/2 flatten them
  into one buffer of the same size. ZeRO-3: one flat tensor of this rank's partitions,
  ``sum(ceil(numel/N))`` over all parameters (DeepSpeed partitions each parameter); the model's
  parameters are emptied (``param.data = empty(0)``, as DeepSpeed's ``free_param`` does) and gathered
  again, at full size, around the forward and the backward of each ZeRO-3 unit (the attention block,
  the MoE block as DeepSpeed's recommended z3 leaf module, and every other module owning parameters).
  Gathered parameters count as ``buffers``. A saved-tensor hook stores weights that autograd would save
  as a reference to the parameter and re-creates the view after the unit is gathered for backward,
  which is what DeepSpeed's ZeRO-3 linear does. Under activation checkpointing a recomputed layer stays
  gathered until its backward (autograd checks recomputed tensors against the forward's).
- fp32 master weights (``optimizer_states``): flat fp32 tensors of the rank's partition of the
  trainable parameters: all of them for stage 0, ``2*ceil(T/2N)`` for stages 1/2 (DeepSpeed pads the
  flat buffer to a multiple of 2N elements), ``sum(ceil(numel/N))`` for stage 3 (in sub-groups, see
  below). Under fp32 precision
  DeepSpeed's stage-1/2 optimizer still clones the partition (``single_partition_of_fp32_groups``,
  deepspeed/runtime/zero/stage_1_and_2.py) and so does stage 3 (``_create_fp32_partitions`` skips the copy only
  when the partition's ``torch.device`` equals the accelerator's device *name*, a string, which is never true);
  stage 0 steps the fp32 weights in place.
- Adam moments (``optimizer_states``): two fp32 tensors of the same size, allocated up front
  (DeepSpeed initializes them before the first step), stepped by ``torch.optim.AdamW(fused=True)``,
  which like DeepSpeed's fused Adam makes no temporaries.
- 16-bit gradients (``gradients``): stages 0/1 keep autograd's full ``param.grad``. Stages 2/3 keep only
  the rank's partition: a post-accumulate-grad hook copies the rank's slice of each gradient into a
  flat 16-bit partition buffer and frees the full gradient (DeepSpeed reduces it and does the same);
  ZeRO-2 allocates that buffer at the first gradient and frees it after the step, ZeRO-3 holds it.
  With gradient accumulation > 1, stage 0/1 gradients and the ZeRO-2 partition exist before the
  forward (as from the second micro-batch on).
- fp32 gradient for the optimizer step (``temporaries``): made right before the step and freed after
  it, as DeepSpeed makes it: ZeRO-2 upcasts its pre-flattened gradient partition (4 bytes per owned
  element); ZeRO-1 first flattens the rank's slices of the 16-bit gradients into a new buffer, then
  upcasts (2 + 4 bytes, briefly); ZeRO-0 (DeepSpeed's FP16_Optimizer) upcasts every gradient, then
  concatenates the fp32 copies (4 + 4 bytes); ZeRO-3 does that one optimizer sub-group at a time (DeepSpeed's
  ``sub_group_size``), each sub-group with its own fp32 master and moments.
- Communication buckets (``buffers``): ZeRO-1/2 allocate two reduce buckets of
  ``reduce_bucket_size`` elements in the working dtype at the first gradient and free them after backward
  (contiguous_gradients with overlap_comm, as XTuner's presets set); ZeRO-3 keeps one for the run.
  ZeRO-1 with accumulation > 1 reduces only at the accumulation boundary, and only that boundary's
  epilogue frees the buckets (``setup_buckets`` / ``_release_ipg_buffers`` in stage_1_and_2.py), so they
  exist before the forward (as from the second micro-batch on).
- Offload: what DeepSpeed moves to the host (fp32 master, moments, fp32 gradient partition; with
  "optimizer+params" also the 16-bit weight partitions) is not allocated on the device at all; its
  exact size goes to ``per_host`` (summed over the ranks of one node). Stage 2/3 gradients then go
  straight to the host: the device keeps only the buckets.

The forward pass runs with ``use_cache=False`` (training keeps no KV cache); the batch holds one
sequence per row, so ``packing`` does not change the bytes of a step.

Categories: ``weights`` = MemTracker's Parameter bytes; ``gradients`` = gradient bytes at the end of
backward; ``optimizer_states`` = optimizer-state bytes; ``activations`` = MemTracker's Activation bytes
at the end of forward (the loss and what it saves included; the logits are freed with the output);
``buffers`` = module buffers, buckets and gathered ZeRO-3 parameters at the peak; ``temporaries`` = what
the peak holds beyond all of those (0 when the peak comes after activations were freed); ``total`` = the
peak of the step, so the categories need not add up to it. ``StepRecord.phases`` has every category at each phase and phase peak. Not
modeled: fp16 loss-scaling scratch, gradient clipping's norm buffers (a few bytes per tensor),
ZeRO-3 prefetching beyond the unit being computed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from torch.utils.weak import WeakIdKeyDictionary

from moekit.arch import is_moe_block
from moekit.breakdown import CATEGORIES, Breakdown
from moekit.errors import MoekitError
from moekit.models import as_config, build_model, config_with_layers
from moekit.training_setup import TrainingSetup
from moekit.traps import adapter_precision, zero3_linear_saves_inputs
from moekit.zero_knobs import zero_knobs

#: DeepSpeed ZeRO-1/2 pad the flat parameter buffer to a multiple of this many elements per rank
#: (``nccl_start_alignment_factor``: 4-byte alignment of 16-bit elements).
NCCL_ALIGNMENT = 2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Phases of one step: current bytes after the model is ready, after forward, after backward and after
#: the optimizer step, plus the peaks of forward, backward and the optimizer step and of the whole step.
PHASES = ("model", "forward", "backward", "optimizer_step", "forward_peak", "backward_peak", "optimizer_peak", "peak")

_REFTYPE = {
    "weights": _MemRefType.PARAM,
    "gradients": _MemRefType.GRAD,
    "optimizer_states": _MemRefType.OPT,
    "activations": _MemRefType.ACT,
    "temporaries": _MemRefType.TEMP,
    "buffers": _MemRefType.BUFFER,
}
_CATEGORY = {reftype: category for category, reftype in _REFTYPE.items()} | {_MemRefType.OTH: "temporaries"}


class StepError(MoekitError):
    """A setup the step harness cannot run; the message says what to change."""


@dataclass
class StepRecord:
    """What one tracked step measured: the Breakdown, per-phase bytes by category, and saved tensors."""

    breakdown: Breakdown
    phases: dict[str, dict[str, int]]
    saved_for_backward_bytes: int
    num_layers: int
    num_params: int
    num_trainable_params: int
    notes: dict[str, str] = field(default_factory=dict)

    def phase_totals(self) -> dict[str, int]:
        return {phase: sum(values.values()) for phase, values in self.phases.items()}


# --------------------------------------------------------------------------------------------
# Per-rank partition sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroLayout:
    """Elements one rank holds in each of DeepSpeed's flat ZeRO buffers (exact, padding included)."""

    stage: int
    world_size: int
    num_params: int
    num_trainable: int
    owned_numel: int  # trainable elements whose optimizer state this rank keeps
    weight_numel: int  # 16-bit weight elements on this rank (stage 3: its partitions of every parameter)

    @classmethod
    def of(cls, params: list[torch.Tensor], trainable: list[torch.Tensor], stage: int, world_size: int) -> ZeroLayout:
        n = world_size
        num_trainable = sum(p.numel() for p in trainable)
        if stage == 0:
            owned = num_trainable
        elif stage in (1, 2):
            owned = NCCL_ALIGNMENT * math.ceil(num_trainable / (NCCL_ALIGNMENT * n))
        else:
            owned = sum(math.ceil(p.numel() / n) for p in trainable)
        num_params = sum(p.numel() for p in params)
        weights = sum(math.ceil(p.numel() / n) for p in params) if stage == 3 else num_params
        return cls(stage, n, num_params, num_trainable, owned, weights)


# --------------------------------------------------------------------------------------------
# MemTracker, taught two things it lacks
# --------------------------------------------------------------------------------------------


class _NoHandle:
    def remove(self) -> None:
        pass


class _Tracker(MemTracker):
    """MemTracker that accepts frozen parameters (LoRA), lets the harness label its own tensors, and
    keeps only the global peak (what moekit reads)."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self._labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.device_type = device_type

    def label(self, tensor: torch.Tensor, category: str, *, sticky: bool = False) -> None:
        """Count tensor's storage under category; sticky labels survive MemTracker's own re-labelling."""
        self._update_and_maybe_create_winfos(tensor, _REFTYPE[category])
        if sticky:
            self._labels[tensor] = category
        for device, snapshot in self._curr_mem_snap.items():
            if snapshot["Total"] == self._peak_mem.get(device):  # the peak is now: keep its labels right
                self._peak_mem_snap[device] = dict(snapshot)

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        for param in module.parameters():
            if not param.requires_grad and param not in self._param_to_grad_hook_handles:
                # MemTracker would call register_hook on a frozen parameter, which raises.
                self._param_to_grad_hook_handles[param] = (_NoHandle(), _NoHandle())
        sizes = super()._track_module_params_and_buffers(module, install_grad_hooks)
        for param in module.parameters():
            category = self._labels.get(param)
            if category is not None and param.numel():
                self._update_and_maybe_create_winfos(param, _REFTYPE[category])
        return sizes

    def _update_peak_stats(self, peak_state) -> None:
        """Only the global peak: MemTracker's per-module peaks cost O(modules) per operation (minutes at full size)."""
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)

    def categories(self, kind: str = "current") -> dict[str, int]:
        """Bytes by moekit category on the compute device (host-side copies are left out)."""
        snapshot = self.get_tracker_snapshot(kind)
        out = dict.fromkeys(CATEGORIES, 0)
        for device, device_snapshot in snapshot.items():
            if device.type != self.device_type:
                continue
            for reftype, value in device_snapshot.items():
                if reftype in _CATEGORY:
                    out[_CATEGORY[reftype]] += value
        return {c: v for c, v in out.items() if c != "overhead"}

    def reset_peak(self) -> None:
        """Start a new peak from the current bytes (to measure each phase's own peak)."""
        self._peak_mem_snap = self.get_tracker_snapshot("current")
        self._peak_mem = {dev: snap["Total"] for dev, snap in self._peak_mem_snap.items()}


# --------------------------------------------------------------------------------------------
# Building the model the way the setup trains it
# --------------------------------------------------------------------------------------------


def build_for_training(setup: TrainingSetup, device: str = "cpu", *, num_layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """The model of the setup in its working dtype, with LoRA and checkpointing applied, in train mode.

    device ``cpu`` or ``cuda`` builds real tensors; ``fake`` builds FakeTensors (call it inside a
    ``FakeTensorMode``).
    """
    if setup.method == "qlora":
        raise StepError(
            "a tracked step of QLoRA needs bitsandbytes' 4-bit kernels on a CUDA GPU; moekit simulates and "
            "measures method='lora' and 'full'. Use estimate() for QLoRA, or method='lora'."
        )
    from moekit.build import prepare_for_training

    dtype = DTYPES[setup.precision]
    build_device = "fake" if device == "fake" else "cpu"
    config = config_with_layers(as_config(setup.model), num_layers)
    config.dtype = dtype  # transformers 5 builds in the config's saved dtype (the presets say bfloat16) otherwise
    model = build_model(config, build_device, seed=seed, dtype=dtype, attn_implementation=setup.attn_implementation)
    if device not in ("fake", "cpu"):
        model = model.to(device)
    adapter_dtype = DTYPES[adapter_precision(setup, config.model_type)]
    return prepare_for_training(model, setup, working_dtype=dtype, adapter_dtype=adapter_dtype)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


# --------------------------------------------------------------------------------------------
# ZeRO-3: partitioned weights, gathered per unit
# --------------------------------------------------------------------------------------------


def zero3_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose parameters DeepSpeed gathers together: attention and MoE blocks whole, others alone."""
    units: list[torch.nn.Module] = []
    claimed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        is_block = name.endswith("self_attn") or is_moe_block(module)
        if is_block or any(True for _ in module.parameters(recurse=False)):
            units.append(module)
            claimed.update(id(m) for m in module.modules())
    return units


class _Zero3Gatherer:
    """Empties every parameter and gathers a unit's parameters only while the unit computes."""

    def __init__(self, model: torch.nn.Module, tracker: _Tracker, *, reuse_distance: int,
                 checkpointing: bool = False) -> None:
        self.tracker = tracker
        self.units = zero3_units(model)
        self.shapes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()  # real runs: the other ranks' shards
        self.live: list[torch.nn.Module] = []
        self.kept_views: WeakIdKeyDictionary = WeakIdKeyDictionary()  # param -> saved views of its gathered storage
        self.owner_of_storage: WeakIdKeyDictionary = WeakIdKeyDictionary()  # gathered storage -> param
        self.gathered_bytes = 0
        self.max_gathered_bytes = 0
        self.fake = any(_is_fake(p) for p in model.parameters())
        for unit in self.units:
            for param in unit.parameters():
                self.shapes[param] = param.shape
                if not self.fake:  # kept in host RAM, out of the tracked device's way
                    self.values[param] = param.detach().to("cpu", copy=True)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        # DeepSpeed keeps a module gathered after its forward when its backward comes within
        # stage3_max_reuse_distance parameters of trace (moekit.estimate.zero3_kept_gathered_params).
        self.waiting_for_backward: list[torch.nn.Module] = []
        self.kept_after_forward: set[int] = set()
        later, uses_between = 0, 3 if checkpointing else 2
        for unit in reversed(self.units):
            if uses_between * later < reuse_distance:
                self.kept_after_forward.add(id(unit))
            later += sum(math.prod(self.shapes[p]) for p in unit.parameters())
        self.handles = []
        for unit in self.units:
            self.handles.append(unit.register_forward_pre_hook(lambda m, args: self.gather(m)))
            self.handles.append(unit.register_forward_hook(lambda m, args, out: self.release_after_forward(m)))
            self.handles.append(unit.register_full_backward_pre_hook(lambda m, grad: self.gather_for_backward(m)))

    def gather(self, unit: torch.nn.Module) -> None:
        for param in unit.parameters():
            self.ensure_gathered(param)
        if unit not in self.live:
            self.live.append(unit)

    def ensure_gathered(self, param: torch.Tensor) -> None:
        if param.numel() == 0 and param in self.shapes:
            full = torch.empty(self.shapes[param], dtype=param.dtype, device=param.device)
            if param in self.values:
                full.copy_(self.values[param])
            param.data = full
            self.owner_of_storage[param.untyped_storage()] = param
            self.tracker.label(param, "buffers", sticky=True)
            self.gathered_bytes += full.numel() * full.element_size()
            self.max_gathered_bytes = max(self.max_gathered_bytes, self.gathered_bytes)

    def keep_view(self, param: torch.Tensor, view: torch.Tensor) -> None:
        """A saved view of a gathered parameter: its storage becomes an activation when the parameter is released."""
        self.kept_views.setdefault(param, []).append(view)

    def release(self, unit: torch.nn.Module) -> None:
        for param in unit.parameters():
            if param in self.shapes and param.numel():
                self.gathered_bytes -= param.numel() * param.element_size()
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            for view in self.kept_views.pop(param, []):
                self.tracker.label(view, "activations")
        if unit in self.live:
            self.live.remove(unit)

    def release_after_forward(self, unit: torch.nn.Module) -> None:
        """Release after forward, except in a checkpoint's recomputation inside backward (autograd checks
        the recomputed tensors against the forward's, so the layer stays gathered until its backward) and
        for the units DeepSpeed keeps because their backward comes soon."""
        if torch._C._current_graph_task_id() != -1:
            return
        if id(unit) in self.kept_after_forward:
            if unit not in self.waiting_for_backward:
                self.waiting_for_backward.append(unit)
            return
        self.release(unit)

    def gather_for_backward(self, unit: torch.nn.Module) -> None:
        """Backward visits units in reverse: the unit finished before this one is released first (units kept
        for their own backward stay)."""
        if unit in self.waiting_for_backward:
            self.waiting_for_backward.remove(unit)
        for other in list(self.live):
            if other is not unit and other not in self.waiting_for_backward:
                self.release(other)
        self.gather(unit)

    def release_all(self) -> None:
        self.waiting_for_backward.clear()
        for unit in list(self.live):
            self.release(unit)
        for handle in self.handles:
            handle.remove()


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


# --------------------------------------------------------------------------------------------
# Saved tensors: bytes kept for backward, and ZeRO-3 weights saved by reference
# --------------------------------------------------------------------------------------------


class _SavedTensors:
    """saved_tensors_hooks that sum the bytes autograd keeps (parameters excluded, storages once)."""

    def __init__(self, model: torch.nn.Module, zero3: _Zero3Gatherer | None) -> None:
        self.zero3 = zero3
        self.owner_of_storage: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for param in model.parameters():
            if param.numel():
                self.owner_of_storage[param.untyped_storage()] = param
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.num_bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def _param_sharing_storage(self, tensor: torch.Tensor) -> torch.Tensor | None:
        storage = tensor.untyped_storage()
        param = self.owner_of_storage.get(storage)
        if param is None and self.zero3 is not None:
            param = self.zero3.owner_of_storage.get(storage)
        return param

    def pack(self, tensor: torch.Tensor):
        param = self._param_sharing_storage(tensor)
        if param is not None:
            if self.zero3 is not None and param in self.zero3.shapes:
                if len(self.zero3.shapes[param]) != 3:
                    return ("zero3", param, tensor.size(), tensor.stride(), tensor.storage_offset())
                # Fused 3-D experts reach autograd as a transposed view (transformers' grouped matmul), not through
                # DeepSpeed's ZeRO-3 linear: the view keeps the gathered storage alive until backward.
                self.zero3.keep_view(param, tensor)
                storage = tensor.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = True
                    self.num_bytes += storage.nbytes()
            return tensor
        storage = tensor.untyped_storage()
        if storage not in self.seen:
            self.seen[storage] = True
            self.num_bytes += storage.nbytes()
        return tensor

    def unpack(self, packed):
        if isinstance(packed, tuple) and packed[0] == "zero3":
            _, param, size, stride, offset = packed
            self.zero3.ensure_gathered(param)
            return param.detach().as_strided(size, stride, offset)
        return packed


# --------------------------------------------------------------------------------------------
# DeepSpeed's per-rank model states
# --------------------------------------------------------------------------------------------


class _RankStates:
    """The fp32 master, Adam moments, gradient partition and buckets of one DeepSpeed rank."""

    def __init__(self, model: torch.nn.Module, setup: TrainingSetup, tracker: _Tracker, device: torch.device) -> None:
        self.setup = setup
        self.knobs = zero_knobs(setup)
        self.tracker = tracker
        self.device = device
        self.dtype = DTYPES[setup.precision]
        self.mixed = setup.precision != "fp32"
        self.stage = setup.zero_stage
        self.offload = setup.offload != "none"
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.numels = [p.numel() for p in self.trainable]  # ZeRO-3 empties the parameters later
        self.layout = ZeroLayout.of(list(model.parameters()), self.trainable, self.stage, setup.world_size)
        self.grad_partition: torch.Tensor | None = None
        self.buckets: list[torch.Tensor] = []
        self.weight_partitions: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []  # buffers held for the whole run (ZeRO-3 frozen partitions)
        self.optimizer: torch.optim.Optimizer | None = None
        self.opt_params: list[torch.Tensor] = []

    # Which DeepSpeed buffers exist ---------------------------------------------------------
    @property
    def keeps_master_copy(self) -> bool:
        """An fp32 copy of the partition: mixed precision always; fp32 in every ZeRO optimizer (stages 1-3)."""
        return self.mixed or self.stage >= 1

    @property
    def partitions_grads(self) -> bool:
        return self.stage >= 2

    def _flat_offsets(self) -> list[tuple[torch.Tensor, int]]:
        offsets, offset = [], 0
        for param, numel in zip(self.trainable, self.numels, strict=True):
            offsets.append((param, offset))
            offset += numel
        return offsets

    def owned_slices(self) -> Iterator[tuple[torch.Tensor, int, int, int]]:
        """(param, start, stop, position in the partition) of every trainable slice rank 0 owns."""
        if self.stage == 3:
            position = 0
            for param, numel in zip(self.trainable, self.numels, strict=True):
                count = math.ceil(numel / self.layout.world_size)
                yield param, 0, min(count, numel), position
                position += count
            return
        end = self.layout.owned_numel if self.stage in (1, 2) else self.layout.num_trainable
        for (param, offset), numel in zip(self._flat_offsets(), self.numels, strict=True):
            start, stop = max(offset, 0), min(offset + numel, end)
            if start < stop:
                yield param, start - offset, stop - offset, start

    def optimizer_groups(self) -> list[tuple[int, int]]:
        """(start, size) in the rank's partition of each flat fp32 optimizer tensor.

        ZeRO-1/2: one per parameter group (one here). ZeRO-3: DeepSpeed's sub-groups, closed when they
        reach ``sub_group_size`` partition elements; the step prepares one sub-group at a time.
        """
        if self.stage < 3:
            return [(0, self.layout.owned_numel)]
        groups, start, size = [], 0, 0
        for numel in self.numels:
            size += math.ceil(numel / self.layout.world_size)
            if size >= self.knobs.sub_group_size:
                groups.append((start, size))
                start, size = start + size, 0
        if size:
            groups.append((start, size))
        return groups

    # Allocation before the step ------------------------------------------------------------
    def allocate(self, model: torch.nn.Module) -> _Zero3Gatherer | None:
        """Allocate what DeepSpeed holds before the first forward; returns the ZeRO-3 gatherer if any."""
        if self.stage == 3 and self.setup.offload != "optimizer+params":
            # DeepSpeed's flat partitions of the trainable sub-groups (in the trainable parameters' dtype: fp32
            # LoRA adapters under zero.Init, moekit.traps.adapter_precision), and the frozen parameters' own partitions
            trainable_dtype = self.trainable[0].dtype if self.trainable else self.dtype
            self.weight_partitions = [self._new(size, trainable_dtype, "weights") for _, size in self.optimizer_groups()]
            self._new(self.layout.weight_numel - self.layout.owned_numel, self.dtype, "weights", keep=True)
        if not self.offload:
            self._allocate_optimizer()
        if self.setup.grad_accum > 1:  # from the second micro-batch on, gradients are held through forward
            if not self.partitions_grads:
                for param in self.trainable:
                    param.grad = torch.zeros_like(param)
                    self.tracker.label(param.grad, "gradients")
            elif self.stage == 2 and not self.offload:
                self.grad_partition = self._new(self.layout.owned_numel, self.dtype, "gradients", zeros=True)
            if self.stage == 1:  # ZeRO-1 frees its buckets only at the accumulation boundary (see the docstring)
                self.buckets = [self._new(self.knobs.reduce_bucket_size, self.dtype, "buffers") for _ in range(2)]
        if self.stage != 3:
            return None
        self.grad_partition = None if self.offload else self._new(self.layout.owned_numel, self.dtype, "gradients", zeros=True)
        self.buckets = [self._new(self.knobs.reduce_bucket_size, self.dtype, "buffers")]
        return _Zero3Gatherer(model, self.tracker, reuse_distance=self.knobs.stage3_max_reuse_distance,
                              checkpointing=self.setup.activation_checkpointing)

    def _new(self, numel: int, dtype: torch.dtype, category: str, *, zeros: bool = False, keep: bool = False) -> torch.Tensor:
        tensor = (torch.zeros if zeros else torch.empty)(numel, dtype=dtype, device=self.device)
        self.tracker.label(tensor, category)
        if keep:
            self.kept.append(tensor)
        return tensor

    def _allocate_optimizer(self) -> None:
        if self.keeps_master_copy:
            self.opt_params = [self._new(size, torch.float32, "optimizer_states") for _, size in self.optimizer_groups()]
            if not _is_fake(self.opt_params[0]):
                for master, (start, _) in zip(self.opt_params, self.optimizer_groups(), strict=True):
                    self._copy_between(master, start, to_master=True)
        elif self.stage == 3:
            self.opt_params = list(self.weight_partitions)  # fp32 stage 3 steps its fp32 partitions in place
        else:
            self.opt_params = list(self.trainable)  # fp32 stage 0: a plain optimizer on the parameters
        self.optimizer = torch.optim.AdamW(self.opt_params, lr=1e-5, fused=True)
        for param in self.opt_params:
            state = self.optimizer.state[param]
            state["step"] = torch.zeros((), dtype=torch.float32, device=self.device)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
            for tensor in state.values():
                self.tracker.label(tensor, "optimizer_states")

    def _copy_between(self, master: torch.Tensor, group_start: int, *, to_master: bool) -> None:
        """Copy the rank's slices of the 16-bit parameters into a master tensor, or back (real runs)."""
        with torch.no_grad():
            for param, start, stop, position in self.owned_slices():
                offset = position - group_start
                if not param.numel() or offset < 0 or offset >= master.numel():
                    continue
                count = min(stop - start, master.numel() - offset)
                flat = param.view(-1)[start : start + count]
                if to_master:
                    master[offset : offset + count].copy_(flat)
                else:
                    flat.copy_(master[offset : offset + count])

    # Backward --------------------------------------------------------------------------------
    def install_grad_hooks(self) -> list:
        """After forward (so MemTracker labels each gradient first): reduce-and-free like DeepSpeed."""
        if self.stage == 0:
            return []
        handles = []
        owned = {id(param): (start, stop, position) for param, start, stop, position in self.owned_slices()}
        for param in self.trainable:
            handles.append(param.register_post_accumulate_grad_hook(lambda p: self._on_grad(p, owned.get(id(p)))))
        return handles

    def _on_grad(self, param: torch.Tensor, owned: tuple[int, int, int] | None) -> None:
        if not self.buckets:
            self.buckets = [self._new(self.knobs.reduce_bucket_size, self.dtype, "buffers") for _ in range(2)]
        if not self.partitions_grads:
            return
        if self.grad_partition is None and not self.offload:
            self.grad_partition = self._new(self.layout.owned_numel, self.dtype, "gradients")
        if owned is not None and self.grad_partition is not None:
            start, stop, position = owned
            with torch.no_grad():
                self.grad_partition[position : position + stop - start].copy_(param.grad.view(-1)[start:stop])
        param.grad = None

    def end_backward(self) -> None:
        if self.stage in (1, 2):
            self.buckets = []

    # Optimizer step --------------------------------------------------------------------------
    def step(self) -> None:
        """DeepSpeed's step, group by group: fp32 gradient, Adam, copy back into the 16-bit weights."""
        if self.offload:
            self._drop_grads()  # the host Adam (DeepSpeedCPUAdam) steps the host copies
            return
        if not self.keeps_master_copy and self.stage == 0:
            self.optimizer.step()  # fp32 stage 0: the parameters' own gradients
            self._drop_grads()
            return
        for param, (start, size) in zip(self.opt_params, self.optimizer_groups(), strict=True):
            param.grad = self._fp32_grad(start, size)
            self.optimizer.step()
            param.grad = None
            if self.keeps_master_copy and not _is_fake(param):
                self._copy_between(param, start, to_master=False)
        self._drop_grads()

    def _fp32_grad(self, start: int, size: int) -> torch.Tensor:
        """The fp32 gradient of one optimizer group, made the way DeepSpeed makes it (temporaries)."""
        if self.stage == 0:  # FP16_Optimizer: _flatten_dense_tensors([p.grad.to(fp32) for p in group])
            pieces = [param.grad.to(torch.float32) for param in self.trainable]
            for piece in pieces:
                self.tracker.label(piece, "temporaries")
            grad = torch.cat([piece.view(-1) for piece in pieces])
            self.tracker.label(grad, "temporaries")
            return grad
        if self.stage == 2:
            flat = self.grad_partition  # the contiguous partition is pre-flattened: no copy
        elif self.stage == 3:
            flat = self.grad_partition[start : start + size].clone()  # flatten() of the sub-group's gradient views
        else:
            flat = torch.zeros(size, dtype=self.dtype, device=self.device)  # get_flat_partition()
            with torch.no_grad():
                for param, first, stop, position in self.owned_slices():
                    flat[position : position + stop - first].copy_(param.grad.view(-1)[first:stop])
        if flat is not self.grad_partition:
            self.tracker.label(flat, "temporaries")
        if flat.dtype == torch.float32:
            return flat
        grad = flat.float()
        self.tracker.label(grad, "temporaries")
        return grad

    def _drop_grads(self) -> None:
        for param in self.trainable:
            param.grad = None
        if self.stage == 2:
            self.grad_partition = None

    # Host memory ---------------------------------------------------------------------------
    def host_bytes(self) -> dict[str, int]:
        """What offload keeps in host RAM for the ranks of one node (exact sizes, not allocated)."""
        if not self.offload:
            return {}
        ranks = self.setup.gpus_per_node
        owned = self.layout.owned_numel
        master = 4 * owned if self.keeps_master_copy else 0
        host = {"optimizer_states": ranks * (master + 8 * owned), "gradients": ranks * 4 * owned}
        if self.stage == 3:  # ZeRO-3's 16-bit gradient partitions (grad_partitions_flat_buffer) live on the CPU too
            host["gradients"] += ranks * self.dtype.itemsize * owned
        if self.setup.offload == "optimizer+params":
            host["weights"] = ranks * self.dtype.itemsize * self.layout.weight_numel
        return host


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over the step: layers forward, layers backward (and recomputed), optimizer."""

    def __init__(self, enabled: bool, num_layers: int, description: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=2 * num_layers + 2, desc=description, unit="stage", leave=False)

    def stage(self, text: str) -> None:
        """One stage done; text says which."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text)

    def watch_layers(self, layers: list[torch.nn.Module]) -> list:
        if self.bar is None:
            return []
        handles = []
        for index, layer in enumerate(layers):

            def on_forward(module, args, output, index=index):
                if torch.is_grad_enabled() and not getattr(module, "_moekit_seen", False):
                    module._moekit_seen = True
                    self.stage(f"forward layer {index + 1}/{len(layers)}")
                    out = output[0] if isinstance(output, tuple) else output
                    if isinstance(out, torch.Tensor) and out.requires_grad:
                        out.register_hook(lambda grad: self.stage(f"backward layer {index + 1}/{len(layers)}"))

            handles.append(layer.register_forward_hook(on_forward))
        return handles

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _deepspeed_linear(enabled: bool) -> Iterator[None]:
    """DeepSpeed's own ``torch.nn.functional.linear`` while enabled (``moekit.traps.zero3_linear_saves_inputs``)."""
    if not enabled:
        yield
        return
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    original = torch.nn.functional.linear
    torch.nn.functional.linear = zero3_linear_wrap
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def run_step(
    setup: TrainingSetup,
    *,
    device: str = "cpu",
    num_layers: int | None = None,
    progress: bool = False,
    source: str = "measure",
    seed: int = 0,
    on_phase: Callable[[str], None] | None = None,
) -> StepRecord:
    """Run one tracked training step of ``setup`` on ``device`` (``cpu``, ``cuda`` or ``fake``).

    For ``fake`` call it inside ``FakeTensorMode(allow_non_fake_inputs=True)`` (``moekit.simulate`` does).
    on_phase(name) is called at each phase boundary (``model``, ``forward``, ``backward``,
    ``optimizer_step``), e.g. to read CUDA allocator statistics.
    """
    depth = num_layers if num_layers is not None else as_config(setup.model).num_hidden_layers
    bar = _Progress(progress, depth, f"{source} {setup.model}")
    model = build_for_training(setup, device, num_layers=num_layers, seed=seed)
    bar.stage("model built")
    compute_device = torch.device("cpu" if device == "fake" else device)
    layers = _decoder_layers(model)
    tracker = _Tracker(compute_device.type)
    states = _RankStates(model, setup, tracker, compute_device)
    zero3 = states.allocate(model)
    saved = _SavedTensors(model, zero3)
    tracker.track_external(model)
    vocab = model.config.vocab_size
    torch.manual_seed(seed)
    input_ids = torch.randint(0, vocab, (setup.micro_batch, setup.seq_len), device=compute_device)
    phases: dict[str, dict[str, int]] = {}
    notify = on_phase or (lambda name: None)
    handles = bar.watch_layers(layers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Module is None")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with tracker:
            phases["model"] = tracker.categories()
            notify("model")
            tracker.reset_peak()
            with saved.hooks(), _deepspeed_linear(zero3_linear_saves_inputs(setup)):
                # Like moekit.train, the HF Trainer and XTuner: only the loss is kept, so the model's output
                # (and its 16-bit logits) is freed before backward.
                loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            phases["forward"] = tracker.categories()
            phases["forward_peak"] = tracker.categories("peak")
            notify("forward")
            handles += states.install_grad_hooks()
            tracker.reset_peak()
            with _deepspeed_linear(zero3_linear_saves_inputs(setup)):  # checkpointed layers run forward again here
                loss.backward()
            if zero3 is not None:
                zero3.release_all()
            states.end_backward()
            phases["backward"] = tracker.categories()
            phases["backward_peak"] = tracker.categories("peak")
            notify("backward")
            del loss
            bar.stage("optimizer step")
            tracker.reset_peak()
            states.step()
            phases["optimizer_step"] = tracker.categories()
            phases["optimizer_peak"] = tracker.categories("peak")
            notify("optimizer_step")
    for handle in handles:
        handle.remove()
    bar.close()
    phases["peak"] = max((phases[p] for p in ("forward_peak", "backward_peak", "optimizer_peak")), key=lambda c: sum(c.values()))
    breakdown = breakdown_from_phases(phases, setup, states.host_bytes(), source)
    return StepRecord(
        breakdown=breakdown,
        phases=phases,
        saved_for_backward_bytes=saved.num_bytes,
        num_layers=len(layers),
        num_params=states.layout.num_params,
        num_trainable_params=states.layout.num_trainable,
        notes=_notes(device, len(layers), zero3),
    )


def _notes(device: str, num_layers: int, zero3: _Zero3Gatherer | None) -> dict[str, str]:
    notes = {"device": device, "num_layers": str(num_layers)}
    if zero3 is not None:
        notes["zero3_max_gathered_bytes"] = str(zero3.max_gathered_bytes)
    return notes


def breakdown_from_phases(phases: dict[str, dict[str, int]], setup: TrainingSetup, per_host: dict[str, int], source: str) -> Breakdown:
    """Categories from the phases: states as held, activations at the end of forward, the rest at the peak."""
    peak = phases["peak"]
    total = sum(peak.values())
    per_gpu = {
        "weights": phases["model"]["weights"],
        "gradients": phases["backward"]["gradients"],
        "optimizer_states": phases["model"]["optimizer_states"],
        "activations": phases["forward"]["activations"],
        "buffers": peak["buffers"],
    }
    per_gpu["temporaries"] = max(0, total - sum(per_gpu.values()))
    return Breakdown(source=source, per_gpu=per_gpu, per_host=per_host, total_bytes=total, gpu_memory_bytes=setup.gpu_memory_bytes)
