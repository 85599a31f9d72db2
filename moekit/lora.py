"""LoRA on today's MoE layouts: targets -> peft config, the fused-expert translation, an exact census.

In transformers 5 the experts of Mixtral, Qwen2-MoE and OLMoE are no longer one ``nn.Linear`` per
expert (``w1``/``w2``/``w3``); each layer holds two fused 3-D parameters,
``mlp.experts.gate_up_proj`` [E, 2*ffn, h] and ``mlp.experts.down_proj`` [E, h, ffn], and the router
``mlp.gate`` is a small module with a 2-D ``weight``. peft reaches those through
``LoraConfig(target_parameters=...)`` and the remaining ``nn.Linear`` modules through
``target_modules``. This module turns a learner's ``LoraSpec`` (groups such as ``attention`` and
``experts``, or raw names) into that split, explains every translation, and counts the adapter
parameters from shapes alone, so the count is instant and equals peft's own.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from moekit.errors import MoekitError
from moekit.models import as_config, build_model, component_of, logical_numel, logical_shape
from moekit.training_setup import LoraSpec

#: The groups a LoraSpec may name, besides raw module / parameter names.
GROUPS = ("attention", "experts", "router", "shared_experts", "all-linear")

#: Article-era (transformers 4) Mixtral expert Linears and the fused parameter each now lives in.
ARTICLE_EXPERT_NAMES = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"}


class LoraTargetError(MoekitError):
    """A LoRA target that does not exist in the model, or cannot be targeted as written."""


# --------------------------------------------------------------------------------------------
# What a model offers to LoRA: its Linear modules and its non-Linear weight matrices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetShape:
    """One kind of LoRA-able tensor, named relative to its decoder layer, with how often it occurs.

    kind ``linear``: an ``nn.Linear`` (peft ``target_modules``), dims (out, in).
    kind ``param``: a 2-D or 3-D weight outside any Linear (peft ``target_parameters``):
    the router weight (num_experts, h) or a fused expert tensor (E, a, b).
    """

    name: str
    kind: str
    dims: tuple[int, ...]
    count: int

    def num_lora_params(self, r: int) -> int:
        """peft's adapter size for rank r: A [in, r*E] plus B [r*E, out], no bias, per occurrence."""
        if len(self.dims) == 3:
            experts, a, b = self.dims
            return self.count * r * experts * (a + b)
        out_features, in_features = self.dims
        return self.count * r * (in_features + out_features)

    @property
    def component(self) -> str:
        """The census component (attention, experts, router, ...) this tensor belongs to."""
        if self.name == "lm_head":
            return "lm_head"
        path = self.name if self.kind == "param" else f"{self.name}.weight"
        return component_of(f"model.layers.0.{path}")


@dataclass(frozen=True)
class ModelInventory:
    """The LoRA-able tensors of one model, plus its total parameter count."""

    model_type: str
    num_params: int
    shapes: tuple[TargetShape, ...]
    #: weights bitsandbytes 4-bit would quantize: every ``nn.Linear`` transformers converts (not lm_head).
    num_bnb_quantizable_params: int = 0

    def named(self, name: str) -> list[TargetShape]:
        """Every shape under one name (several where layers differ in width)."""
        return [s for s in self.shapes if s.name == name]

    def kind(self, name: str) -> str:
        return self.named(name)[0].kind

    def component(self, name: str) -> str:
        return self.named(name)[0].component

    def num_lora_params(self, name: str, r: int) -> int:
        return sum(s.num_lora_params(r) for s in self.named(name))

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for s in self.shapes if s.kind == "linear"))

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.name for s in self.shapes if s.kind == "param"))

    @property
    def has_fused_experts(self) -> bool:
        return any(s.component == "experts" for s in self.shapes)


_LAYER_PREFIX = re.compile(r"^(?:.*\.)?layers\.\d+\.")


def _relative_name(name: str) -> str:
    """``model.layers.7.self_attn.q_proj`` -> ``self_attn.q_proj``; names outside layers stay whole."""
    return _LAYER_PREFIX.sub("", name)


def inventory_of_module(model: torch.nn.Module) -> ModelInventory:
    """Scan a built model (meta, fake or real): its Linear modules and its other 2-D/3-D weights."""
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise LoraTargetError("this model already carries LoRA adapters; pass the base model, its config or a preset name.")
    counts: dict[tuple[str, str, tuple[int, ...]], int] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = (_relative_name(name), "linear", (module.out_features, module.in_features))
            counts[key] = counts.get(key, 0) + 1
        elif not isinstance(module, torch.nn.Embedding):
            for param_name, param in module.named_parameters(prefix=name, recurse=False):
                shape = logical_shape(param)
                if len(shape) in (2, 3):
                    key = (_relative_name(param_name), "param", shape)
                    counts[key] = counts.get(key, 0) + 1
    shapes = tuple(TargetShape(name, kind, dims, count) for (name, kind, dims), count in counts.items())
    config = getattr(model, "config", None)
    num_params = sum(logical_numel(p) for p in model.parameters())
    return ModelInventory(getattr(config, "model_type", "unknown"), num_params, shapes, _num_bnb_quantizable_params(model))


def _num_bnb_quantizable_params(model: torch.nn.Module) -> int:
    """Weights that transformers' bitsandbytes integration swaps into ``Linear4bit``, by its own rules.

    transformers 5 (``replace_with_bnb_linear``) converts only modules whose type is exactly
    ``nn.Linear``, skipping the output embedding (lm_head), tied weights and ``_keep_in_fp32_modules``.
    The fused expert tensors and the router are not ``nn.Linear``, so they stay in 16 bits.
    """
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not hasattr(model, "all_tied_weights_keys"):
        return 0
    skip = get_keys_to_not_convert(model) + list(getattr(model, "_keep_in_fp32_modules", None) or ())
    return sum(
        logical_numel(module.weight)
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    )


@functools.lru_cache(maxsize=32)
def _inventory_of_config_json(config_json: str) -> ModelInventory:
    from transformers import AutoConfig

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    return inventory_of_module(build_model(config, "meta"))


def model_inventory(model_or_config: torch.nn.Module | PretrainedConfig | str | Path) -> ModelInventory:
    """The inventory of a built model, or of a preset / config built on the meta device (cached per config)."""
    if isinstance(model_or_config, torch.nn.Module):
        return inventory_of_module(model_or_config)
    config = as_config(model_or_config)
    return _inventory_of_config_json(json.dumps(config.to_dict(), sort_keys=True, default=str))


# --------------------------------------------------------------------------------------------
# Resolving targets
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedTargets:
    """What a LoraSpec's targets mean on one model, split the way peft wants them.

    target_modules: ``nn.Linear`` names relative to a decoder layer (``self_attn.q_proj``).
    target_parameters: fused / non-Linear weight paths (``mlp.experts.gate_up_proj``).
    groups: census component -> the names above that belong to it.
    notes: one sentence per translation moekit made (w1/w2/w3, all-linear, ...).
    rank_multipliers: targets whose rank is a multiple of r (w1+w3 fused into gate_up_proj: 2).
    """

    target_modules: tuple[str, ...]
    target_parameters: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    notes: list[str] = field(default_factory=list)
    rank_multipliers: dict[str, int] = field(default_factory=dict)

    @property
    def names(self) -> tuple[str, ...]:
        return self.target_modules + self.target_parameters


def _names_in_component(inventory: ModelInventory, component: str) -> list[str]:
    return list(dict.fromkeys(s.name for s in inventory.shapes if s.component == component))


def _group_names(group: str, inventory: ModelInventory, model_label: str, notes: list[str]) -> list[str]:
    """The tensors a group name stands for on this model; a clear error where it has none."""
    if group == "all-linear":
        names = [n for n in inventory.linear_names if inventory.component(n) != "lm_head"]
        names += _names_in_component(inventory, "experts")
        if _names_in_component(inventory, "router"):
            notes.append(
                "all-linear = every nn.Linear except lm_head, plus the fused expert tensors; the router "
                "(mlp.gate) is not an nn.Linear in transformers 5 and is left out: add 'router' to train it."
            )
        return names
    names = _names_in_component(inventory, group)
    if names:
        return names
    if group == "experts":
        raise LoraTargetError(
            f"{model_label} is a dense model: it has no experts. Its MLP is the nn.Linear modules "
            f"{', '.join(_names_in_component(inventory, 'mlp'))}; target those names or 'all-linear'."
        )
    if group == "router":
        raise LoraTargetError(f"{model_label} has no router (mlp.gate): it is not a mixture-of-experts model.")
    raise LoraTargetError(
        f"{model_label} has no {group.replace('_', ' ')}; groups it does have: "
        f"{', '.join(g for g in GROUPS if g == 'all-linear' or _names_in_component(inventory, g))}."
    )


def _matches(name: str, target: str) -> bool:
    """peft's rule: the whole name, or a dotted suffix of it; a weight also answers to its module's name."""
    candidates = (name, name.removesuffix(".weight")) if name.endswith(".weight") else (name,)
    return any(c == target or c.endswith(f".{target}") for c in candidates)


def _raw_names(target: str, inventory: ModelInventory, model_label: str) -> list[str]:
    """A raw module or parameter name (``q_proj``, ``gate_up_proj``, ``mlp.gate``) resolved on this model."""
    linear = [n for n in inventory.linear_names if _matches(n, target)]
    params = [n for n in inventory.param_names if _matches(n, target)]
    if linear and params:
        raise LoraTargetError(
            f"'{target}' is ambiguous on {model_label}: it names the nn.Linear {', '.join(linear)} and the "
            f"parameter {', '.join(params)}; write the full name of the one you mean, or a group "
            "(experts, shared_experts, ...)."
        )
    if linear or params:
        return linear or params
    raise LoraTargetError(
        f"'{target}' is not in {model_label}. Groups: {', '.join(GROUPS)}. nn.Linear modules: "
        f"{', '.join(inventory.linear_names)}. Other weights (peft target_parameters): "
        f"{', '.join(inventory.param_names) or 'none'}."
    )


def _translate_article_names(
    article: list[str], inventory: ModelInventory, model_label: str, notes: list[str]
) -> tuple[list[str], dict[str, int]]:
    """Map transformers-4 ``w1``/``w2``/``w3`` onto the fused expert tensors, as peft's own converter does."""
    fused = {n.rpartition(".")[2]: n for n in _names_in_component(inventory, "experts")}
    if "gate_up_proj" not in fused or "down_proj" not in fused:
        raise LoraTargetError(
            f"{', '.join(article)} are transformers-4 Mixtral expert names, and {model_label} has no fused "
            f"experts to map them to. nn.Linear modules here: {', '.join(inventory.linear_names)}."
        )
    names: list[str] = []
    multipliers: dict[str, int] = {}
    gate_up = [n for n in ("w1", "w3") if n in article]
    if len(gate_up) == 1:
        have, missing = gate_up[0], ({"w1", "w3"} - set(gate_up)).pop()
        raise LoraTargetError(
            f"'{have}' cannot be targeted without '{missing}': in transformers 5 Mixtral's w1 (gate) and w3 "
            f"(up) are fused into one tensor, {fused['gate_up_proj']} [experts, 2*ffn, hidden], so LoRA "
            f"adapts both or neither. Either add '{missing}' (or use the group 'experts'), or drop "
            f"'{have}' and keep only w2 ({fused['down_proj']})."
        )
    if gate_up:
        names.append(fused["gate_up_proj"])
        multipliers[fused["gate_up_proj"]] = 2
        notes.append(
            f"w1+w3 -> {fused['gate_up_proj']}: transformers 5 fuses the gate (w1) and up (w3) projections "
            "of all experts into one 3-D tensor; as peft's own converter does, its LoRA gets rank 2r and "
            "alpha 2*alpha so each half keeps rank r and scale alpha/r (use 'experts' for rank r)."
        )
    if "w2" in article:
        names.append(fused["down_proj"])
        notes.append(f"w2 -> {fused['down_proj']}: the down projections of all experts, fused into one 3-D tensor.")
    return names, multipliers


def _model_label(model_or_config: object) -> str:
    if isinstance(model_or_config, (str, Path)):
        return f"'{model_or_config}'"
    config = model_or_config if isinstance(model_or_config, PretrainedConfig) else getattr(model_or_config, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "the model")
    return f"'{name}'"


def resolve_targets(
    spec: LoraSpec, model_or_config: torch.nn.Module | PretrainedConfig | str | Path
) -> ResolvedTargets:
    """Resolve a LoraSpec's targets (groups, raw names, article-era w1/w2/w3) against a real model's layout."""
    inventory = model_inventory(model_or_config)
    label = _model_label(model_or_config)
    notes: list[str] = []
    names: list[str] = []
    article = [t for t in spec.targets if t in ARTICLE_EXPERT_NAMES and t not in inventory.linear_names]
    for target in spec.targets:
        if target in article:
            continue
        if target in GROUPS:
            names += _group_names(target, inventory, label, notes)
        else:
            names += _raw_names(target, inventory, label)
    multipliers: dict[str, int] = {}
    if article:
        translated, multipliers = _translate_article_names(article, inventory, label, notes)
        clash = [n for n in multipliers if n in names]
        if clash:
            raise LoraTargetError(
                f"targets name {clash[0]} twice: through w1+w3 (rank 2r) and through "
                "'experts'/'gate_up_proj' (rank r). Keep one of the two."
            )
        names += translated
    names = list(dict.fromkeys(names))  # de-duplicate, keep order
    _refuse_what_peft_renames(names, inventory, spec)
    groups: dict[str, tuple[str, ...]] = {}
    for name in names:
        component = inventory.component(name)
        groups[component] = groups.get(component, ()) + (name,)
    return ResolvedTargets(
        target_modules=tuple(n for n in names if inventory.kind(n) == "linear"),
        target_parameters=tuple(n for n in names if inventory.kind(n) == "param"),
        groups=groups,
        notes=notes,
        rank_multipliers=multipliers,
    )


def peft_renamed_targets(target_modules: Sequence[str], model_type: str) -> tuple[str, ...]:
    """The Linear targets peft itself moves to the fused experts on this model type.

    peft converts every LoRA config on the transformers-5 MoE families whose checkpoints were renamed from v4
    (``convert_peft_config_for_transformers``, peft/utils/transformers_weight_conversion.py). On DeepSeek, GLM,
    Qwen3-MoE, OLMoE... it reads any target ending in gate_proj, up_proj or down_proj as the experts' v4 name and
    moves it to ``mlp.experts.*``: a dense MLP's or shared expert's projection then gets no adapter, and the
    experts' LoRA comes instead (gate_up_proj at rank 2r). peft is asked, on a copy of the config.
    """
    if not target_modules:
        return ()
    from types import SimpleNamespace

    from peft import LoraConfig
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    config = LoraConfig(r=8, target_modules=list(target_modules))
    convert_peft_config_for_transformers(config, SimpleNamespace(config=SimpleNamespace(model_type=model_type)), None)
    kept = set(config.target_modules or ())
    return tuple(name for name in target_modules if name not in kept)


def _refuse_what_peft_renames(names: list[str], inventory: ModelInventory, spec: LoraSpec) -> None:
    from peft import __version__ as peft_version

    linear = [name for name in names if inventory.kind(name) == "linear"]
    try:
        renamed = peft_renamed_targets(linear, inventory.model_type)
    except ValueError as err:  # e.g. gate_proj without up_proj: peft refuses the config itself
        raise LoraTargetError(f"peft {peft_version} refuses these targets on {inventory.model_type}: {err}") from None
    if not renamed:
        return
    components = sorted({inventory.component(name) for name in renamed})
    kept = [t for t in spec.targets if t not in ("all-linear", *components)] or ["attention", "experts"]
    raise LoraTargetError(
        f"peft {peft_version} reads {renamed[0]} on {inventory.model_type} as an expert projection (its "
        f"transformers-4 name conversion) and puts the LoRA on the fused experts instead, so "
        f"{' and '.join(components)} would get no adapter; leave {' and '.join(components)} out of the targets, "
        f"e.g. targets={','.join(dict.fromkeys(kept))}."
    )


# --------------------------------------------------------------------------------------------
# peft
# --------------------------------------------------------------------------------------------


def _check_dropout(spec: LoraSpec, resolved: ResolvedTargets) -> None:
    if spec.dropout and resolved.target_parameters:
        raise LoraTargetError(
            f"lora dropout {spec.dropout} cannot be used with {', '.join(resolved.target_parameters)}: peft "
            "applies LoRA to fused / non-Linear weights without an input to drop out. Set dropout=0, or "
            "target only nn.Linear modules."
        )


def peft_config(spec: LoraSpec, model_or_config: torch.nn.Module | PretrainedConfig | str | Path):
    """The ``peft.LoraConfig`` for this spec on this model (target_modules + target_parameters)."""
    from peft import LoraConfig

    resolved = resolve_targets(spec, model_or_config)
    _check_dropout(spec, resolved)
    patterns = {rf".*\.{re.escape(n.rpartition('.')[2])}": m for n, m in resolved.rank_multipliers.items()}
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(resolved.target_modules),
        target_parameters=list(resolved.target_parameters) or None,
        rank_pattern={p: spec.r * m for p, m in patterns.items()},
        alpha_pattern={p: spec.alpha * m for p, m in patterns.items()},
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, spec: LoraSpec, autocast_adapter_dtype: bool = True):
    """Wrap a built model with LoRA adapters (``peft.get_peft_model``); only the adapters stay trainable.

    Works on meta-device models too (shapes only), which is how the census tests check full-size models.
    autocast_adapter_dtype: peft's own switch (upcast 16-bit adapters to fp32; ``moekit.traps.adapter_precision``).
    """
    from peft import get_peft_model

    config = peft_config(spec, model)
    with warnings.catch_warnings():
        # peft matches rank_pattern against module names, so the pattern for the fused gate_up_proj
        # (which peft's own w1/w3 converter sets the same way) is reported as unmatched, yet applied.
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        return get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)


# --------------------------------------------------------------------------------------------
# Trainable-parameter census, from shapes alone
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraCensus:
    """Exact LoRA adapter sizes by group, equal to peft's ``get_nb_trainable_parameters()``."""

    model: str
    r: int
    num_base_params: int
    by_group: dict[str, int]
    by_target: dict[str, int]
    notes: tuple[str, ...] = ()

    @property
    def num_trainable_params(self) -> int:
        return sum(self.by_group.values())

    @property
    def num_total_params(self) -> int:
        """Base model plus adapters, as peft counts ``all_param``."""
        return self.num_base_params + self.num_trainable_params

    @property
    def fraction(self) -> float:
        """Trainable share of all parameters (peft prints it as ``trainable%``)."""
        return self.num_trainable_params / self.num_total_params

    def as_dict(self) -> dict:
        return {
            "model": self.model,
            "r": self.r,
            "num_trainable_params": self.num_trainable_params,
            "num_total_params": self.num_total_params,
            "fraction": self.fraction,
            "by_group": dict(self.by_group),
            "by_target": dict(self.by_target),
            "notes": list(self.notes),
        }


def lora_census(
    model_or_config: torch.nn.Module | PretrainedConfig | str | Path, spec: LoraSpec
) -> LoraCensus:
    """Count the adapter parameters a spec adds, analytically: r*(in+out) per Linear, r*E*(a+b) per fused tensor."""
    inventory = model_inventory(model_or_config)
    resolved = resolve_targets(spec, model_or_config)
    by_target = {
        name: inventory.num_lora_params(name, spec.r * resolved.rank_multipliers.get(name, 1)) for name in resolved.names
    }
    by_group = {group: sum(by_target[n] for n in names) for group, names in resolved.groups.items()}
    return LoraCensus(
        model=_model_label(model_or_config).strip("'"),
        r=spec.r,
        num_base_params=inventory.num_params,
        by_group=by_group,
        by_target=by_target,
        notes=tuple(resolved.notes),
    )


# --------------------------------------------------------------------------------------------
# QLoRA: a 4-bit base under bitsandbytes
# --------------------------------------------------------------------------------------------

_COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class QuantSpec:
    """bitsandbytes 4-bit storage of the base weights, as QLoRA uses it.

    Storage per weight (bitsandbytes ``quantize_4bit``): two 4-bit codes per byte (0.5 B); one fp32
    absmax per block of ``block_size`` weights (4/64 B). With double quantization the absmax values are
    themselves quantized to 8 bits in blocks of ``absmax_block_size`` (1/64 B per weight) plus one fp32
    scale per such block (4/(64*256) B). So nf4 + double quant = 0.5 + 1/64 + 4/16384
    = 0.515869140625 B per weight; without double quant 0.5 + 4/64 = 0.5625. A few constants per tensor
    (a 256-entry fp32 code book and an fp32 offset, ~1 KiB) are left out.
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    block_size: int = 64
    absmax_block_size: int = 256

    @property
    def bytes_per_param(self) -> float:
        codes = self.bits / 8
        if not self.double_quant:
            return codes + 4 / self.block_size
        return codes + 1 / self.block_size + 4 / (self.block_size * self.absmax_block_size)


def qlora_spec(setup) -> QuantSpec:
    """The 4-bit storage a QLoRA setup uses; the compute dtype follows the setup's precision."""
    return QuantSpec(compute_dtype=_COMPUTE_DTYPES[setup.precision])


def bitsandbytes_config(setup):
    """transformers' ``BitsAndBytesConfig`` for a QLoRA setup; raises unless bitsandbytes and a CUDA GPU are here."""
    import importlib.util

    if setup.method != "qlora":
        raise MoekitError(f"method='{setup.method}' loads the base unquantized; bitsandbytes is for method='qlora'.")
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes is not installed (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("torch sees no CUDA GPU")
    if missing:
        raise MoekitError(
            "QLoRA loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU and the "
            f"bitsandbytes package; here {' and '.join(missing)}. Plan QLoRA with estimate/plan on this "
            "machine, or use method='lora' to run on the CPU."
        )
    from transformers import BitsAndBytesConfig

    quant = qlora_spec(setup)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
    )


def num_quantized_params(model_or_config: torch.nn.Module | PretrainedConfig | str | Path) -> int:
    """Base weights a 4-bit QLoRA load quantizes: the ``nn.Linear`` weights except lm_head.

    Everything else stays 16-bit: embeddings, lm_head, norms, Linear biases, the router and, on
    transformers-5 MoE models, the fused expert tensors (3-D parameters that bitsandbytes' Linear
    replacement never sees): for Mixtral 8x7B that is most of the model.
    """
    return model_inventory(model_or_config).num_bnb_quantizable_params


def num_unquantized_params(model_or_config: torch.nn.Module | PretrainedConfig | str | Path) -> int:
    """Base parameters a 4-bit QLoRA load keeps in 16 bits (see ``num_quantized_params``)."""
    inventory = model_inventory(model_or_config)
    return inventory.num_params - inventory.num_bnb_quantizable_params
