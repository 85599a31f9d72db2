"""The field traps: memory that public MoE fine-tunes run out of outside the training step (issue 16).

Each trap is a small piece of arithmetic the estimate adds to its account, derived from the code that
allocates the bytes (transformers, DeepSpeed, bitsandbytes), with the reason in the estimate's notes:

- ``load_phase``: the peak per GPU and per node's host RAM while the weights are loaded, by loading path;
- ``router_aux_loss_bytes``: what transformers' ``load_balancing_loss_func`` keeps for backward;
- ``loss_bytes_per_token``: the language-model loss's logits wall (transformers' fp32 log-softmax) and what
  chunked / fused linear-cross-entropy leaves of it;
- ``optimizer_state_bytes_per_param``: AdamW, bitsandbytes' 8-bit AdamW, paged AdamW;
- ``overhead_note`` and ``qlora_note``: what ``overhead`` is made of, and which QLoRA weights stay 16-bit.

No torch here except in ``simulate_router_aux_loss_bytes`` (the fake-tensor check), so a warm
``moekit estimate`` stays torch-free; facts read from a model go through ``moekit.cache.disk_cached``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moekit.cache import disk_cached
from moekit.training_setup import TrainingSetup
from moekit.units import GiB, MiB

# ---------------------------------------------------------------------------------------------
# The router's auxiliary loss
# ---------------------------------------------------------------------------------------------


@disk_cached("router_aux_loss", tuple)
def router_loss_facts(model: str) -> tuple[bool, bool]:
    """(the model's transformers module has ``load_balancing_loss_func``, its config turns it on)."""
    import importlib

    from moekit.models import as_config

    config = as_config(model)
    try:
        module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    except ImportError:
        return False, False
    has_loss = hasattr(module, "load_balancing_loss_func")
    return has_loss, has_loss and bool(getattr(config, "output_router_logits", False))


def router_aux_loss_on(setup: TrainingSetup) -> bool:
    """Whether the run computes the router's loss: the setup's knob, else the model's config."""
    has_loss, by_default = router_loss_facts(setup.model)
    return has_loss and (by_default if setup.router_aux_loss is None else setup.router_aux_loss)


def router_aux_loss_bytes(num_moe_layers: int, num_tokens: int, num_experts: int, width: int) -> int:
    """Bytes transformers' ``load_balancing_loss_func`` (v5) keeps alive from forward to backward.

    Per MoE layer it runs ``softmax(router_logits)`` in the logits' dtype (the router Linear's output, the
    working dtype) and sums it; softmax saves its output for backward, the rest (topk indices, histc,
    the fp32 ``.float()`` copy, the mask product) is freed in the loop. So one tokens x experts tensor per
    layer stays. transformers 4.x instead concatenated every layer's logits and built int64 one-hot masks
    (the 5.3 GB at 8K tokens reported for Qwen3-30B-A3B); v5 accumulates layer by layer.
    """
    return num_moe_layers * num_tokens * num_experts * width  # softmax output, working dtype


def simulate_router_aux_loss_bytes(model: str, num_tokens: int, precision: str = "bf16") -> int:
    """What transformers' own ``load_balancing_loss_func`` saves for backward, run on FakeTensors.

    The router logits of every MoE layer (tokens x experts, in the working dtype, requiring grad) are
    fake, full-size tensors; every tensor autograd saves and still holds once the function has returned
    (what stays until backward) is counted once per storage.
    """
    import gc
    import importlib
    import weakref

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moekit.arch import arch_of
    from moekit.models import as_config

    config = as_config(model)
    arch = arch_of(config)
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    saved: list[weakref.ref] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with FakeTensorMode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = tuple(torch.empty(num_tokens, arch.num_experts, dtype=dtype, requires_grad=True)
                       for layer in arch.layers if layer.moe)
        loss = module.load_balancing_loss_func(logits, arch.num_experts, arch.experts_per_token)
        assert loss.requires_grad  # the loss reaches the router: what it saved is kept until backward
        gc.collect()
        alive = [ref() for ref in saved if ref() is not None]
        storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in alive}
    return sum(storages.values())


def router_aux_loss_note(setup: TrainingSetup, num_bytes: int) -> str:
    on = router_aux_loss_on(setup)
    if not router_loss_facts(setup.model)[0]:
        return "the model's transformers code has no load_balancing_loss_func: nothing counted"
    source = "the model's config" if setup.router_aux_loss is None else "router_aux_loss"
    if not on:
        return f"off ({source}; output_router_logits=False): nothing counted"
    return (f"on ({source}): {num_bytes / GiB:.2f} GiB in activations, one softmax of tokens x experts per MoE "
            "layer kept for backward by transformers 5's load_balancing_loss_func (4.x's one-hot version held "
            "several times more)")


# ---------------------------------------------------------------------------------------------
# The logits wall: the language-model loss
# ---------------------------------------------------------------------------------------------


def loss_bytes_per_token(loss_impl: str, vocab: int, hidden: int, width: int) -> tuple[int, int]:
    """(bytes per token kept from forward to backward, bytes per token at the start of backward).

    hf: transformers' ``ForCausalLMLoss`` upcasts the logits and ``cross_entropy``'s log-softmax saves its
    fp32 output (4 x vocab); backward starts with the fp32 gradients of the log-softmax and of the logits
    (4 + 4 x vocab).
    chunked (cut-cross-entropy): the logits are recomputed block by block inside the kernel; autograd keeps
    lm_head's input (width x hidden) and the fp32 log-sum-exp (4); backward allocates the input's gradient.
    fused (Liger's fused linear-cross-entropy, the HF Trainer's ``use_liger_kernel``): the gradient of
    lm_head's input is computed in forward and kept (width x hidden); each chunk of
    next_power_of_2(tokens / ceil(vocab / hidden)) tokens holds its logits in the working dtype, at most
    2 x width x hidden per token of the batch.
    Estimate only: Liger's kernels and cut-cross-entropy's are Triton (CUDA); cut-cross-entropy's one
    PyTorch path (impl="torch_compile") computes the whole logits and ``F.cross_entropy`` under
    torch.compile, so no maintained library offers a chunked loss to measure on the CPU.
    """
    if loss_impl == "hf":
        return 4 * vocab, 8 * vocab  # fp32 log-softmax output; its gradient and the logits' (fp32)
    if loss_impl == "chunked":
        return width * hidden + 4, width * hidden  # lm_head input and fp32 lse; the input's gradient
    return width * hidden, 2 * width * hidden  # the input's gradient, computed in forward; one chunk's logits


def loss_note(loss_impl: str, tokens: int, vocab: int) -> str:
    wall = tokens * vocab * 12 / GiB  # 4 saved + 8 at backward's start, fp32
    if loss_impl == "hf":
        return (f"transformers' loss keeps fp32 log-softmax of {tokens} x {vocab:,} (and its gradient in backward): "
                f"{wall:.2f} GiB; loss_impl='fused' (Liger FLCE) or 'chunked' (cut-cross-entropy) removes it")
    return (f"{loss_impl} linear-cross-entropy: logits computed chunk by chunk ({wall:.2f} GiB of fp32 logits "
            "avoided); ESTIMATE ONLY: Liger's and cut-cross-entropy's chunked kernels are Triton (CUDA), not measured here")


# ---------------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------------

#: bitsandbytes' blockwise 8-bit state: one fp32 absmax per block of 256 values (optim/optimizer.py).
BNB_8BIT_BLOCK = 256


def optimizer_state_bytes_per_param(optimizer: str) -> float:
    """Bytes of optimizer state per trained parameter (fp32 master weights not included)."""
    if optimizer == "adamw_8bit":
        return 2 * (1 + 4 / BNB_8BIT_BLOCK)  # m and v in int8, each with an fp32 absmax per 256-block
    return 8  # m and v in fp32 (paged_adamw too: same bytes, in CUDA unified memory)


def optimizer_note(optimizer: str) -> str:
    if optimizer == "adamw_8bit":
        return ("bitsandbytes AdamW8bit: m and v in 8 bits (2.03 B per trained parameter instead of 8); DeepSpeed "
                "takes it as a client optimizer (zero_allow_untested_optimizer), not with CPU offload")
    if optimizer == "paged_adamw":
        return ("bitsandbytes PagedAdamW: 32-bit states in CUDA unified memory, counted on the GPU (worst case); "
                "under pressure pages move to host RAM instead of failing with out-of-memory")
    return "AdamW: fp32 m and v, 8 B per trained parameter"


# ---------------------------------------------------------------------------------------------
# Overhead and QLoRA
# ---------------------------------------------------------------------------------------------


def overhead_note(context_bytes: int, reserve_fraction: float, expandable_segments: bool = False) -> str:
    if expandable_segments:
        return (f"CUDA context {context_bytes / MiB:.0f} MiB (driver, kernels, cuBLAS workspace) + the allocator's "
                "page rounding: expandable_segments:True grows one segment per pool instead of reserving new ones "
                "(set PYTORCH_CUDA_ALLOC_CONF before the first CUDA call; not measured on a GPU here)")
    return (f"CUDA context {context_bytes / MiB:.0f} MiB (driver, kernels, cuBLAS workspace) + allocator reserve "
            f"{reserve_fraction:.0%} of the peak: nvidia-smi shows reserved, not max_memory_allocated; MoE's "
            "varying tokens per expert fragment the cache (one report: 13 GB allocated, 56 GB reserved): "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is the remedy")


def qlora_note(num_params: int, num_quantized: int, num_expert_params: int) -> str:
    num_16bit = num_params - num_quantized
    return (f"4-bit: {num_quantized / 1e9:.2f}B parameters (the nn.Linear weights bitsandbytes replaces); 16-bit: "
            f"{num_16bit / 1e9:.2f}B, of which {num_expert_params / 1e9:.2f}B fused expert tensors (3-D parameters "
            "bitsandbytes never sees on transformers 5, bitsandbytes#1849), plus embeddings, lm_head, norms, router")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPhase:
    """Peak bytes while the weights are loaded: per GPU (allocated), and host RAM per node (all its ranks)."""

    path: str
    gpu_bytes: int
    host_bytes: int
    note: str


def resolved_load_path(setup: TrainingSetup, model_type: str) -> str:
    """The loading path ``auto`` means: QLoRA loads 4-bit; gpt-oss's published checkpoints are MXFP4 and a
    16-bit fine-tune dequantizes them; ZeRO-3 loads under zero.Init (HF's deepspeed integration); else plain."""
    if setup.load_path != "auto":
        return setup.load_path
    if setup.method == "qlora":
        return "4bit"
    if model_type == "gpt_oss":
        return "mxfp4_dequant"
    return "zero_init" if setup.zero_stage == 3 else "from_pretrained"


def zero3_linear_saves_inputs(setup: TrainingSetup) -> bool:
    """Whether DeepSpeed's ZeRO-3 linear runs every ``F.linear``: zero.Init (``memory_efficient_linear``, on by
    default) installs ``zero3_linear_wrap``, whose ``LinearFunctionForZeroStage3`` saves its input whether or not
    the weight trains (deepspeed/runtime/zero/linear.py)."""
    return setup.zero_stage == 3


def adapter_precision(setup: TrainingSetup, model_type: str) -> str:
    """The dtype LoRA adapters train in under the DeepSpeed engine.

    peft upcasts 16-bit adapters to fp32 (``get_peft_model``'s ``autocast_adapter_dtype=True``). The engine
    casts every parameter to the 16-bit dtype, except in a model built under ``zero.Init``, whose parameters it
    takes to be in that dtype already (``_cast_module_mixed_precision`` in deepspeed/runtime/engine.py). So under
    ZeRO-3 loaded with zero.Init (HF's integration, moekit.train) the adapters stay fp32: their partitions, the
    copies gathered for forward, and the fp32 copy of its input that each adapted Linear makes for LoRA A.
    """
    zero_init = setup.zero_stage == 3 and resolved_load_path(setup, model_type) != "from_pretrained"
    if setup.method == "lora" and setup.precision != "fp32" and zero_init and setup.autocast_adapter_dtype:
        return "fp32"
    return setup.precision


def adapter_note(setup: TrainingSetup, upcast_bytes: int) -> str:
    """What the fp32 adapters of ``adapter_precision`` cost: upcast_bytes of fp32 input copies."""
    where = "in the recomputed layer" if setup.activation_checkpointing else "over the layers"
    return (f"LoRA adapters train in fp32 here: peft upcasts them (get_peft_model's autocast_adapter_dtype) and "
            f"DeepSpeed leaves a zero.Init model's parameters as they are, so each adapted Linear keeps an fp32 copy "
            f"of its input for LoRA A: {upcast_bytes / GiB:.2f} GiB of activations {where}. "
            f"get_peft_model(..., autocast_adapter_dtype=False) keeps them {setup.precision} "
            f"(moekit: autocast_adapter_dtype=False, --no-adapter-upcast)")


def load_phase(setup: TrainingSetup, *, path: str, weights_16bit_bytes: int, weights_4bit_bytes: int,
               largest_module_bytes: int) -> LoadPhase:
    """Peak per GPU and per node's host RAM while ``from_pretrained`` and the engine place the weights.

    weights_16bit_bytes: the whole model in its working precision; largest_module_bytes: one module's
    parameters (a layer's fused experts) in that precision, what one rank materializes at a time.
    gpu_bytes is what the allocator hands out; the estimate adds the overhead (CUDA context, reserve) to it.
    """
    ranks = setup.gpus_per_node
    if path == "from_pretrained":
        # Every rank builds the whole model in host RAM, then the engine moves it to its GPU (plain DDP,
        # ZeRO-1/2; ZeRO-3 partitions only after the whole model was on the GPU).
        return LoadPhase(path, weights_16bit_bytes, ranks * weights_16bit_bytes,
                         f"from_pretrained without zero.Init: the whole 16-bit model per rank, in host RAM first "
                         f"({ranks} x {weights_16bit_bytes / GiB:.1f} GiB per node)")
    if path == "zero_init":
        # Parameters are created partitioned; transformers gathers one module at a time to copy its weights in.
        # With offloaded parameters zero.Init creates the partitions in host RAM (remote_device="cpu").
        partition = math.ceil(weights_16bit_bytes / setup.world_size)
        on_host = setup.offload == "optimizer+params"
        return LoadPhase(path, (0 if on_host else partition) + largest_module_bytes,
                         ranks * ((partition if on_host else 0) + largest_module_bytes),
                         "zero.Init: each rank holds its partition (in host RAM when parameters are offloaded) "
                         "plus one module gathered while it is filled")
    if path == "4bit":
        # bitsandbytes quantizes each weight as it reaches the GPU: the 4-bit model plus one 16-bit module; every
        # rank loads its own copy (multi-GPU QLoRA is data parallel).
        return LoadPhase(path, weights_4bit_bytes + largest_module_bytes,
                         ranks * largest_module_bytes,
                         f"4-bit load: a quantized copy per rank ({ranks} per node), one 16-bit module at a time")
    # MXFP4 checkpoints (gpt-oss) are dequantized to 16 bits on load, whole, before ZeRO can partition them; the
    # module being dequantized still holds its MXFP4 blocks and scales (4 + 8/32 bits per weight).
    mxfp4_module_bytes = math.ceil(largest_module_bytes * 4.25 / 16)
    return LoadPhase(path, weights_16bit_bytes + mxfp4_module_bytes, ranks * largest_module_bytes,
                     "MXFP4 checkpoint dequantized to bf16 on load: the whole 16-bit model on every rank, "
                     "whatever the ZeRO stage (reported: 8 x 40 GB with ZeRO-3 and offload runs out at load)")
