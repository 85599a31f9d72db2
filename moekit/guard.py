"""The training guard: a falling loss proves little, so check that the weights meant to train moved.

Attention adapters can carry the loss down while the expert adapters never change (see the ZeRO-3
note in ``moekit.train``). After the first optimizer step and at every checkpoint, the guard compares
a fingerprint of every parameter group (one adapted weight's LoRA pair, or one component of the base
model) with the one taken before training: sums and a few sampled values, read one tensor at a time
(gathered from its ZeRO-3 shards, or from the fp32 master copy where DeepSpeed keeps it). Groups the
setup says are trainable must move; with ``check_frozen`` the frozen ones must not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from moekit.errors import RunFailure
from moekit.models import component_of, logical_numel
from moekit.training_setup import TrainingSetup

#: Values sampled per tensor for the fingerprint, besides its sum, sum of |x| and sum of x**2.
FINGERPRINT_SAMPLES = 8
#: A fingerprint entry changed when it moved by more than this, relative to its size (at least 1).
MOVE_TOLERANCE = 1e-12
#: Elements summed at a time, so a fingerprint never copies a whole (fused expert) tensor to float64.
FINGERPRINT_CHUNK = 1 << 24


class TrainingGuardError(RunFailure):
    """Weights the setup says are trainable did not change (or frozen ones did)."""




@dataclass(frozen=True)
class ParamGroup:
    """Parameters watched together: one adapted weight's LoRA pair, or one component of the base model."""

    label: str
    names: tuple[str, ...]
    trainable: bool
    num_params: int


def _strip_peft(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _lora_target_label(module_path: str, parameter_name: str | None) -> str:
    path = _strip_peft(module_path)
    component = component_of(f"{path}.{parameter_name or 'weight'}")
    if parameter_name and parameter_name != "weight":
        return f"{component} LoRA {parameter_name}"
    return f"{component} LoRA"


def _base_label(name: str) -> str:
    name = _strip_peft(name)
    component = component_of(name)
    if component == "experts":
        return f"experts {name.rpartition('.')[2]}"
    return component


def param_groups(model: torch.nn.Module, setup: TrainingSetup) -> list[ParamGroup]:
    """Groups the setup says are trainable (LoRA per adapted weight, or every base component) and the frozen rest.

    Trainability comes from the setup, not from ``requires_grad``: a group frozen by mistake is still
    expected to move, which is how the guard notices it.
    """
    from peft.tuners.lora import LoraLayer

    label_of: dict[str, str] = {}
    if setup.uses_lora:
        for module_path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                label = _lora_target_label(module_path, getattr(module, "parameter_name", None))
                for attribute in ("lora_A", "lora_B"):
                    for adapter_name, _ in getattr(module, attribute).named_parameters():
                        label_of[f"{module_path}.{attribute}.{adapter_name}"] = label
    members: dict[tuple[str, bool], list[str]] = {}
    sizes: dict[tuple[str, bool], int] = {}
    for name, param in model.named_parameters():
        trainable = name in label_of or not setup.uses_lora
        label = label_of.get(name) or _base_label(name)
        if not trainable:
            label = f"frozen {label}"
        key = (label, trainable)
        members.setdefault(key, []).append(name)
        sizes[key] = sizes.get(key, 0) + logical_numel(param)
    return [ParamGroup(label, tuple(names), trainable, sizes[(label, trainable)]) for (label, trainable), names in members.items()]


def lora_components(setup: TrainingSetup) -> set[str]:
    """The components (attention, experts, router, ...) the setup's LoRA spec adapts; empty for full fine-tuning."""
    from moekit.lora import resolve_targets

    return set(resolve_targets(setup.lora, setup.model).groups) if setup.uses_lora else set()


def check_lora_coverage(groups: list[ParamGroup], wanted: set[str]) -> None:
    """Every component the LoRA spec targets must have adapters in the built model."""
    present = {g.label.split(" LoRA")[0] for g in groups if g.trainable}
    missing = sorted(wanted - present)
    if missing:
        raise TrainingGuardError(
            f"the setup asks for LoRA on {', '.join(missing)}, but the built model has no such adapters; "
            "check the LoRA targets against `moekit lora --model ...`."
        )


@contextlib.contextmanager
def gathered(param: torch.nn.Parameter) -> Iterator[torch.Tensor]:
    """The full tensor of a parameter: gathered from its ZeRO-3 shards for the duration, or itself."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            yield param.data
    else:
        yield param.data


def master_weights(optimizer) -> dict[int, torch.Tensor]:
    """id(param) -> its fp32 master for DeepSpeed's no-ZeRO 16-bit optimizers (FP16_Optimizer and the unfused one).

    ZeRO-1/2/3 link each parameter to its master themselves (``_hp_mapping`` / ``ds_id``); without
    ZeRO, bf16/fp16 training keeps the masters in the optimizer, flat (fused) or one per parameter.
    Returns {} when the optimizer has neither layout (fp32 training: the parameters are the masters).
    """
    groups = getattr(optimizer, "fp16_groups", None)
    if not groups:
        return {}
    masters: dict[int, torch.Tensor] = {}
    flats, per_param = getattr(optimizer, "fp32_groups_flat", None), getattr(optimizer, "fp32_groups", None)
    for index, params in enumerate(groups):
        if flats is not None and sum(p.numel() for p in params) == flats[index].numel():
            offset = 0
            for param in params:
                masters[id(param)] = flats[index].detach().narrow(0, offset, param.numel())
                offset += param.numel()
        elif per_param is not None:
            for param, master in zip(params, per_param[index]):
                masters[id(param)] = master.detach()
    return masters


@contextlib.contextmanager
def watched_tensor(param: torch.nn.Parameter, masters: dict[int, torch.Tensor] | None = None) -> Iterator[torch.Tensor]:
    """What the guard fingerprints on this rank: its piece of the fp32 master weights the optimizer updates.

    Master weights, not the 16-bit copies: a bf16 weight of 1.0 only changes when its master moved
    by more than 2**-8, so after one step at lr 1e-3 the norms of a full fine-tune look frozen in
    bf16 although they trained. Each rank reads only its own fragment (ZeRO-1/2: ``_hp_mapping``;
    ZeRO-3: ``safe_get_local_fp32_param``), so nothing is gathered. Parameters without a master
    (frozen ones) are read as they are, gathered one at a time under ZeRO-3. Without ZeRO the
    16-bit optimizers keep the masters themselves (``masters``, from ``master_weights``).
    """
    if masters and id(param) in masters:
        yield masters[id(param)]
    elif hasattr(param, "ds_id"):
        if param.requires_grad:
            from deepspeed.utils import safe_get_local_fp32_param

            yield safe_get_local_fp32_param(param)
        else:
            with gathered(param) as full:
                yield full
    elif hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        yield mapping.get_hp_fragment() if mapping is not None else torch.empty(0)
    else:
        yield param.data


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """float64 [sum, sum of |x|, sum of x^2, 8 evenly spaced values]: changes whenever the tensor does, one read."""
    flat = tensor.detach().reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64)
    for chunk in flat.split(FINGERPRINT_CHUNK):
        wide = chunk.to(torch.float64)
        sums += torch.stack([wide.sum(), wide.abs().sum(), wide.square().sum()]).cpu()
    picks = torch.linspace(0, max(flat.numel() - 1, 0), steps=min(FINGERPRINT_SAMPLES, flat.numel())).long()
    return torch.cat([sums, flat[picks.to(flat.device)].to(torch.float64).cpu()])


def fingerprints(
    model: torch.nn.Module, groups: list[ParamGroup], masters: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """This rank's fingerprint of every watched parameter (all ranks take part: ZeRO-3 may gather)."""
    params = dict(model.named_parameters())
    result = {}
    for group in groups:
        for name in group.names:
            with watched_tensor(params[name], masters) as tensor:
                result[name] = fingerprint(tensor)
    return result


def _moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    return bool(((after - before).abs() > MOVE_TOLERANCE * before.abs().clamp(min=1.0)).any())


def _any_rank(flags: list[bool]) -> list[bool]:
    """True where any rank says True (each rank sees only its fragment of the masters)."""
    import torch.distributed as dist

    if not flags or not (dist.is_available() and dist.is_initialized()):
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.cpu()]


@dataclass
class GuardCheck:
    """One check: for each group, whether it moved since the previous check, and whether it stayed finite."""

    step: int
    moved: dict[str, bool]
    finite: dict[str, bool]
    trainable: dict[str, bool]

    @property
    def stuck(self) -> list[str]:
        return [g for g, t in self.trainable.items() if t and not self.moved[g]]

    @property
    def frozen_moved(self) -> list[str]:
        return [g for g, t in self.trainable.items() if not t and self.moved[g]]

    @property
    def not_finite(self) -> list[str]:
        return [g for g, ok in self.finite.items() if not ok]

    def as_dict(self) -> dict:
        return {"step": self.step, "moved": self.moved, "finite": self.finite, "trainable": self.trainable}


class TrainingGuard:
    """Fingerprints the watched groups, then checks that trainable ones moved (and frozen ones did not).

    Cost per check: one read of each rank's share of the trainable master weights and one
    all-reduce of a flag per group (frozen groups, with check_frozen, are gathered one tensor at a
    time under ZeRO-3).
    """

    def __init__(
        self, model: torch.nn.Module, groups: list[ParamGroup], check_frozen: bool = False, optimizer=None
    ) -> None:
        self.model = model
        self.groups = [g for g in groups if g.trainable or check_frozen]
        self.masters = master_weights(optimizer)
        self.previous = fingerprints(model, self.groups, self.masters)

    def check(self, step: int) -> GuardCheck:
        """Compare with the previous check; raise TrainingGuardError when a group did not do what it should."""
        current = fingerprints(self.model, self.groups, self.masters)
        moved = _any_rank([any(_moved(self.previous[n], current[n]) for n in g.names) for g in self.groups])
        broken = _any_rank([not all(bool(torch.isfinite(current[n]).all()) for n in g.names) for g in self.groups])
        labels = [g.label for g in self.groups]
        result = GuardCheck(step, dict(zip(labels, moved)), {g: not b for g, b in zip(labels, broken)},
                            {g.label: g.trainable for g in self.groups})
        self.previous = current
        problems = guard_problems(result, self.groups)
        if problems:
            raise TrainingGuardError(f"training guard at step {step}: " + "; ".join(problems))
        return result


def guard_problems(check: GuardCheck, groups: list[ParamGroup]) -> list[str]:
    """The sentences of a guard error, empty when the check passed."""
    sizes = {g.label: g.num_params for g in groups}
    problems = []
    if check.stuck:
        listed = ", ".join(f"{g} ({sizes[g]:,} params)" for g in check.stuck)
        problems.append(
            f"these groups are meant to train but did not change: {listed}. Their gradients were zero or they "
            "were frozen; a falling loss does not show that they train. A common cause is a model built inside a "
            "hand-opened deepspeed.zero.Init whose expert weights were never initialized (docs/training.md)"
        )
    if check.frozen_moved:
        problems.append(f"these groups are meant to stay frozen but changed: {', '.join(check.frozen_moved)}")
    if check.not_finite:
        problems.append(f"these groups hold NaN or inf: {', '.join(check.not_finite)}")
    return problems


