"""The analytic memory model: ``estimate(setup) -> Breakdown`` in well under a millisecond.

Per GPU (one data-parallel rank) and per host, in bytes, by category:

- model states (``weights``, ``gradients``, ``optimizer_states``) follow what DeepSpeed's ZeRO optimizer
  keeps for each stage, precision and offload (see ``docs/memory_model.md``), counting only trainable
  parameters for gradients and optimizer states;
- ``activations``: bytes saved for backward and alive at the end of the forward pass, per decoder layer and
  outside the layers (logits), MoE-aware, attention- and checkpointing-aware;
- ``temporaries``: the largest short-lived allocation on top of that (gradient of the logits and one
  recomputed layer in backward, or the fp32 gradient partition of the optimizer step);
- ``buffers``: DeepSpeed's gradient-reduction buckets and ZeRO-3's gathered live parameters;
- ``overhead``: CUDA context and the caching allocator's reserve (not simulated; a documented constant).

Every coefficient below is derived from what PyTorch saves for backward in the Hugging Face modules
and checked against ``moekit.simulate`` (a full-size step under FakeTensorMode) in the tests and in
``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from moekit.arch import Arch, LayerArch, norm_saved_bytes
from moekit.breakdown import Breakdown
from moekit.cache import disk_cached
from moekit.errors import MoekitError
from moekit.training_setup import LoraSpec, SetupError, TrainingSetup
from moekit.traps import (
    adapter_note,
    adapter_precision,
    load_phase,
    loss_bytes_per_token,
    loss_note,
    optimizer_note,
    optimizer_state_bytes_per_param,
    overhead_note,
    qlora_note,
    resolved_load_path,
    router_aux_loss_bytes,
    router_aux_loss_note,
    router_aux_loss_on,
    zero3_linear_saves_inputs,
)
from moekit.units import BYTES_PER_ELEMENT, GiB, MiB
from moekit.zero_knobs import zero_knobs

# moekit.models and moekit.arch's readers (torch, transformers) are imported inside the functions that
# build a model on the meta device; their results are cached on disk (moekit.cache), so a warm estimate
# imports neither.

# ---------------------------------------------------------------------------------------------
# Documented constants
# ---------------------------------------------------------------------------------------------

# DeepSpeed's bucket, prefetch and sub-group sizes: moekit.zero_knobs.zero_knobs(setup).
#: CUDA context + cuBLAS/cuDNN workspaces of one process, as nvidia-smi shows before any tensor exists.
CUDA_CONTEXT_BYTES = 600 * MiB
#: The caching allocator reserves more than it hands out (fragmentation); a few % of the peak.
ALLOCATOR_RESERVE_FRACTION = 0.05
#: With expandable_segments the allocator maps pages into one growing segment per pool: what it reserves over
#: the allocated bytes is the rounding to its page sizes (20 MiB large pool + 2 MiB small pool, per the
#: CUDA caching allocator's kLargeBuffer / kSmallBuffer). Not measured on a GPU here.
EXPANDABLE_SEGMENTS_RESERVE_BYTES = 22 * MiB


# ---------------------------------------------------------------------------------------------
# Facts about a model, computed once per model name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """Shapes and exact counts the memory model needs, all read from ``moekit.arch`` (the model built
    on the meta device): widths of one decoder layer and counts over the layers kept."""

    arch: Arch
    num_layers: int
    hidden: int
    kv_hidden: int
    num_heads: int
    head_dim: int
    vocab: int
    num_experts: int
    experts_per_token: int
    expert_ffn: int
    shared_ffn: int
    dense_ffn: int
    num_params: int
    num_params_per_layer: int  # of an MoE layer (of layer 0 in a dense model)
    num_params_outside_layers: int
    num_expert_params_per_layer: int
    largest_module_params: int
    largest_param_per_layer: int
    second_largest_module_params: int
    qk_norm: str  # "none", "head" (Qwen3, GLM, Hunyuan) or "full" (OLMoE)
    sliding_window: int | None  # Mistral attends to the last 4096 tokens only
    normalizes_top_k: bool  # Mixtral renormalizes the top-k router weights (one more saved tensor)
    max_positions: int | None = None  # max_position_embeddings: the longest sequence the model is made for

    @property
    def layers(self) -> tuple[LayerArch, ...]:
        """The decoder layers kept (all of them, or the first num_layers of a truncated model)."""
        return self.arch.layers[: self.num_layers]

    @property
    def num_fp32_params(self) -> int:
        """Parameters a 16-bit run keeps in fp32 (DeepSpeed honours _keep_in_fp32_modules_strict too)."""
        return sum(layer.num_fp32_params for layer in self.layers)


def _tuples(data):
    """JSON lists back into the tuples the frozen dataclasses hold (recursively)."""
    if isinstance(data, list):
        return tuple(_tuples(x) for x in data)
    if isinstance(data, dict):
        return {k: _tuples(v) for k, v in data.items()}
    return data


def _facts_from_json(data: dict) -> ModelFacts:
    """``ModelFacts`` as ``moekit.cache`` stored it (dataclasses as dicts, tuples as lists)."""
    data = _tuples(data)
    arch = dict(data.pop("arch"))
    arch["layers"] = tuple(LayerArch(**layer) for layer in arch["layers"])
    return ModelFacts(arch=Arch(**arch), **data)


def _facts_from_arch(arch: Arch, num_layers: int, outside: tuple[int, int, int], max_positions: int | None) -> ModelFacts:
    """outside: (parameters outside the decoder layers, of which embedding, of which lm_head)."""
    layers = arch.layers[:num_layers]
    typical = next((layer for layer in layers if layer.moe), layers[0])
    num_params_outside_layers, embedding, lm_head = outside
    # ZeRO-3 gathers one module at a time: the embedding, lm_head, or one layer's attention / experts / MLP.
    kinds = list(dict.fromkeys(layers))  # one layer of each kind (MoE, dense): units repeat per layer
    per_layer_units = [layer.count(c) for layer in kinds for c in ("experts", "mlp", "attention", "shared_experts")]
    units = sorted([embedding, lm_head, *per_layer_units], reverse=True)
    return ModelFacts(
        arch=arch,
        num_layers=num_layers,
        hidden=arch.hidden,
        kv_hidden=arch.k_dim,
        num_heads=arch.num_heads,
        head_dim=arch.head_dim,
        vocab=arch.vocab,
        num_experts=arch.num_experts,
        experts_per_token=arch.experts_per_token,
        expert_ffn=arch.expert_ffn,
        shared_ffn=arch.shared_ffn,
        dense_ffn=arch.dense_ffn,
        num_params=num_params_outside_layers + sum(layer.num_params for layer in layers),
        num_params_per_layer=typical.num_params,
        num_params_outside_layers=num_params_outside_layers,
        num_expert_params_per_layer=typical.count("experts"),
        largest_module_params=units[0],
        largest_param_per_layer=max(layer.largest_param for layer in layers),
        second_largest_module_params=units[1],
        qk_norm=arch.qk_norm,
        sliding_window=max((layer.sliding_window or 0 for layer in layers), default=0) or None,
        normalizes_top_k=arch.normalizes_top_k,
        max_positions=max_positions,
    )


@disk_cached("outside_counts", tuple)
def _outside_counts(model: str) -> tuple[int, int, int]:
    """(parameters outside the decoder layers, embedding, lm_head) from the meta-device census."""
    from moekit.arch import arch_of
    from moekit.models import as_config, parameter_census

    census = parameter_census(model)
    arch = arch_of(as_config(model))
    inside = sum(layer.num_params for layer in arch.layers)
    by = census.num_params_by_component
    return census.num_params - inside, by.get("embeddings", 0), by.get("lm_head", 0)


@disk_cached("model_facts", lambda data: _facts_from_json(data))
def model_facts(model: str) -> ModelFacts:
    from moekit.arch import arch_of
    from moekit.models import as_config

    config = as_config(model)
    arch = arch_of(config)
    return _facts_from_arch(arch, arch.num_layers, _outside_counts(model), getattr(config, "max_position_embeddings", None))


def facts_for(setup: TrainingSetup, num_layers: int | None = None) -> ModelFacts:
    """The model's facts, truncated to its first num_layers decoder layers when given."""
    facts = model_facts(setup.model)
    if num_layers is None or num_layers == facts.num_layers:
        return facts
    arch = facts.arch
    if num_layers > arch.num_layers:
        from moekit.arch import arch_of
        from moekit.models import as_config, config_with_layers

        arch = arch_of(config_with_layers(as_config(setup.model), num_layers))
    return _facts_from_arch(arch, num_layers, _outside_counts(setup.model), facts.max_positions)


@disk_cached("lora_params", int)
def _num_lora_params(model: str, spec: LoraSpec, num_layers: int) -> int:
    """LoRA adapter parameters of the model's first num_layers decoder layers (layers may differ:
    DeepSeek's dense first layers carry no expert adapters)."""
    from moekit.lora import lora_census
    from moekit.models import as_config, config_with_layers

    config = as_config(model)
    if num_layers != config.num_hidden_layers:
        config = config_with_layers(config, num_layers)
    return lora_census(config, spec).num_trainable_params


def num_trainable_params(setup: TrainingSetup, facts: ModelFacts | None = None) -> int:
    """Parameters that get gradients and optimizer state: all of them, or only the LoRA adapters."""
    facts = facts or model_facts(setup.model)
    if setup.uses_lora:
        return _num_lora_params(setup.model, setup.lora, facts.num_layers)
    return facts.num_params


# ---------------------------------------------------------------------------------------------
# Model states
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStates:
    """Bytes of model states on one GPU and on one host, plus the optimizer step's fp32 gradient."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    step_temporary_bytes: int
    host_bytes: dict[str, int]


def _partition(count: int, world_size: int) -> int:
    """Elements one rank owns when DeepSpeed splits a flat buffer evenly (the last rank is padded)."""
    return math.ceil(count / world_size)


def _base_weight_bytes(setup: TrainingSetup, facts: ModelFacts) -> int:
    """Bytes of the (frozen or trained) base weights in their working precision, whole model."""
    width = _width(setup)
    if setup.method != "qlora":
        return facts.num_params * width + (4 - width) * facts.num_fp32_params
    from moekit.lora import QuantSpec

    num_quantized = _num_quantized_params(setup.model)
    quant = QuantSpec()
    return int(num_quantized * quant.bytes_per_param) + (facts.num_params - num_quantized) * width


@disk_cached("quantized", int)
def _num_quantized_params(model: str) -> int:
    from moekit.lora import num_quantized_params
    from moekit.models import as_config

    return num_quantized_params(as_config(model))


def model_states(setup: TrainingSetup, facts: ModelFacts, num_trainable: int) -> ModelStates:
    """What DeepSpeed keeps per rank for this stage, precision and offload (docs/memory_model.md)."""
    n, stage = setup.world_size, setup.zero_stage
    mixed = setup.precision != "fp32"
    width = 2 if mixed else 4
    adapters = num_trainable if setup.uses_lora else 0
    weights = _base_weight_bytes(setup, facts) + adapters * width
    owned = _partition(num_trainable, n) if stage >= 1 else num_trainable
    gradients = width * (_partition(num_trainable, n) if stage >= 2 else num_trainable)
    # fp32 master weights exist under mixed precision, and under fp32 too in every ZeRO optimizer: stage 1/2
    # clone their partition (single_partition_of_fp32_groups), stage 3 too (_create_fp32_partitions compares a
    # torch.device with the accelerator's device name, a string, so its no-copy branch never runs); m and v always.
    master = 4 * owned if (mixed or stage >= 1) else 0
    optimizer = master + int(optimizer_state_bytes_per_param(setup.optimizer) * owned)  # m and v (moekit.traps)
    # The optimizer step's fp32 gradient of the partition; except under ZeRO-2 (whose gradient partition
    # is already one flat buffer) it is first flattened in the working dtype, then upcast.
    # ZeRO-3 steps its partition in sub-groups of sub_group_size elements, one at a time.
    stepped = min(owned, zero_knobs(setup).sub_group_size) if stage == 3 else owned
    flattened = width * stepped if stage != 2 else 0
    if mixed and stage == 0:
        # DeepSpeed's FP16_Optimizer (bf16 too) upcasts every gradient to fp32 and then concatenates them:
        # _flatten_dense_tensors([p.grad.to(fp32) ...]) holds 4 + 4 bytes per element at once
        step_temporary = 8 * stepped
    elif mixed:
        step_temporary = 4 * stepped + flattened
    else:
        step_temporary = flattened if stage in (1, 3) else 0
    host: dict[str, int] = {}
    if stage == 3 and setup.method != "qlora":
        weights = width * _partition(facts.num_params, n) + _adapter_width(setup) * _partition(adapters, n)
    ranks_per_host = setup.gpus_per_node
    if setup.offload != "none":
        host["optimizer_states"] = optimizer * ranks_per_host
        host["gradients"] = 4 * owned * ranks_per_host
        if stage == 3:
            # ZeRO-3 keeps its 16-bit gradient partitions (grad_partitions_flat_buffer, stage3.py
            # _setup_for_real_optimizer) on self.device, the CPU when the optimizer is offloaded, besides the fp32 ones.
            host["gradients"] += width * owned * ranks_per_host
        optimizer, step_temporary = 0, 0
        if stage >= 2:
            gradients = 0
    if setup.offload == "optimizer+params":
        host["weights"] = weights * ranks_per_host
        weights = 0
    return ModelStates(weights, gradients, optimizer, step_temporary, host)


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------

#: Under ZeRO-2/3 a full fine-tune materializes each parameter's whole gradient before it is reduced into
#: the rank's partition; when the largest one (Mixtral's gate_up_proj) appears, this share of the
#: recomputed layer's activations is still alive (MemTracker on Mixtral 8x7B, 2 layers, seq 4096).
RECOMPUTED_SHARE_AT_EXPERT_GRADIENT = 0.4
#: Labels and the loss's bookkeeping outside the layers, per token, besides the rotary cos/sin tables.
LOSS_BOOKKEEPING_BYTES_PER_TOKEN = 8


@dataclass(frozen=True)
class Trainability:
    """Which parts of a decoder layer get gradients, which decides what autograd must save."""

    full: bool  # every weight trains (norms, router, embeddings, lm_head included)
    num_attention_lora: int  # LoRA-adapted attention Linears per layer
    qkv_lora: bool  # a LoRA on q/k/v (MLA: q_a/kv_a) needs the shared normalized input
    experts_lora: bool  # LoRA on the fused expert tensors (peft ParamWrapper)
    router_lora: bool
    shared_experts_lora: bool
    mlp_lora: bool  # dense models' gate/up/down_proj
    attention_lora: tuple[str, ...] = ()  # the adapted attention Linears' own names (q_b_proj, o_proj...)
    #: every adapted weight as (group, own name): ("attention", "q_proj"), ("shared_experts", "down_proj")...
    adapted: tuple[tuple[str, str], ...] = ()

    def attention_trains(self, name: str) -> bool:
        """Whether an attention Linear's input is saved: it trains, or carries a LoRA."""
        return self.full or name in self.attention_lora


#: Attention Linears that read the layer's normalized input (GQA's q/k/v, MLA's q_a/kv_a or q).
_INPUT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "q_a_proj", "kv_a_proj_with_mqa")


@disk_cached("trainability", lambda data: Trainability(**_tuples(data)))
def trainability(model: str, method: str, spec: LoraSpec) -> Trainability:
    if method == "full":
        return Trainability(True, 0, False, False, False, False, False)
    from moekit.lora import resolve_targets

    groups = resolve_targets(spec, model).groups
    attention = groups.get("attention", ())
    leaves = tuple(name.split(".")[-1] for name in attention)
    return Trainability(
        full=False,
        num_attention_lora=len(attention),
        qkv_lora=any(leaf in _INPUT_PROJECTIONS for leaf in leaves),
        experts_lora=bool(groups.get("experts")),
        router_lora=bool(groups.get("router")),
        shared_experts_lora=bool(groups.get("shared_experts")),
        mlp_lora=bool(groups.get("mlp")),
        attention_lora=leaves,
        adapted=tuple((group, name.split(".")[-1]) for group, names in groups.items() for name in names),
    )


def _width(setup: TrainingSetup) -> int:
    return BYTES_PER_ELEMENT[setup.precision]


def _adapter_width(setup: TrainingSetup) -> int:
    """Bytes per LoRA adapter element: fp32 under ZeRO-3's zero.Init (``moekit.traps.adapter_precision``)."""
    return BYTES_PER_ELEMENT[adapter_precision(setup, model_facts(setup.model).arch.model_type)]


def _dtype_name(width_bytes: int) -> str:
    return "fp32" if width_bytes == 4 else "bf16/fp16"


@dataclass(frozen=True)
class SavedTensor:
    """One tensor a decoder layer saves for backward, per token: one term of ``layer_bytes_per_token``."""

    block: str  # "attention" or "mlp"
    tensor: str  # what it is
    shape: str  # per token (times tokens in the step)
    dtype: str
    why: str  # why autograd keeps it until backward
    bytes_per_token: int


def _norm_terms(arch: Arch, block: str, name: str, w: int, size: int, size_name: str, trainable: bool,
                copies: int = 1) -> list[SavedTensor]:
    """One norm's saved bytes per row (measured on its class: ``moekit.arch.norm_saved_bytes``): RMSNorm
    keeps an fp32 copy of its input and the rstd and, when its weight trains, the normalized input."""
    what = "fp32 input copy and 1/rms" + (", normalized output" if trainable else "")
    times = f" x {copies}" if copies > 1 else ""
    why = "the norm's backward" + (" and its weight's gradient" if trainable else "")
    return [SavedTensor(block, f"{name}{times}", f"[{size_name}]{times}", f"fp32 + {_dtype_name(w)}" if trainable
                        else "fp32", f"{why} ({what})", copies * norm_saved_bytes(arch, size, w, trainable))]


def _uses_math_sdpa(arch: Arch, attn_implementation: str) -> bool:
    """MLA's values are narrower than its queries and keys (128 vs 192 per head in DeepSeek-V3); SDPA's
    fused CPU kernels refuse unequal head dims, so PyTorch takes its math path, which upcasts to fp32
    and keeps the a x s x s probabilities. (CUDA's memory-efficient and cuDNN kernels accept these
    shapes; ``flash_attention_2`` pads the values instead. Not measured on a GPU here.)"""
    return attn_implementation == "sdpa" and arch.attention == "mla" and arch.v_dim != arch.k_dim


def attention_terms(setup: TrainingSetup) -> list[SavedTensor]:
    """What the attention block (its input norm included) saves per token, besides terms in s^2."""
    a = model_facts(setup.model).arch
    t = trainability(setup.model, setup.method, setup.lora)
    w = _width(setup)
    d = _dtype_name(w)
    h, heads = a.hidden, a.num_heads
    z3 = zero3_linear_saves_inputs(setup)  # DeepSpeed's ZeRO-3 linear saves a frozen Linear's input too
    terms = _norm_terms(a, "attention", "input_layernorm", w, h, "hidden", t.full)
    if t.full or t.qkv_lora or z3:
        terms.append(SavedTensor("attention", "q/k/v projections' input", "[hidden]", d,
                                 "the input projections' weight (or LoRA A) gradients"
                                 + ("; DeepSpeed's ZeRO-3 linear saves it anyway" if z3 else ""), w * h))
    terms += adapter_terms(setup, "attention", ("attention",))
    if a.attention == "mla":
        # Compressed query (V3) and key/value latent: each normalized, then read by its up-projection.
        if a.q_lora_rank:
            terms += _norm_terms(a, "attention", "q_a_layernorm", w, a.q_lora_rank, "q_lora_rank", t.full)
            if t.attention_trains("q_b_proj") or z3:
                terms.append(SavedTensor("attention", "q_b_proj input", "[q_lora_rank]", d, "q_b_proj's gradient",
                                         w * a.q_lora_rank))
        terms += _norm_terms(a, "attention", "kv_a_layernorm", w, a.kv_lora_rank, "kv_lora_rank", t.full)
        if t.attention_trains("kv_b_proj") or z3:
            terms.append(SavedTensor("attention", "kv_b_proj input", "[kv_lora_rank]", d, "kv_b_proj's gradient",
                                     w * a.kv_lora_rank))
        if _uses_math_sdpa(a, setup.attn_implementation):
            # math SDPA: fp32 q, k, v (the s^2 probabilities are in mla_math_bytes); o_proj's input.
            terms.append(SavedTensor("attention", "math SDPA q, k, v (upcast)", "[q_dim] + [k_dim] + [v_dim]", "fp32",
                                     "the math path's matmul backward", 4 * (a.q_dim + a.k_dim + a.v_dim)))
            if t.attention_trains("o_proj") or z3:
                terms.append(SavedTensor("attention", "o_proj input", "[v_dim]", d, "o_proj's gradient", w * a.v_dim))
            return terms
        return terms + _sdpa_terms(a, w)
    if a.qk_norm == "full":  # OLMoE: one norm over all heads' q, one over k
        terms += _norm_terms(a, "attention", "q_norm", w, a.q_dim, "q_dim", t.full)
        terms += _norm_terms(a, "attention", "k_norm", w, a.k_dim, "k_dim", t.full)
    elif a.qk_norm == "head":  # Qwen3, GLM, Hunyuan: a norm per head of q and of k
        num_kv_heads = a.k_dim // a.head_dim
        terms += _norm_terms(a, "attention", "q_norm, k_norm per head", w, a.head_dim, "head_dim", t.full,
                             copies=heads + num_kv_heads)
    if a.sinks:
        # gpt-oss (eager only): q, k and v repeated to every head, the sink logits' max (int64),
        # o_proj's input; the s x (s + 1) probabilities are in sink_attention_bytes.
        return terms + [
            SavedTensor("attention", "eager q and o_proj input", "[q_dim] x 2", d, "the score and output matmuls",
                        w * 2 * a.q_dim),
            SavedTensor("attention", "k and v repeated to every head", "[heads x head_dim] x 2", d,
                        "the score and output matmuls", w * 2 * heads * a.head_dim),
            SavedTensor("attention", "sink logits' max", "[heads]", "int64", "the softmax with sinks", 8 * heads),
        ]
    terms += _sdpa_terms(a, w)
    if a.rotary_table_width < 2 * a.head_dim and (t.attention_trains("o_proj") or z3):
        # Partial rotary (GLM) concatenates q back head-major, so SDPA's output comes out head-major
        # and o_proj reads a token-major copy of it.
        terms.append(SavedTensor("attention", "o_proj input (token-major copy)", "[q_dim]", d, "o_proj's gradient",
                                 w * a.q_dim))
    return terms


def _sdpa_terms(a: Arch, w: int) -> list[SavedTensor]:
    """SDPA (flash on the CPU): q, its output, k, v and the fp32 logsumexp."""
    d = _dtype_name(w)
    return [
        SavedTensor("attention", "SDPA q and output", "[q_dim] x 2", d, "flash attention's backward", w * 2 * a.q_dim),
        SavedTensor("attention", "SDPA k and v", "[k_dim] + [v_dim]", d, "flash attention's backward",
                    w * (a.k_dim + a.v_dim)),
        SavedTensor("attention", "SDPA logsumexp", "[heads]", "fp32", "flash attention recomputes softmax from it",
                    4 * a.num_heads),
    ]


#: The term of ``adapter_terms`` that fp32 adapters add (the ``adapters`` note sums it).
UPCAST_INPUTS = "LoRA inputs upcast to fp32"


def _adapter_in_features(a: Arch, group: str, name: str) -> int:
    """The input width of an adapted Linear: what its LoRA A reads."""
    if name == "q_b_proj":
        return a.q_lora_rank
    if name == "kv_b_proj":
        return a.kv_lora_rank
    if name == "o_proj":
        return a.v_dim if a.attention == "mla" else a.q_dim
    if name == "down_proj":
        return a.shared_ffn if group == "shared_experts" else a.dense_ffn
    return a.hidden  # q/k/v, q_a/kv_a, MLA's q_proj, gate/up_proj, the shared expert's gate


def adapter_terms(setup: TrainingSetup, block: str, groups: tuple[str, ...]) -> list[SavedTensor]:
    """What the LoRA adapters on this block's Linears save per token: LoRA A's output (for B's gradient) and,
    with fp32 adapters (``moekit.traps.adapter_precision``), the fp32 copy of its input that each adapted
    Linear makes for LoRA A (peft's ``_cast_input_dtype``), which A saves for its gradient; 16-bit adapters
    read the Linear's own input instead, counted with the block."""
    a = model_facts(setup.model).arch
    t = trainability(setup.model, setup.method, setup.lora)
    adapted = [(group, name) for group, name in t.adapted if group in groups]
    if not adapted:
        return []
    aw, r = _adapter_width(setup), setup.lora.r
    terms = [SavedTensor(block, f"LoRA A outputs x {len(adapted)}", f"[r={r}] each", _dtype_name(aw),
                         "LoRA B's gradient", aw * r * len(adapted))]
    if aw != _width(setup):
        terms.append(SavedTensor(block, f"{UPCAST_INPUTS} x {len(adapted)}", "[in_features] each", "fp32",
                                 "LoRA A's gradient (fp32 adapters under zero.Init)",
                                 aw * sum(_adapter_in_features(a, group, name) for group, name in adapted)))
    return terms


def router_terms(setup: TrainingSetup) -> list[SavedTensor]:
    """What the router of one MoE layer saves per token: its input when it trains, scores, top-k."""
    a = model_facts(setup.model).arch
    t = trainability(setup.model, setup.method, setup.lora)
    w = _width(setup)
    E, k = a.num_experts, a.experts_per_token
    trains = t.full or t.router_lora or zero3_linear_saves_inputs(setup)  # ZeRO-3's linear saves a frozen router's input too
    if a.router_scoring == "sigmoid" or a.router_fp32:
        # fp32 input, sigmoid scores, the group mask (bool), group top-2 and group indices (int64),
        # the top-k indices (int64) and weights (fp32), the renormalizing sum.
        groups, kept = a.router_groups
        terms = [SavedTensor("mlp", "router input (fp32 copy)", "[hidden]", "fp32", "the fp32 router's gradient",
                             4 * a.hidden)] if trains else []
        return terms + [SavedTensor("mlp", "sigmoid scores, group mask, group and top-k picks",
                                    f"[experts={E}] + [groups={groups}] + [top-k={k}]", "fp32/bool/int64",
                                    "group-limited routing's backward",
                                    5 * E + 16 * groups + 8 * kept + 12 * k + (4 if a.normalizes_top_k else 0))]
    if a.router_scoring == "topk_softmax":
        # gpt-oss: the top-k indices (int64) and the softmax over the top-k logits.
        return [SavedTensor("mlp", "top-k indices and softmax", f"[top-k={k}] x 2", f"int64 + {_dtype_name(w)}",
                            "the top-k softmax's backward", 8 * k + w * k)]
    # Softmax probabilities (fp32), top-k weights and their renormalization; its input is the MoE
    # block's input, counted once in ffn_terms.
    return [
        SavedTensor("mlp", "router probabilities", f"[experts={E}]", "fp32", "softmax's backward needs its output",
                    4 * E),
        SavedTensor("mlp", "top-k weights and indices", f"[top-k={k}] x several", "fp32/int64",
                    "top-k selection" + (" and renormalization" if a.normalizes_top_k else "") + " backward",
                    12 * k + 4 if a.normalizes_top_k else 5 * k),
    ]


def experts_terms(setup: TrainingSetup) -> list[SavedTensor]:
    """What the routed experts of one MoE layer save per token (grouped_mm path): each of the top-k
    copies of the token's input, gate/up output and activations, routing indices and weights."""
    a = model_facts(setup.model).arch
    t = trainability(setup.model, setup.method, setup.lora)
    w = _width(setup)
    k, h, ffn = a.experts_per_token, a.hidden, a.expert_ffn
    trains = t.full or t.experts_lora
    why = ("expert inputs, gate/up outputs and activations for the expert weights' gradients" if trains
           else "gate/up outputs and activations for the input's gradient (frozen experts)")
    if a.experts_bias:
        # gpt-oss: clamped gate and up, sigmoid, the GLU and its product (5 x ffn) on top of gate_up.
        per_copy = (2 * w * h + 7 * w * ffn) if trains else (w * h + 6 * w * ffn)
        per_copy += w + 32
        shape = "[hidden] x 1-2 + [ffn] x 6-7 per copy"
    else:
        per_copy = (2 * w * h + 4 * w * ffn) if trains else (w * h + 3 * w * ffn)
        per_copy += 28  # the copy's routing index (int64), weight and sort bookkeeping
        shape = "[hidden] x 1-2 + [ffn] x 3-4 per copy"
    return [SavedTensor("mlp", f"routed experts x top-k={k}", shape, _dtype_name(w), why, k * per_copy)]


def ffn_terms(setup: TrainingSetup, layer: LayerArch) -> list[SavedTensor]:
    """What the feed-forward block saves per token: MoE (router, experts, shared experts) or dense MLP."""
    a = model_facts(setup.model).arch
    t = trainability(setup.model, setup.method, setup.lora)
    w = _width(setup)
    d = _dtype_name(w)
    z3 = zero3_linear_saves_inputs(setup)  # DeepSpeed's ZeRO-3 linear saves a frozen Linear's input too
    terms = _norm_terms(a, "mlp", "post_attention_layernorm", w, a.hidden, "hidden", t.full)
    if not layer.moe:
        mlp_trains = t.full or t.mlp_lora or z3
        return terms + [SavedTensor("mlp", "dense MLP", "[hidden] + [ffn] x 4" if mlp_trains else "[ffn] x 3", d,
                                    "the MLP's backward",
                                    (w * a.hidden + 4 * w * a.dense_ffn) if mlp_trains else 3 * w * a.dense_ffn)
                        ] + adapter_terms(setup, "mlp", ("mlp",))
    shared_trains = bool(a.shared_ffn) and (t.full or t.shared_experts_lora or z3)
    # The block's 16-bit input, read by a 16-bit router and by the shared expert when they train
    # (an fp32 router saves its own fp32 copy instead, in router_terms).
    router_reads_it = (t.full or t.router_lora or z3) and a.router_scoring != "sigmoid" and not a.router_fp32
    if router_reads_it or shared_trains:
        terms.append(SavedTensor("mlp", "router input", "[hidden]", d, "the router (and shared expert) gradients",
                                 w * a.hidden))
    terms += router_terms(setup) + experts_terms(setup)
    if a.shared_ffn:
        terms.append(SavedTensor("mlp", "shared expert", "[ffn] x 3-4", d, "the shared expert's backward",
                                 (4 if shared_trains else 3) * w * a.shared_ffn))
        if a.shared_gate:
            # Qwen2-MoE scales the shared expert by sigmoid(gate(x)): its output and the sigmoid are kept.
            terms.append(SavedTensor("mlp", "shared expert gate", "[hidden] + [1]", d, "the gated product's backward",
                                     w * a.hidden + 2))
    return terms + adapter_terms(setup, "mlp", ("shared_experts",))  # router and experts LoRA: ParamWrapper


def _typical_layer(f: ModelFacts) -> LayerArch:
    return next((layer for layer in f.layers if layer.moe), f.layers[0])


def layer_terms(setup: TrainingSetup, layer: LayerArch | None = None) -> list[SavedTensor]:
    """What one decoder layer (default: an MoE layer) saves for backward per token, tensor by tensor,
    besides terms in s^2: derived from what autograd saves in the Hugging Face modules
    (docs/memory_model.md) and checked against MemTracker's count family by family
    (tests/test_families.py). Lesson 01 prints this list."""
    f = model_facts(setup.model)
    return attention_terms(setup) + ffn_terms(setup, layer or _typical_layer(f))


def layer_bytes_per_token(setup: TrainingSetup, layer: LayerArch | None = None) -> int:
    """Bytes one decoder layer saves for backward per token: the sum of ``layer_terms``."""
    return sum(term.bytes_per_token for term in layer_terms(setup, layer))


def eager_attention_bytes(setup: TrainingSetup) -> int:
    """Extra bytes per layer of eager attention: the a x s x s probabilities, and k/v repeated to all heads."""
    f = model_facts(setup.model)
    w = _width(setup)
    repeat_kv = 2 * w * f.hidden if f.kv_hidden < f.hidden else 0
    per_sequence = 3 * w * f.num_heads * setup.seq_len**2
    return setup.micro_batch * (per_sequence + setup.seq_len * (repeat_kv - 4 * f.num_heads))


def sink_attention_bytes(setup: TrainingSetup) -> int:
    """gpt-oss's eager attention keeps the 16-bit probabilities over s keys plus the sink: a x s x (s+1)."""
    f = model_facts(setup.model)
    return setup.micro_batch * _width(setup) * f.num_heads * setup.seq_len * (setup.seq_len + 1)


def mla_math_bytes(setup: TrainingSetup) -> int:
    """MLA under SDPA's math path keeps the fp32 a x s x s probabilities (see ``_uses_math_sdpa``)."""
    f = model_facts(setup.model)
    return setup.micro_batch * 4 * f.num_heads * setup.seq_len**2


def sliding_window_mask_bytes(setup: TrainingSetup) -> int:
    """Sequences reaching a sliding window make SDPA take an explicit s x s mask, which each layer keeps,
    and a path that saves 3h more per token (MemTracker on Mistral 7B at 4096-8192 tokens)."""
    f = model_facts(setup.model)
    w = _width(setup)
    return setup.micro_batch * (w * setup.seq_len**2 + setup.seq_len * 3 * w * f.hidden // 2)


def lora_merged_expert_bytes(setup: TrainingSetup) -> int:
    """peft's ParamWrapper folds W + scale * B @ A into a new tensor every forward (one baddbmm); autograd
    keeps these merged expert weights for the expert matmuls' backward: a full copy of the layer's experts."""
    t = trainability(setup.model, setup.method, setup.lora)
    if not t.experts_lora:
        return 0
    merged = _width(setup) * model_facts(setup.model).num_expert_params_per_layer
    if _adapter_width(setup) == _width(setup):
        return merged
    # fp32 adapters (moekit.traps.adapter_precision): the baddbmm runs on 16-bit copies of A and B, which it keeps.
    a = model_facts(setup.model).arch
    sides = {"gate_up_proj": a.hidden + 2 * a.expert_ffn, "down_proj": a.expert_ffn + a.hidden}
    adapted = sum(sides.get(name, 0) for group, name in t.adapted if group == "experts")
    return merged + _width(setup) * a.num_experts * setup.lora.r * adapted


def layer_bytes(setup: TrainingSetup, layer: LayerArch) -> int:
    """Bytes one decoder layer of this kind saves for backward at the setup's batch and length."""
    f = model_facts(setup.model)
    a = f.arch
    tokens = setup.micro_batch * setup.seq_len
    total = tokens * layer_bytes_per_token(setup, layer)
    if layer.moe:
        total += lora_merged_expert_bytes(setup) + zero3_kept_expert_bytes(setup)
    if a.sinks:
        total += sink_attention_bytes(setup)
    elif _uses_math_sdpa(a, setup.attn_implementation):
        total += mla_math_bytes(setup)
    elif setup.attn_implementation == "eager":
        total += eager_attention_bytes(setup)
    elif layer.sliding_window and setup.seq_len >= layer.sliding_window:
        total += sliding_window_mask_bytes(setup)
    return total


def zero3_kept_expert_bytes(setup: TrainingSetup) -> int:
    """Under ZeRO-3, the gathered fused expert weights one layer's forward leaves alive until its backward.

    transformers' grouped expert matmul passes ``weight.transpose(-2, -1)``, a view, and autograd saves it for
    the input's gradient. DeepSpeed releases a gathered parameter by pointing ``param.data`` at an empty tensor
    (``free_param``), which cannot free a storage that a saved view still holds; its own ZeRO-3 linear saves the
    parameter itself and re-gathers it for backward, so only the experts stay. With LoRA on the experts the
    matmul sees peft's merged copy instead (``lora_merged_expert_bytes``), and under checkpointing forward saves
    nothing.
    """
    if setup.zero_stage != 3 or setup.activation_checkpointing:
        return 0
    if trainability(setup.model, setup.method, setup.lora).experts_lora:
        return 0
    return _width(setup) * model_facts(setup.model).num_expert_params_per_layer


def outside_layers_bytes_per_token(setup: TrainingSetup) -> int:
    """The loss's fp32 log-softmax, final norm and lm_head input when they train.

    The 16-bit logits are not kept: training loops hold only the loss (``loss = engine(**batch).loss``
    in moekit.train, the HF Trainer, XTuner), so the model's output, logits included, is freed before
    backward, and the log-softmax saves its own fp32 output.
    """
    f = model_facts(setup.model)
    a = f.arch
    t = trainability(setup.model, setup.method, setup.lora)
    w = _width(setup)
    rotary_tables = (8 if a.rotary_complex else w) * a.rotary_table_width  # cos and sin, shared by every layer
    loss_saved, _ = loss_bytes_per_token(setup.loss_impl, f.vocab, f.hidden, w)  # hf: the fp32 log-softmax output
    total = loss_saved + rotary_tables + LOSS_BOOKKEEPING_BYTES_PER_TOKEN
    if t.full:
        # final norm (input copy + normalized) and lm_head's input; with frozen embeddings the first
        # layer's input norm is not needed, which cancels the final norm's fp32 copy.
        lm_head_input = 0 if setup.loss_impl == "chunked" else w * f.hidden  # cut-cross-entropy saves it itself
        total += norm_saved_bytes(a, f.hidden, w, True) + lm_head_input
    elif zero3_linear_saves_inputs(setup) and setup.loss_impl == "hf":
        total += w * f.hidden  # a frozen lm_head's input, which DeepSpeed's ZeRO-3 linear saves
    if setup.activation_checkpointing:
        # ... and the first layer's input norm, which frozen embeddings otherwise spare, is recomputed.
        total += 0 if t.full else norm_saved_bytes(a, f.hidden, w, False)
    return total


#: Families whose layer terms above are checked against the simulation (tests/test_families.py) and
#: dense families checked in tests/test_estimate.py; any other model is calibrated by a probe.
ANALYTIC_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                     "glm4_moe", "llama", "mistral")


def is_calibrated(setup: TrainingSetup) -> bool:
    """Whether the estimate's activations come from a probe (a family with no checked formula)."""
    return model_facts(setup.model).arch.model_type not in ANALYTIC_FAMILIES


def activation_notes(setup: TrainingSetup) -> dict[str, str]:
    """The estimate's notes about its activations: the probe that calibrated them, or MLA's math path."""
    if not is_calibrated(setup):
        if _uses_math_sdpa(model_facts(setup.model).arch, setup.attn_implementation):
            return {"activations": "MLA's unequal q/k and v head dims send SDPA to its math path on the CPU, "
                    "which keeps fp32 a x s x s probabilities per layer (included); CUDA's memory-efficient "
                    "kernel may not keep them (not measured on a GPU here)"}
        return {}
    from moekit.probe import calibrate

    return {"activations": calibrate(setup).note()}


def activation_bytes(setup: TrainingSetup, num_layers: int) -> tuple[int, int]:
    """(bytes saved for backward at the end of forward, bytes of one layer recomputed in backward)."""
    f = facts_for(setup, num_layers)
    tokens = setup.micro_batch * setup.seq_len
    outside = tokens * outside_layers_bytes_per_token(setup)
    if is_calibrated(setup):
        from moekit.probe import calibrate

        probe = calibrate(setup)
        num_moe = sum(layer.moe for layer in f.layers)
        kept = probe.outside_bytes + num_moe * probe.layer_bytes
        if setup.activation_checkpointing:  # the layer recomputed in backward: a probe without checkpointing
            return kept, calibrate(setup.replace(activation_checkpointing=False)).layer_bytes
        return kept, 0
    counts = collections.Counter(f.layers)  # each kind of layer (MoE, dense, sliding) computed once
    per_kind = {layer: layer_bytes(setup, layer) for layer in counts}
    if setup.activation_checkpointing:
        kept_inputs = num_layers * tokens * _width(setup) * f.hidden + eager_mask_bytes(setup, f)
        return kept_inputs + outside, max(per_kind.values())
    # layers whose experts ZeRO-3 keeps gathered anyway hold no extra copy for the saved view
    kept_expert_bytes = zero3_kept_expert_bytes(setup)
    already_gathered = min(num_layers, zero3_layers_with_experts_gathered(setup)) if kept_expert_bytes else 0
    layers = sum(count * per_kind[layer] for layer, count in counts.items())
    return layers - already_gathered * kept_expert_bytes + outside, 0


def eager_mask_bytes(setup: TrainingSetup, f: ModelFacts) -> int:
    """Eager attention takes an explicit s x s mask in the working dtype, one per kind of layer (full,
    sliding); under checkpointing every layer's saved inputs hold it until backward."""
    if not (f.arch.sinks or setup.attn_implementation == "eager"):
        return 0
    kinds = {layer.sliding_window for layer in f.layers}
    return setup.micro_batch * _width(setup) * setup.seq_len**2 * len(kinds)


# ---------------------------------------------------------------------------------------------
# Buffers and overhead
# ---------------------------------------------------------------------------------------------


def zero3_kept_gathered_params(setup: TrainingSetup) -> int:
    """Parameters ZeRO-3 still holds gathered at the start of backward because it will use them again soon.

    Once the first step has recorded the module trace, DeepSpeed releases a module after use only if it does not
    come back within ``stage3_max_reuse_distance`` parameters of the trace (``__params_to_release`` in
    partitioned_param_coordinator.py). A module's forward use comes back in its backward: in between, the trace
    runs every later module forward and then backward (twice their parameters), and with checkpointing also
    recomputes each later layer (three times). So lm_head and the modules nearest it stay gathered: a whole
    small model, lm_head and the last layer's experts of Mixtral 8x7B.
    """
    return sum(params for _, params in _zero3_kept_modules(setup))


def zero3_layers_with_experts_gathered(setup: TrainingSetup) -> int:
    """Layers whose MoE block ZeRO-3 keeps gathered from forward to backward (see zero3_kept_gathered_params)."""
    return sum(1 for kind, _ in _zero3_kept_modules(setup) if kind == "moe block")


def _zero3_kept_modules(setup: TrainingSetup) -> list[tuple[str, int]]:
    """(kind, parameters) of the modules in backward order whose backward comes within the reuse distance."""
    f = model_facts(setup.model)
    layer = dict(_typical_layer(f).num_params_by_component)
    num_layers = f.num_layers
    adapters_per_layer = num_trainable_params(setup) // num_layers if setup.uses_lora else 0
    moe_block = layer.get("experts", 0) + layer.get("router", 0) + layer.get("shared_experts", 0) + layer.get("mlp", 0)
    rest_of_layer = sum(layer.values()) - moe_block + adapters_per_layer
    outside, embeddings, lm_head = _outside_counts(setup.model)
    final_norm = outside - embeddings - lm_head
    backward_order = [("lm_head and final norm", lm_head + final_norm)]
    backward_order += [("moe block", moe_block), ("attention and norms", rest_of_layer)] * num_layers
    backward_order.append(("embeddings", embeddings))
    uses_between = 3 if setup.activation_checkpointing else 2
    reuse_distance = zero_knobs(setup).stage3_max_reuse_distance
    kept, later = [], 0
    for kind, params in backward_order:
        if uses_between * later >= reuse_distance:
            break
        kept.append((kind, params))
        later += params
    return kept


def buffer_bytes(setup: TrainingSetup) -> int:
    """DeepSpeed's gradient-reduction buckets, and under ZeRO-3 the module gathered for compute.

    DeepSpeed allocates its buckets at full ``reduce_bucket_size`` whatever the number of trainable
    parameters (``torch.empty(reduce_bucket_size)`` in stage_1_and_2.py): two of them with overlap_comm
    under ZeRO-1/2, one under ZeRO-3, which also gathers one whole module at a time (for Mixtral the
    fused experts of a layer, 1.41e9 parameters).
    """
    width = _width(setup)
    knobs = zero_knobs(setup)
    if setup.zero_stage in (1, 2):
        return 2 * width * knobs.reduce_bucket_size  # two reduce buckets (overlap_comm), 16-bit
    if setup.zero_stage == 3:
        return width * knobs.reduce_bucket_size + zero3_gathered_bytes(setup)  # one reduce bucket + gathered weights
    return 0


def zero3_gathered_bytes(setup: TrainingSetup) -> int:
    """16-bit weights ZeRO-3 holds gathered in forward and backward: the module computing and the one prefetched,
    or every module kept for reuse (zero3_kept_gathered_params), whichever is more."""
    f = model_facts(setup.model)
    knobs = zero_knobs(setup)
    # prefetch stops at stage3_prefetch_bucket_size, and never passes stage3_max_live_parameters gathered
    prefetched = min(knobs.stage3_prefetch_bucket_size, knobs.stage3_max_live_parameters, f.second_largest_module_params)
    gathered = max(f.largest_module_params + prefetched, zero3_kept_gathered_params(setup))
    # fp32 adapters (moekit.traps.adapter_precision) gather at 4 bytes: at most all of them are among the gathered
    width, adapter_width = _width(setup), _adapter_width(setup)
    fp32_adapters = min(gathered, num_trainable_params(setup, f)) if adapter_width > width else 0
    return width * gathered + (adapter_width - width) * fp32_adapters


def zero3_prefetch_flat_bytes(setup: TrainingSetup) -> int:
    """ZeRO-3's flat all-gather buffer of one coalesced prefetch, alive beside the parameters' own copies.

    Once the first step has traced the modules, each fetch prefetches the next parameters of the trace, up to
    ``stage3_prefetch_bucket_size`` elements and never past ``stage3_max_live_parameters``
    (``_fetch_sub_module_impl`` in partitioned_param_coordinator.py), in one ``all_gather_coalesced``:
    ``_all_gather_dtype`` (partition_parameters.py) gathers them into one flat tensor of the working dtype, and
    ``AllGatherCoalescedHandle.wait`` gives each parameter its own copy (``torch.cat``). The handle, and with it
    the flat tensor, stays in ``__inflight_param_registry`` until the last parameter it carries has been fetched
    by its module; the small preset's whole model is one such prefetch, alive to the end of forward.
    """
    if setup.zero_stage != 3:
        return 0
    knobs = zero_knobs(setup)
    prefetched = min(knobs.stage3_prefetch_bucket_size, knobs.stage3_max_live_parameters,
                     model_facts(setup.model).num_params)
    return _width(setup) * prefetched


def zero3_reduce_flat_bytes(setup: TrainingSetup, num_trainable: int) -> int:
    """ZeRO-3's flat copy of one reduce bucket's gradients, made each time it reduces a bucket.

    ``__avg_scatter_grads`` (stage3.py) hands the bucket's gradients to ``reduce_scatter_coalesced``
    (runtime/comm/coalesced_collectives.py), which interleaves them rank by rank into one new tensor
    (``torch.cat(tensor_partitions_lst_with_padding)``) in the communication dtype (the working dtype) and
    reduce-scatters that; ``partition_grads`` then copies this rank's chunk into the gradient partitions, and
    the copy is freed. A bucket holds at most ``reduce_bucket_size`` elements, and no more than the trainable
    parameters. (A bucket of a single tensor whose size divides by the ranks is scattered without the copy;
    gloo on the CPU clones the flat tensor once more inside ``reduce_scatter_tensor``: not counted, NCCL does not.)
    """
    if setup.zero_stage != 3:
        return 0
    return _width(setup) * min(zero_knobs(setup).reduce_bucket_size, num_trainable)


def overhead_bytes(peak_allocated_bytes: int, expandable_segments: bool = False) -> int:
    """CUDA context plus the caching allocator's reserve over the allocated peak."""
    if expandable_segments:
        return CUDA_CONTEXT_BYTES + EXPANDABLE_SEGMENTS_RESERVE_BYTES
    return CUDA_CONTEXT_BYTES + int(ALLOCATOR_RESERVE_FRACTION * peak_allocated_bytes)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


def estimate(setup: TrainingSetup, *, num_layers: int | None = None) -> Breakdown:
    """Predict per-GPU and per-host memory of one training step of ``setup`` (instant).

    num_layers: estimate a model truncated to this many decoder layers (to compare with a truncated
    simulation or GPU measurement); default: the whole model.
    """
    if not isinstance(setup, TrainingSetup):
        raise SetupError(
            f"estimate takes a TrainingSetup, got {type(setup).__name__} {setup!r}; "
            "e.g. estimate(TrainingSetup(model='mixtral-8x7b'))."
        )
    f = facts_for(setup, num_layers)
    check_seq_len(setup, f)
    num_trainable = num_trainable_params(setup, f)
    states = model_states(setup, f, num_trainable)
    activations, recomputed = activation_bytes(setup, f.num_layers)
    tokens = setup.micro_batch * setup.seq_len
    router_loss = router_aux_loss_term(setup, f)
    activations += router_loss
    loss_saved, loss_backward = loss_bytes_per_token(setup.loss_impl, f.vocab, f.hidden, _width(setup))
    width = _width(setup)
    # Backward starts with the fp32 gradients of the log-softmax and of the logits; with checkpointing
    # a recomputed layer comes later, once those are gone: the larger of the two is the temporary.
    backward_temporary = max(tokens * loss_backward, recomputed)
    if setup.method == "full" and setup.zero_stage >= 2:
        whole_gradient = width * f.largest_param_per_layer + RECOMPUTED_SHARE_AT_EXPERT_GRADIENT * recomputed
        if num_trainable > zero_knobs(setup).reduce_bucket_size:
            # ZeRO-3 reduces a full bucket when the next gradient does not fit in it, while that gradient is alive
            # (reduce_independent_p_g_buckets_and_remove_grads, stage3.py): the bucket's flat copy comes with it.
            whole_gradient += zero3_reduce_flat_bytes(setup, num_trainable)
        backward_temporary = max(backward_temporary, int(whole_gradient))
    buffers = buffer_bytes(setup)
    weights_and_optimizer = states.weights_bytes + states.optimizer_bytes
    # Gradients build up while activations are freed; they are all there from the start of backward
    # only when partitioned (small) or left over from an earlier micro-batch (accumulation).
    early_gradients = states.gradients_bytes if (setup.zero_stage >= 2 or setup.grad_accum > 1) else 0
    # ZeRO-1/2 allocate their reduce buckets at the first gradient, after the loss's own backward has
    # freed the fp32 log-softmax; ZeRO-3's bucket and gathered module are there throughout.
    persistent_buffers = buffers if setup.zero_stage == 3 else 0
    # ZeRO-1 with accumulation holds its buckets from the first micro-batch's backward to the boundary: it
    # reduces only at the boundary (engine.allreduce_gradients), so nothing calls the epilogue that frees them
    # (stage_1_and_2: setup_buckets allocates once per ready_for_gradients, _release_ipg_buffers resets it).
    held_buffers = buffers if (setup.zero_stage == 1 and setup.grad_accum > 1) else persistent_buffers
    backward_start = weights_and_optimizer + early_gradients + activations + backward_temporary + held_buffers
    # Under LoRA the first gradient comes from inside the last layer, after its recomputation.
    recomputed_then = recomputed if setup.uses_lora else 0
    # The loss's backward has freed the fp32 log-softmax; a full fine-tune's first gradient (lm_head's) comes
    # while the 16-bit gradient of the logits is alive.
    logits_gradient = tokens * f.vocab * width if setup.method == "full" and setup.loss_impl == "hf" else 0
    first_gradient = (weights_and_optimizer + early_gradients + activations - tokens * loss_saved + logits_gradient
                      + recomputed_then + buffers)
    # ZeRO-3's step first releases every gathered parameter (_partition_all_parameters in stage3.py's step):
    # of its buffers only the reduce bucket is left.
    step_buffers = persistent_buffers - zero3_gathered_bytes(setup) if setup.zero_stage == 3 else 0
    step = weights_and_optimizer + states.gradients_bytes + states.step_temporary_bytes + step_buffers
    # ZeRO-3 reduces the last bucket in backward's epilogue (independent_gradient_partition_epilogue, stage3.py),
    # once the activations are gone: the bucket's flat copy on top of the states and the buffers.
    reduce_flat = zero3_reduce_flat_bytes(setup, num_trainable)
    epilogue = weights_and_optimizer + states.gradients_bytes + persistent_buffers + reduce_flat if reduce_flat else 0
    # Near the end of forward (before the loss) ZeRO-3 may still hold a prefetch's flat all-gather buffer.
    prefetch_flat = zero3_prefetch_flat_bytes(setup)
    forward_end = (weights_and_optimizer + early_gradients + activations - tokens * loss_saved + persistent_buffers
                   + prefetch_flat) if prefetch_flat else 0
    allocated = max(backward_start, first_gradient, step, epilogue, forward_end)
    temporaries = states.step_temporary_bytes if allocated == step and step > backward_start else backward_temporary
    if allocated > max(backward_start, first_gradient, step):
        temporaries = reduce_flat if allocated == epilogue else prefetch_flat
    per_gpu = {
        "weights": states.weights_bytes,
        "gradients": states.gradients_bytes,
        "optimizer_states": states.optimizer_bytes,
        "activations": activations,
        "temporaries": temporaries,
        "buffers": buffers,
        "overhead": overhead_bytes(allocated, setup.expandable_segments),
    }
    per_host, notes = host_or_nvme(setup, states.host_bytes)
    notes.update(activation_notes(setup))
    load = load_phase_of(setup, f)
    notes.update(trap_notes(setup, f, router_loss, tokens))
    notes["load"] = load.note
    return Breakdown(
        source="estimate",
        per_gpu=per_gpu,
        per_host=per_host,
        total_bytes=allocated + per_gpu["overhead"],
        gpu_memory_bytes=setup.gpu_memory_bytes,
        notes=notes,
        host_memory_bytes=setup.host_memory_bytes,
        load_gpu_bytes=load.gpu_bytes + overhead_bytes(load.gpu_bytes, setup.expandable_segments),
        load_host_bytes=load.host_bytes,
    )


def router_aux_loss_term(setup: TrainingSetup, f: ModelFacts) -> int:
    """Bytes the router's load-balancing loss keeps for backward, when the run computes it (moekit.traps)."""
    if not router_aux_loss_on(setup):
        return 0
    return router_aux_loss_bytes(sum(layer.moe for layer in f.layers), setup.micro_batch * setup.seq_len,
                                 f.num_experts, _width(setup))


def load_phase_of(setup: TrainingSetup, f: ModelFacts):
    """The load phase's peaks (moekit.traps.load_phase) from this model's weights (allocated bytes)."""
    width = _width(setup)
    weights_16bit = f.num_params * width + (4 - width) * f.num_fp32_params
    weights_4bit = _base_weight_bytes(setup, f) if setup.method == "qlora" else weights_16bit
    return load_phase(setup, path=resolved_load_path(setup, f.arch.model_type), weights_16bit_bytes=weights_16bit,
                      weights_4bit_bytes=weights_4bit, largest_module_bytes=width * f.largest_module_params)


def trap_notes(setup: TrainingSetup, f: ModelFacts, router_loss: int, tokens: int) -> dict[str, str]:
    """The estimate's notes on the field traps: overhead, the loss, the router's loss, optimizer, QLoRA."""
    notes = {
        "overhead": overhead_note(CUDA_CONTEXT_BYTES, ALLOCATOR_RESERVE_FRACTION, setup.expandable_segments),
        "loss": loss_note(setup.loss_impl, tokens, f.vocab),
        "router_aux_loss": router_aux_loss_note(setup, router_loss),
        "optimizer": optimizer_note(setup.optimizer),
    }
    if _adapter_width(setup) != _width(setup):  # fp32 adapters: what their inputs' fp32 copies take
        counts = collections.Counter(f.layers)  # each kind of layer computed once
        per_kind = {layer: sum(t.bytes_per_token for t in layer_terms(setup, layer) if t.tensor.startswith(UPCAST_INPUTS))
                    for layer in counts}
        per_token = max(per_kind.values()) if setup.activation_checkpointing else sum(
            count * per_kind[layer] for layer, count in counts.items())
        notes["adapters"] = adapter_note(setup, tokens * per_token)
    if setup.method == "qlora":
        whole = model_facts(setup.model)  # the quantized count is of the whole model
        num_experts = sum(layer.count("experts") for layer in whole.layers)
        notes["qlora"] = qlora_note(whole.num_params, _num_quantized_params(setup.model), num_experts)
    return notes


def check_seq_len(setup: TrainingSetup, facts: ModelFacts) -> None:
    """A sequence longer than the model's positions is not a run anyone can train: refuse it."""
    if facts.max_positions and setup.seq_len > facts.max_positions:
        raise SetupError(
            f"seq_len={setup.seq_len} is longer than {setup.model}'s {facts.max_positions:,} positions "
            f"(max_position_embeddings); use a sequence length <= {facts.max_positions}."
        )


def host_or_nvme(setup: TrainingSetup, offloaded_bytes: dict[str, int]) -> tuple[dict[str, int], dict[str, str]]:
    """Where the offloaded states live: host RAM for CPU offload; for NVMe offload (ZeRO-Infinity) they are
    files under nvme_path, named in a note, and the host keeps only DeepSpeed's pinned swap buffers
    (a few hundred MB, not modelled)."""
    if setup.offload_device != "nvme" or not offloaded_bytes:
        return dict(offloaded_bytes), {}
    on_disk_bytes = sum(offloaded_bytes.values())
    note = (f"{on_disk_bytes / GiB:.1f} GiB per node ({', '.join(sorted(offloaded_bytes))}) on NVMe under {setup.nvme_path}; "
            "host RAM holds DeepSpeed's pinned swap buffers only (not modelled)")
    return {}, {"nvme": note}


def sweep(setup: TrainingSetup, **knob_values) -> list[Breakdown]:
    """Estimates of ``setup`` with one knob set to each value: ``sweep(setup, seq_len=[2048, 4096])``."""
    if len(knob_values) != 1:
        raise MoekitError(f"sweep takes exactly one knob, e.g. seq_len=[2048, 4096]; got {sorted(knob_values)}.")
    (knob, values), = knob_values.items()
    return [estimate(setup.replace(**{knob: value})) for value in values]
