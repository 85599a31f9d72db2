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

import dataclasses
import functools
import math
from dataclasses import dataclass

from moekit.breakdown import Breakdown
from moekit.errors import MoekitError
from moekit.models import as_config, build_model, moe_shape, parameter_census, per_layer_census
from moekit.training_setup import TrainingSetup

# ---------------------------------------------------------------------------------------------
# Documented constants
# ---------------------------------------------------------------------------------------------

#: DeepSpeed's defaults, which moekit's ds_config keeps (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET_ELEMENTS = 500_000_000
STAGE3_PREFETCH_BUCKET_ELEMENTS = 50_000_000
SUB_GROUP_ELEMENTS = 1_000_000_000  # ZeRO-3's sub_group_size
#: CUDA context + cuBLAS/cuDNN workspaces of one process, as nvidia-smi shows before any tensor exists.
CUDA_CONTEXT_BYTES = 600 * 2**20
#: The caching allocator reserves more than it hands out (fragmentation); a few % of the peak.
ALLOCATOR_RESERVE_FRACTION = 0.05


# ---------------------------------------------------------------------------------------------
# Facts about a model, computed once per model name
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """Shapes and exact counts the memory model needs (from the config and a meta-device census)."""

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
    num_params_per_layer: int
    num_params_outside_layers: int
    num_expert_params_per_layer: int
    largest_module_params: int
    largest_param_per_layer: int
    second_largest_module_params: int
    qk_norm: bool  # OLMoE normalizes q and k over the full projection
    sliding_window: int | None  # Mistral attends to the last 4096 tokens only
    normalizes_top_k: bool  # Mixtral renormalizes the top-k router weights (one more saved tensor)


@functools.lru_cache(maxsize=64)
def model_facts(model: str) -> ModelFacts:
    config = as_config(model)
    shape = moe_shape(config)
    census = parameter_census(config)
    layer = per_layer_census(config)
    num_params_per_layer = sum(layer.values())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    embedding = census.num_params_by_component.get("embeddings", 0)
    layer_shapes = [p.numel() for n, p in build_model(config, "meta", num_layers=1).named_parameters() if ".layers.0." in n]
    # ZeRO-3 gathers one module at a time: the embedding, lm_head, or one layer's attention / experts / MLP.
    units = sorted([embedding, census.num_params_by_component.get("lm_head", 0), layer.get("experts", 0),
                    layer.get("mlp", 0), layer.get("attention", 0), layer.get("shared_experts", 0)], reverse=True)
    return ModelFacts(
        num_layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        kv_hidden=kv_heads * head_dim,
        num_heads=config.num_attention_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        num_experts=shape.num_experts,
        experts_per_token=shape.experts_per_token,
        expert_ffn=shape.expert_intermediate_size,
        shared_ffn=shape.shared_expert_intermediate_size,
        dense_ffn=0 if shape.num_experts else config.intermediate_size,
        num_params=census.num_params,
        num_params_per_layer=num_params_per_layer,
        num_params_outside_layers=census.num_params - config.num_hidden_layers * num_params_per_layer,
        num_expert_params_per_layer=layer.get("experts", 0),
        largest_module_params=units[0],
        largest_param_per_layer=max(layer_shapes),
        second_largest_module_params=units[1],
        qk_norm=config.model_type == "olmoe",
        sliding_window=getattr(config, "sliding_window", None) or None,
        normalizes_top_k=bool(getattr(config, "norm_topk_prob", config.model_type == "mixtral")),
    )


def facts_for(setup: TrainingSetup, num_layers: int | None = None) -> ModelFacts:
    """The model's facts, truncated to num_layers identical decoder layers when given."""
    facts = model_facts(setup.model)
    if num_layers is None or num_layers == facts.num_layers:
        return facts
    num_params = facts.num_params_outside_layers + num_layers * facts.num_params_per_layer
    return dataclasses.replace(facts, num_layers=num_layers, num_params=num_params)


@functools.lru_cache(maxsize=256)
def _lora_counts_per_layer(model: str, spec) -> tuple[int, int]:
    """(LoRA trainable params per decoder layer, of which on fused expert tensors) for a LoRA spec."""
    from moekit.lora import lora_census

    census = lora_census(model, spec)
    num_layers = model_facts(model).num_layers
    return census.num_trainable_params // num_layers, census.by_group.get("experts", 0) // num_layers


def num_trainable_params(setup: TrainingSetup, facts: ModelFacts | None = None) -> int:
    """Parameters that get gradients and optimizer state: all of them, or only the LoRA adapters."""
    facts = facts or model_facts(setup.model)
    if setup.uses_lora:
        return facts.num_layers * _lora_counts_per_layer(setup.model, setup.lora)[0]
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
    width = 4 if setup.precision == "fp32" else 2
    if setup.method != "qlora":
        return facts.num_params * width
    from moekit.lora import QuantSpec, num_quantized_params

    num_quantized = num_quantized_params(as_config(setup.model))
    quant = QuantSpec()
    return int(num_quantized * quant.bytes_per_param) + (facts.num_params - num_quantized) * width


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
    optimizer = master + 8 * owned
    # The optimizer step's fp32 gradient of the partition; except under ZeRO-2 (whose gradient partition
    # is already one flat buffer) it is first flattened in the working dtype, then upcast.
    # ZeRO-3 steps its partition in sub-groups of sub_group_size elements, one at a time.
    stepped = min(owned, SUB_GROUP_ELEMENTS) if stage == 3 else owned
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
        weights = width * _partition(facts.num_params + adapters, n)
    ranks_per_host = setup.gpus_per_node
    if setup.offload != "none":
        host["optimizer_states"] = optimizer * ranks_per_host
        host["gradients"] = 4 * owned * ranks_per_host
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
    qkv_lora: bool  # a LoRA on q/k/v needs the shared normalized input
    experts_lora: bool  # LoRA on the fused expert tensors (peft ParamWrapper)
    router_lora: bool
    shared_experts_lora: bool
    mlp_lora: bool  # dense models' gate/up/down_proj


@functools.lru_cache(maxsize=256)
def trainability(model: str, method: str, spec) -> Trainability:
    if method == "full":
        return Trainability(True, 0, False, False, False, False, False)
    from moekit.lora import resolve_targets

    groups = resolve_targets(spec, model).groups
    attention = groups.get("attention", ())
    return Trainability(
        full=False,
        num_attention_lora=len(attention),
        qkv_lora=any(name.split(".")[-1] in ("q_proj", "k_proj", "v_proj") for name in attention),
        experts_lora=bool(groups.get("experts")),
        router_lora=bool(groups.get("router")),
        shared_experts_lora=bool(groups.get("shared_experts")),
        mlp_lora=bool(groups.get("mlp")),
    )


def _norm_bytes(width_bytes: int, size: int, trainable: bool) -> int:
    """RMSNorm keeps an fp32 copy of its input and the rstd; its normalized output if the weight trains."""
    return 4 * size + 4 + (width_bytes * size if trainable else 0)


def layer_bytes_per_token(setup: TrainingSetup) -> int:
    """Bytes one middle decoder layer saves for backward per token (sdpa attention).

    Derived tensor by tensor from what autograd saves in the Hugging Face modules (docs/memory_model.md)
    and equal, to within a few bytes, to MemTracker's count on every preset.
    """
    f = model_facts(setup.model)
    t = trainability(setup.model, setup.method, setup.lora)
    w = 4 if setup.precision == "fp32" else 2
    h, hkv, a = f.hidden, f.kv_hidden, f.num_heads
    # Attention block: input norm, q/k/v input, LoRA A outputs, SDPA's q, k, v, output and logsumexp.
    total = _norm_bytes(w, h, t.full)
    total += w * h if (t.full or t.qkv_lora) else 0
    total += w * setup.lora.r * t.num_attention_lora
    total += w * (2 * h + 2 * hkv) + 4 * a
    if f.qk_norm:
        total += _norm_bytes(w, h, t.full) + _norm_bytes(w, hkv, t.full)
    # MLP block: post-attention norm, router, routed experts, shared expert or dense MLP.
    total += _norm_bytes(w, h, t.full)
    if f.num_experts:
        k = f.experts_per_token
        total += w * h if (t.full or t.router_lora) else 0
        total += 4 * f.num_experts + (36 * k + 4 if f.normalizes_top_k else 29 * k)
        expert_trains = t.full or t.experts_lora
        total += k * ((2 * w * h + 4 * w * f.expert_ffn + 4) if expert_trains else (w * h + 3 * w * f.expert_ffn + 4))
        if f.shared_ffn:
            shared_trains = t.full or t.shared_experts_lora
            total += (4 if shared_trains else 3) * w * f.shared_ffn + w * h + 2
    else:
        mlp_trains = t.full or t.mlp_lora
        total += (w * h + 4 * w * f.dense_ffn) if mlp_trains else 3 * w * f.dense_ffn
    return total


def eager_attention_bytes(setup: TrainingSetup) -> int:
    """Extra bytes per layer of eager attention: the a x s x s probabilities, and k/v repeated to all heads."""
    f = model_facts(setup.model)
    w = 4 if setup.precision == "fp32" else 2
    repeat_kv = 2 * w * f.hidden if f.kv_hidden < f.hidden else 0
    per_sequence = 3 * w * f.num_heads * setup.seq_len**2
    return setup.micro_batch * (per_sequence + setup.seq_len * (repeat_kv - 4 * f.num_heads))


def sliding_window_mask_bytes(setup: TrainingSetup) -> int:
    """Sequences reaching a sliding window make SDPA take an explicit s x s mask, which each layer keeps,
    and a path that saves 3h more per token (MemTracker on Mistral 7B at 4096-8192 tokens)."""
    f = model_facts(setup.model)
    w = 4 if setup.precision == "fp32" else 2
    return setup.micro_batch * (w * setup.seq_len**2 + setup.seq_len * 3 * w * f.hidden // 2)


def lora_merged_expert_bytes(setup: TrainingSetup) -> int:
    """peft's ParamWrapper folds W + scale * B @ A into a new tensor every forward (one baddbmm); autograd
    keeps these merged expert weights for the expert matmuls' backward: a full copy of the layer's experts."""
    t = trainability(setup.model, setup.method, setup.lora)
    if not t.experts_lora:
        return 0
    w = 4 if setup.precision == "fp32" else 2
    return w * model_facts(setup.model).num_expert_params_per_layer


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
    w = 4 if setup.precision == "fp32" else 2
    return w * model_facts(setup.model).num_expert_params_per_layer


def outside_layers_bytes_per_token(setup: TrainingSetup) -> int:
    """The loss's fp32 log-softmax, final norm and lm_head input when they train.

    The 16-bit logits are not kept: training loops hold only the loss (``loss = engine(**batch).loss``
    in moekit.train, the HF Trainer, XTuner), so the model's output, logits included, is freed before
    backward, and the log-softmax saves its own fp32 output.
    """
    f = model_facts(setup.model)
    t = trainability(setup.model, setup.method, setup.lora)
    w = 4 if setup.precision == "fp32" else 2
    rotary_tables = 2 * w * f.head_dim  # cos and sin, shared by every layer
    total = 4 * f.vocab + rotary_tables + LOSS_BOOKKEEPING_BYTES_PER_TOKEN  # 4 = fp32 log-softmax output
    if t.full:
        # final norm (input copy + normalized) and lm_head's input; with frozen embeddings the first
        # layer's input norm is not needed, which cancels the final norm's fp32 copy.
        total += _norm_bytes(w, f.hidden, True) + w * f.hidden
    if setup.activation_checkpointing:
        # ... and the first layer's input norm, which frozen embeddings otherwise spare, is recomputed.
        total += 0 if t.full else _norm_bytes(w, f.hidden, False)
    return total


def activation_bytes(setup: TrainingSetup, num_layers: int) -> tuple[int, int]:
    """(bytes saved for backward at the end of forward, bytes of one layer recomputed in backward)."""
    f = model_facts(setup.model)
    w = 4 if setup.precision == "fp32" else 2
    tokens = setup.micro_batch * setup.seq_len
    one_layer = tokens * layer_bytes_per_token(setup) + lora_merged_expert_bytes(setup) + zero3_kept_expert_bytes(setup)
    if setup.attn_implementation == "eager":
        one_layer += eager_attention_bytes(setup)
    elif f.sliding_window and setup.seq_len >= f.sliding_window:
        one_layer += sliding_window_mask_bytes(setup)
    outside = tokens * outside_layers_bytes_per_token(setup)
    if setup.activation_checkpointing:
        return num_layers * tokens * w * f.hidden + outside, one_layer
    # layers whose experts ZeRO-3 keeps gathered anyway hold no extra copy for the saved view
    already_gathered = min(num_layers, zero3_layers_with_experts_gathered(setup)) if zero3_kept_expert_bytes(setup) else 0
    return num_layers * one_layer - already_gathered * zero3_kept_expert_bytes(setup) + outside, 0


# ---------------------------------------------------------------------------------------------
# Buffers and overhead
# ---------------------------------------------------------------------------------------------


#: DeepSpeed's ``stage3_max_reuse_distance`` default (deepspeed/runtime/zero/config.py), in elements.
STAGE3_MAX_REUSE_DISTANCE_ELEMENTS = 1_000_000_000


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
    census = parameter_census(setup.model)
    layer = per_layer_census(setup.model)
    num_layers = model_facts(setup.model).num_layers
    adapters_per_layer = num_trainable_params(setup) // num_layers if setup.uses_lora else 0
    moe_block = layer.get("experts", 0) + layer.get("router", 0) + layer.get("shared_experts", 0) + layer.get("mlp", 0)
    rest_of_layer = sum(layer.values()) - moe_block + adapters_per_layer
    lm_head, embeddings = census.num_params_by_component.get("lm_head", 0), census.num_params_by_component.get("embeddings", 0)
    final_norm = census.num_params - embeddings - lm_head - num_layers * sum(layer.values())
    backward_order = [("lm_head and final norm", lm_head + final_norm)]
    backward_order += [("moe block", moe_block), ("attention and norms", rest_of_layer)] * num_layers
    backward_order.append(("embeddings", embeddings))
    uses_between = 3 if setup.activation_checkpointing else 2
    kept, later = [], 0
    for kind, params in backward_order:
        if uses_between * later >= STAGE3_MAX_REUSE_DISTANCE_ELEMENTS:
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
    width = 4 if setup.precision == "fp32" else 2
    if setup.zero_stage in (1, 2):
        return 2 * width * REDUCE_BUCKET_ELEMENTS
    if setup.zero_stage == 3:
        f = model_facts(setup.model)
        prefetched = min(STAGE3_PREFETCH_BUCKET_ELEMENTS, f.second_largest_module_params)
        gathered = max(f.largest_module_params + prefetched, zero3_kept_gathered_params(setup))
        return width * (REDUCE_BUCKET_ELEMENTS + gathered)
    return 0


def overhead_bytes(peak_allocated_bytes: int) -> int:
    """CUDA context plus the caching allocator's reserve over the allocated peak."""
    return CUDA_CONTEXT_BYTES + int(ALLOCATOR_RESERVE_FRACTION * peak_allocated_bytes)


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


def estimate(setup: TrainingSetup, *, num_layers: int | None = None) -> Breakdown:
    """Predict per-GPU and per-host memory of one training step of ``setup`` (instant).

    num_layers: estimate a model truncated to this many decoder layers (to compare with a truncated
    simulation or GPU measurement); default: the whole model.
    """
    f = facts_for(setup, num_layers)
    num_trainable = num_trainable_params(setup, f)
    states = model_states(setup, f, num_trainable)
    activations, recomputed = activation_bytes(setup, f.num_layers)
    tokens = setup.micro_batch * setup.seq_len
    width = 4 if setup.precision == "fp32" else 2
    # Backward starts with the fp32 gradients of the log-softmax and of the logits; with checkpointing
    # a recomputed layer comes later, once those are gone: the larger of the two is the temporary.
    backward_temporary = max(tokens * f.vocab * 8, recomputed)
    if setup.method == "full" and setup.zero_stage >= 2:
        whole_gradient = width * f.largest_param_per_layer + RECOMPUTED_SHARE_AT_EXPERT_GRADIENT * recomputed
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
    logits_gradient = tokens * f.vocab * width if setup.method == "full" else 0
    first_gradient = (weights_and_optimizer + early_gradients + activations - tokens * f.vocab * 4 + logits_gradient
                      + recomputed_then + buffers)
    step = weights_and_optimizer + states.gradients_bytes + states.step_temporary_bytes + persistent_buffers
    allocated = max(backward_start, first_gradient, step)
    temporaries = states.step_temporary_bytes if allocated == step and step > backward_start else backward_temporary
    per_gpu = {
        "weights": states.weights_bytes,
        "gradients": states.gradients_bytes,
        "optimizer_states": states.optimizer_bytes,
        "activations": activations,
        "temporaries": temporaries,
        "buffers": buffers,
        "overhead": overhead_bytes(allocated),
    }
    per_host, notes = host_or_nvme(setup, states.host_bytes)
    return Breakdown(
        source="estimate",
        per_gpu=per_gpu,
        per_host=per_host,
        total_bytes=allocated + per_gpu["overhead"],
        gpu_memory_bytes=setup.gpu_memory_bytes,
        notes=notes,
    )


def host_or_nvme(setup: TrainingSetup, offloaded_bytes: dict[str, int]) -> tuple[dict[str, int], dict[str, str]]:
    """Where the offloaded states live: host RAM for CPU offload; for NVMe offload (ZeRO-Infinity) they are
    files under nvme_path, named in a note, and the host keeps only DeepSpeed's pinned swap buffers
    (a few hundred MB, not modelled)."""
    if setup.offload_device != "nvme" or not offloaded_bytes:
        return dict(offloaded_bytes), {}
    on_disk_bytes = sum(offloaded_bytes.values())
    note = (f"{on_disk_bytes / 2**30:.1f} GiB per node ({', '.join(sorted(offloaded_bytes))}) on NVMe under {setup.nvme_path}; "
            "host RAM holds DeepSpeed's pinned swap buffers only (not modelled)")
    return {}, {"nvme": note}


def sweep(setup: TrainingSetup, **knob_values) -> list[Breakdown]:
    """Estimates of ``setup`` with one knob set to each value: ``sweep(setup, seq_len=[2048, 4096])``."""
    if len(knob_values) != 1:
        raise MoekitError(f"sweep takes exactly one knob, e.g. seq_len=[2048, 4096]; got {sorted(knob_values)}.")
    (knob, values), = knob_values.items()
    return [estimate(setup.replace(**{knob: value})) for value in values]
