"""Model presets and an exact parameter census (configs and building live in ``moekit.configs``).

Everything here is offline: shapes come from the JSON presets bundled in ``moekit/presets/models``
or from a local Hugging Face model folder; weights are seeded random numbers or read from local
safetensors files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from moekit.arch import component_of
from moekit.catalog import list_presets, preset_description, preset_dir  # noqa: F401 (re-exported)
from moekit.configs import (  # noqa: F401 (re-exported: the names callers have always imported from here)
    Device,
    ModelError,
    as_config,
    build_model,
    causal_lm_model_types,
    config_from_dict,
    config_with_layers,
    default_dtype,
    load_config,
    load_pretrained,
)

COMPONENTS = (
    "embeddings",
    "attention",
    "router",
    "experts",
    "shared_experts",
    "mlp",
    "norms",
    "lm_head",
    "lora",
)


@dataclass(frozen=True)
class MoEShape:
    """The mixture-of-experts facts a memory model needs (num_experts 0 means dense)."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_expert_intermediate_size: int


def moe_shape(config: PretrainedConfig) -> MoEShape:
    """Number of routed experts, top-k, and expert widths, read from the model itself (moekit.arch)."""
    from moekit.arch import arch_of

    arch = arch_of(config)
    return MoEShape(arch.num_experts, arch.experts_per_token, arch.expert_ffn, arch.shared_ffn)


# --------------------------------------------------------------------------------------------
# Parameter census
# --------------------------------------------------------------------------------------------


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also under ZeRO-3, where the local tensor is an empty shard and
    DeepSpeed keeps the real shape in ``ds_shape``."""
    return tuple(getattr(param, "ds_shape", param.shape))


def logical_numel(param: torch.Tensor) -> int:
    """A parameter's full element count, also under ZeRO-3 (see ``logical_shape``)."""
    return math.prod(logical_shape(param))


@dataclass
class ParamCensus:
    """Exact parameter counts by component, for a built model (meta, fake or real)."""

    model: str
    num_params_by_component: dict[str, int]
    num_trainable_by_component: dict[str, int]
    num_experts: int
    experts_per_token: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(self.num_params_by_component.values())

    @property
    def num_trainable_params(self) -> int:
        return sum(self.num_trainable_by_component.values())

    @property
    def num_active_params(self) -> int:
        """Parameters one token touches: every routed expert counts only top-k / num_experts."""
        total = self.num_params
        experts = self.num_params_by_component.get("experts", 0)
        if self.num_experts:
            return total - experts + experts * self.experts_per_token // self.num_experts
        return total

    def param_bytes(self, bytes_per_param: float) -> int:
        """Bytes to hold every parameter at a given width (2 for bf16/fp16, 4 for fp32, 0.5 nf4)."""
        return int(self.num_params * bytes_per_param)

    def as_dict(self) -> dict:
        return {
            "name": self.model,
            "num_params": self.num_params,
            "num_active_params": self.num_active_params,
            "num_trainable_params": self.num_trainable_params,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "num_params_by_component": dict(self.num_params_by_component),
            "bytes_by_dtype": dict(self.bytes_by_dtype),
        }


def census_of_module(module: torch.nn.Module, config: PretrainedConfig, name: str = "") -> ParamCensus:
    """Count every parameter of a built model by component (shared tensors counted once)."""
    counts = {c: 0 for c in COMPONENTS}
    trainable = {c: 0 for c in COMPONENTS}
    bytes_by_dtype: dict[str, int] = {}
    for param_name, param in module.named_parameters():  # named_parameters() dedupes tied weights
        component = component_of(param_name.removeprefix("base_model.model."))
        counts[component] += param.numel()
        if param.requires_grad:
            trainable[component] += param.numel()
        dtype_name = str(param.dtype).removeprefix("torch.")
        bytes_by_dtype[dtype_name] = bytes_by_dtype.get(dtype_name, 0) + param.numel() * param.element_size()
    shape = moe_shape(config)
    return ParamCensus(
        model=name or str(config.name_or_path),
        num_params_by_component={c: n for c, n in counts.items() if n},
        num_trainable_by_component={c: n for c, n in trainable.items() if n},
        num_experts=shape.num_experts,
        experts_per_token=shape.experts_per_token,
        bytes_by_dtype=bytes_by_dtype,
    )


def parameter_census(model: str | Path | PretrainedConfig) -> ParamCensus:
    """Exact census of a preset or config, built on the meta device (instant at any size)."""
    config = as_config(model)
    return census_of_module(build_model(config, "meta"), config, str(config.name_or_path))


def per_layer_census(model: str | Path | PretrainedConfig) -> dict[str, int]:
    """Parameters of one MoE decoder layer by component (of layer 0 in a dense model); models with
    dense first layers (DeepSeek, GLM) hold other layers too: ``moekit.arch.arch_of(...).layers``."""
    from moekit.arch import arch_of

    layers = arch_of(as_config(model)).layers
    layer = next((lay for lay in layers if lay.moe), layers[0])
    return dict(layer.num_params_by_component)
