"""Architecture knowledge of a causal LM, read from the Hugging Face model built on the meta device.

Every other module asks here instead of keying on ``model_type`` strings: which decoder layers are
mixture-of-experts and which dense, where the experts, router and shared experts live, the attention
kind (GQA / MHA / MLA, sliding windows, sinks, q/k norms, biases), and the widths autograd saves.
The model is built once per config on the meta device (no memory; 0.2 s for DeepSeek-V3's 61
layers) and each decoder layer is read from its modules and parameter shapes. ``model_type`` is
used only where the model cannot tell (Mixtral's always-renormalized top-k).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moekit.errors import MoekitError

if TYPE_CHECKING:  # torch and transformers are imported where a model is read, so the dataclasses
    import torch  # below load without them (a warm ``moekit estimate`` imports neither)
    from transformers import PretrainedConfig

#: Names transformers gives a decoder layer's feed-forward block, across families.
_FFN_BLOCK_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
#: Names of the always-on shared expert(s) inside an MoE block, across families.
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp", "shared_expert_gate")
#: Names of the router inside an MoE block (its weight is [num_experts, hidden]).
_ROUTER_NAMES = ("gate", "router")
#: Names of the attention module inside a decoder layer.
_ATTENTION_NAMES = ("self_attn", "attention", "attn")


class ArchError(MoekitError):
    """The model's structure is not one moekit can read (the message says what it found)."""


def component_of(param_name: str) -> str:
    """Which component of a decoder-only LM a parameter belongs to, from its dotted name.

    One rule for every family: LoRA adapters; embeddings; lm_head; shared experts (Qwen's
    ``shared_expert``/``shared_expert_gate``, DeepSeek/GLM's ``shared_experts``, Hunyuan's
    ``shared_mlp``); routed experts (the fused ``experts`` tensors); norms; attention (sinks and
    MLA projections included); the router (``gate``/``router`` of the feed-forward block); the dense MLP.
    """
    parts = param_name.split(".")
    if any(part.startswith("lora_") for part in parts):
        return "lora"
    if "embed_tokens" in parts:
        return "embeddings"
    if parts[0] == "lm_head":
        return "lm_head"
    if any(part in _SHARED_NAMES for part in parts):
        return "shared_experts"
    if "experts" in parts:
        return "experts"
    if len(parts) >= 2 and ("norm" in parts[-2] or "layernorm" in parts[-2]):
        return "norms"
    if any(part in _ATTENTION_NAMES for part in parts):
        return "attention"
    block = next((i for i, part in enumerate(parts) if part in _FFN_BLOCK_NAMES), None)
    if block is not None and block + 1 < len(parts) and parts[block + 1] in _ROUTER_NAMES:
        return "router"
    if block is not None:
        return "mlp"
    raise ArchError(f"cannot tell which component '{param_name}' belongs to")


@dataclass(frozen=True)
class LayerArch:
    """One decoder layer as built: MoE or dense, its attention window, and its parameter counts."""

    moe: bool
    sliding_window: int | None  # None: full causal attention in this layer
    num_params_by_component: tuple[tuple[str, int], ...]
    largest_param: int  # elements of the layer's largest single tensor (a fused expert stack)
    num_fp32_params: int  # kept in fp32 in a 16-bit model (DeepSeek/GLM routers: _keep_in_fp32_modules_strict)

    @property
    def num_params(self) -> int:
        return sum(n for _, n in self.num_params_by_component)

    def count(self, component: str) -> int:
        return dict(self.num_params_by_component).get(component, 0)


@dataclass(frozen=True)
class Arch:
    """What the memory model needs to know about one architecture, read from its modules."""

    model_type: str
    num_layers: int
    hidden: int
    vocab: int
    num_heads: int
    num_kv_heads: int
    attention: str  # "mha", "gqa" or "mla" (DeepSeek's multi-head latent attention)
    q_dim: int  # width of the queries SDPA sees (heads x q/k head dim)
    k_dim: int  # width of the keys SDPA sees before GQA repetition
    v_dim: int  # width of the values SDPA sees before GQA repetition
    head_dim: int  # q/k head dim
    rotary_table_width: int  # cos + sin widths of the rotary tables the model computes once per step
    rotary_complex: bool  # DeepSeek-V2 keeps them as complex64
    q_lora_rank: int  # MLA: width of the compressed query (0: no q compression)
    kv_lora_rank: int  # MLA: width of the compressed key/value latent
    qk_norm: str  # "none", "head" (per-head RMSNorm, Qwen3/GLM/Hunyuan) or "full" (OLMoE)
    attention_bias: bool
    sinks: bool  # gpt-oss: a learned logit per head in the softmax (eager attention only)
    norm_kind: str  # "rms" or "layer" (LayerNorm with bias, PhiMoE)
    num_experts: int
    experts_per_token: int
    expert_ffn: int
    experts_bias: bool  # gpt-oss: biases on the fused expert tensors
    router_fp32: bool  # DeepSeek/GLM: the router weight stays fp32 in a 16-bit model
    router_scoring: str  # "softmax" over all experts, "sigmoid" (DeepSeek-V3/GLM) or "topk_softmax" (gpt-oss)
    router_groups: tuple[int, int]  # DeepSeek's group-limited routing: (groups, groups kept); (0, 0) if none
    shared_ffn: int  # width of the always-on shared expert(s) (0: none)
    shared_gate: bool  # Qwen2-MoE: a sigmoid gate on the shared expert
    dense_ffn: int  # width of the dense MLP in dense layers (0: none)
    normalizes_top_k: bool
    #: bytes per token the decoder layer's norm saves at widths 16 and 32, per (width_bytes, trainable),
    #: measured on its class when the model is read (``measure_norm``); ``norm_saved_bytes`` extrapolates.
    norm_saved: tuple[tuple[int, bool, float, float], ...]
    layers: tuple[LayerArch, ...]
    moe_block_classes: tuple[str, ...]  # class names of the MoE blocks (ZeRO-3 leaf modules)
    eager_only: bool  # transformers has no SDPA path for this family (gpt-oss)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def num_moe_layers(self) -> int:
        return sum(layer.moe for layer in self.layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def layer_kinds(self) -> list[LayerArch]:
        """One representative of each distinct layer kind, first occurrence first."""
        seen: dict[tuple, LayerArch] = {}
        for layer in self.layers:
            seen.setdefault((layer.moe, layer.sliding_window, layer.num_params_by_component), layer)
        return list(seen.values())


def is_moe_block(module: torch.nn.Module) -> bool:
    """A feed-forward block that routes tokens to experts: it holds an experts module and a router."""
    children = dict(module.named_children())
    has_experts = "experts" in children
    has_router = any(name in children for name in _ROUTER_NAMES)
    return has_experts and has_router


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """The module classes that hold a router and experts (MixtralSparseMoeBlock and its relatives)."""
    return list(dict.fromkeys(type(m) for m in model.modules() if is_moe_block(m)))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a built causal LM, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ArchError(f"{type(model).__name__} has no decoder layers moekit can find")
    return layers


def _child(module: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Module | None:
    children = dict(module.named_children())
    return next((children[n] for n in names if n in children), None)


def _linear_in(module: torch.nn.Module | None, *names: str) -> torch.nn.Linear | None:
    import torch

    if module is None:
        return None
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, torch.nn.Linear):
            return found
    return None


def _mlp_width(mlp: torch.nn.Module | None) -> int:
    """The intermediate width of a gated MLP (the in-features of its down projection)."""
    down = _linear_in(mlp, "down_proj", "w2", "c_proj")
    return down.in_features if down is not None else 0


def _layer_window(layer: torch.nn.Module, attention: torch.nn.Module, config: PretrainedConfig) -> int | None:
    window = getattr(attention, "sliding_window", None)
    if window is None:
        types = getattr(config, "layer_types", None)
        index = getattr(attention, "layer_idx", None)
        if isinstance(types, list) and index is not None and index < len(types):
            window = config.sliding_window if types[index] == "sliding_attention" else None
        elif getattr(config, "use_sliding_window", True):
            window = getattr(config, "sliding_window", None) if not isinstance(types, list) else None
    return int(window) if window else None


def _read_layer(layer: torch.nn.Module, config: PretrainedConfig) -> LayerArch:
    import torch

    counts: dict[str, int] = {}
    largest = num_fp32 = 0
    for name, param in layer.named_parameters():
        component = component_of(f"model.layers.0.{name}")
        counts[component] = counts.get(component, 0) + param.numel()
        largest = max(largest, param.numel())
        num_fp32 += param.numel() if param.dtype == torch.float32 else 0  # built in bf16 (arch_of)
    ffn = _child(layer, _FFN_BLOCK_NAMES)
    attention = _child(layer, _ATTENTION_NAMES)
    window = _layer_window(layer, attention, config) if attention is not None else None
    return LayerArch(
        moe=ffn is not None and is_moe_block(ffn),
        sliding_window=window,
        num_params_by_component=tuple(sorted(counts.items())),
        largest_param=largest,
        num_fp32_params=num_fp32,
    )


def _attention_facts(attention: torch.nn.Module, config: PretrainedConfig, hidden: int) -> dict:
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    o_proj = _linear_in(attention, "o_proj", "out_proj", "dense")
    if hasattr(attention, "kv_a_proj_with_mqa"):  # MLA: keys and values expanded to every head
        qk_head_dim = int(attention.qk_head_dim)
        v_head_dim = int(attention.v_head_dim)
        return dict(
            attention="mla", num_heads=num_heads, num_kv_heads=num_heads, q_dim=num_heads * qk_head_dim,
            k_dim=num_heads * qk_head_dim, v_dim=num_heads * v_head_dim, head_dim=qk_head_dim,
            q_lora_rank=int(attention.q_lora_rank or 0), kv_lora_rank=int(attention.kv_lora_rank),
            attention_bias=o_proj is not None and o_proj.bias is not None,
        )
    q_proj = _linear_in(attention, "q_proj")
    k_proj = _linear_in(attention, "k_proj")
    v_proj = _linear_in(attention, "v_proj")
    if q_proj is None or k_proj is None or v_proj is None:
        raise ArchError(f"{type(attention).__name__} has no q_proj/k_proj/v_proj moekit can read")
    head_dim = int(getattr(attention, "head_dim", None) or q_proj.out_features // num_heads)
    return dict(
        attention="gqa" if num_kv_heads < num_heads else "mha", num_heads=num_heads, num_kv_heads=num_kv_heads,
        q_dim=q_proj.out_features, k_dim=k_proj.out_features, v_dim=v_proj.out_features, head_dim=head_dim,
        q_lora_rank=0, kv_lora_rank=0,
        attention_bias=q_proj.bias is not None,
    )


def _qk_norm(attention: torch.nn.Module, head_dim: int) -> str:
    for name in ("q_norm", "query_layernorm"):
        norm = getattr(attention, name, None)
        if norm is not None and getattr(norm, "weight", None) is not None:
            return "head" if norm.weight.shape[-1] == head_dim else "full"
    return "none"


def _router_scoring(router: torch.nn.Module) -> tuple[str, tuple[int, int]]:
    """How the router scores experts, read from the router module: DeepSeek-V3's sigmoid router keeps
    a score-correction bias; gpt-oss's has a bias and softmaxes only the top-k logits; group-limited
    routers carry their group counts."""
    groups = (int(getattr(router, "num_group", 0) or 0), int(getattr(router, "topk_group", 0) or 0))
    if getattr(router, "topk_method", "group_limited_greedy") == "greedy":
        groups = (0, 0)
    if hasattr(router, "e_score_correction_bias"):
        return "sigmoid", groups
    if getattr(router, "bias", None) is not None:
        return "topk_softmax", groups
    return "softmax", groups


def _rotary_tables(model: torch.nn.Module) -> tuple[int, bool]:
    """(total width of the tables the rotary embedding returns, whether they are complex), read by
    running it on the model's device: cos and sin in the model dtype, or DeepSeek-V2's complex64."""
    import torch

    rotary = next((m for name, m in model.named_modules() if name.endswith("rotary_emb")), None)
    if rotary is None:
        return 0, False
    param = next(model.parameters())
    x = torch.zeros(1, 2, 1, device=param.device, dtype=param.dtype)
    out = rotary(x, torch.arange(2, device=param.device)[None])
    tables = out if isinstance(out, tuple) else (out,)
    return sum(int(t.shape[-1]) for t in tables), any(t.is_complex() for t in tables)


def read_arch(model: torch.nn.Module) -> Arch:
    """Read the architecture facts from a built causal LM (meta, fake or real)."""
    import torch

    config = model.config
    layers = decoder_layers(model)
    hidden = int(config.hidden_size)
    attention = _child(layers[0], _ATTENTION_NAMES)
    if attention is None:
        raise ArchError(f"{type(layers[0]).__name__} has no attention module moekit can find")
    facts = _attention_facts(attention, config, hidden)
    rotary = _rotary_tables(model)
    moe_blocks = [ffn for ffn in (_child(layer, _FFN_BLOCK_NAMES) for layer in layers) if ffn is not None and is_moe_block(ffn)]
    dense_blocks = [ffn for ffn in (_child(layer, _FFN_BLOCK_NAMES) for layer in layers) if ffn is not None and not is_moe_block(ffn)]
    num_experts = experts_per_token = expert_ffn = shared_ffn = 0
    experts_bias = shared_gate = router_fp32 = False
    normalizes = False
    scoring, groups = "softmax", (0, 0)
    if moe_blocks:
        block = moe_blocks[0]
        experts = block.experts
        stacked = [p for p in experts.parameters(recurse=False) if p.dim() == 3]
        if not stacked:
            raise ArchError(f"{type(experts).__name__} holds no fused 3-D expert tensors moekit can read")
        num_experts = int(stacked[0].shape[0])
        # gate_up_proj is [E, 2*ffn, hidden] or [E, hidden, 2*ffn] (gpt-oss, Llama 4)
        gate_up = stacked[0]
        rows, cols = gate_up.shape[1:]
        expert_ffn = int(cols // 2 if rows == hidden else rows // 2)
        experts_bias = any(p.dim() == 2 for p in experts.parameters(recurse=False))
        router = _child(block, _ROUTER_NAMES)
        top_k = next((getattr(m, a) for m in (router, block, experts) for a in ("top_k", "moe_topk") if m is not None
                      and isinstance(getattr(m, a, None), int)), None)
        if top_k is None:
            raise ArchError(f"{type(block).__name__} does not say how many experts a token goes to (top_k)")
        experts_per_token = int(top_k)
        router_weight = next(p for p in router.parameters() if p.dim() == 2)
        router_fp32 = router_weight.dtype == torch.float32  # arch_of builds in bf16
        normalizes = bool(getattr(router, "norm_topk_prob", config.model_type == "mixtral"))
        scoring, groups = _router_scoring(router)
        shared = _child(block, ("shared_expert", "shared_experts", "shared_mlp"))
        shared_ffn = _mlp_width(shared)
        shared_gate = hasattr(block, "shared_expert_gate")
    norm = layers[0].input_layernorm if hasattr(layers[0], "input_layernorm") else None
    if norm is None:
        raise ArchError(f"{type(layers[0]).__name__} has no input_layernorm moekit can read")
    return Arch(
        model_type=config.model_type,
        num_layers=len(layers),
        hidden=hidden,
        vocab=int(config.vocab_size),
        **facts,
        rotary_table_width=rotary[0],
        rotary_complex=rotary[1],
        qk_norm=_qk_norm(attention, facts["head_dim"]),
        sinks=hasattr(attention, "sinks"),
        norm_kind="layer" if isinstance(norm, torch.nn.LayerNorm) else "rms",
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        expert_ffn=expert_ffn,
        experts_bias=experts_bias,
        router_fp32=router_fp32,
        router_scoring=scoring,
        router_groups=groups,
        shared_ffn=shared_ffn,
        shared_gate=shared_gate,
        dense_ffn=_mlp_width(dense_blocks[0]) if dense_blocks else 0,
        normalizes_top_k=normalizes,
        norm_saved=measure_norm(type(norm)),
        layers=tuple(_read_layer(layer, config) for layer in layers),
        moe_block_classes=tuple(c.__name__ for c in moe_block_classes(model)),
        eager_only=not getattr(type(model), "_supports_sdpa", True),
    )


@functools.lru_cache(maxsize=64)
def _arch_of_config_json(config_json: str) -> Arch:
    import torch

    from moekit.configs import build_model, config_from_dict

    config = config_from_dict(json.loads(config_json), "config")
    return read_arch(build_model(config, "meta", dtype=torch.bfloat16, attn_implementation=None))


def arch_of(model: str | PretrainedConfig) -> Arch:
    """The architecture of a preset, folder or config (built on meta once per config, then cached)."""
    from moekit.configs import as_config

    config = as_config(model)
    return _arch_of_config_json(json.dumps(config.to_dict(), sort_keys=True, default=str))


def measure_norm(norm_class: type) -> tuple[tuple[int, bool, float, float], ...]:
    """Bytes per token a norm module of this class saves for backward at widths 16 and 32, for each
    working width (bf16, fp32) and whether its weight trains.

    Measured, not assumed: the norm runs on a few real CPU rows under ``saved_tensors_hooks``
    (microseconds). This is how LayerNorm (input, mean, rstd), Llama's RMSNorm (fp32 input copy, rstd,
    16-bit normalized) and gpt-oss's RMSNorm (fp32 normalized) each get their own figure.
    """
    import torch

    def per_token(width: int, width_bytes: int, trainable: bool) -> float:
        dtype = {2: torch.bfloat16, 4: torch.float32}[width_bytes]
        module = norm_class(width)
        module.to(dtype).requires_grad_(trainable)
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
            return t

        rows = 8
        x = torch.randn(1, rows, width, dtype=dtype).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(seen.values()) / rows

    return tuple((w, trainable, per_token(16, w, trainable), per_token(32, w, trainable))
                 for w in (2, 4) for trainable in (False, True))


def norm_saved_bytes(arch: Arch, size: int, width_bytes: int, trainable: bool) -> int:
    """Bytes per token one of the architecture's norms of this size saves for backward: the measured
    figures at widths 16 and 32 (``Arch.norm_saved``), extrapolated linearly in the width."""
    small, large = next((a, b) for w, t, a, b in arch.norm_saved if (w, t) == (width_bytes, trainable))
    slope = (large - small) / 16
    return round(small + slope * (size - 16))
