"""The one object that describes a fine-tuning run: ``TrainingSetup``.

It is validated when it is made and immutable afterwards; every other part of moekit (estimate,
simulate, measure, ds_config, train, launch, plan) takes it. Make variants with ``setup.replace``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from moekit.errors import MoekitError
from moekit.units import GiB
from moekit.zero_knobs import KNOBS, deepspeed_defaults

Method = Literal["full", "lora", "qlora"]
Precision = Literal["fp32", "fp16", "bf16"]
Offload = Literal["none", "optimizer", "optimizer+params"]
Attention = Literal["sdpa", "eager", "flash_attention_2"]

METHODS = ("full", "lora", "qlora")
PRECISIONS = ("fp32", "fp16", "bf16")
OFFLOADS = ("none", "optimizer", "optimizer+params")
OFFLOAD_DEVICES = ("cpu", "nvme")
ATTENTIONS = ("sdpa", "eager", "flash_attention_2")
#: How the weights reach the GPUs (moekit.traps.load_phase); "auto" follows the method, stage and checkpoint.
LOAD_PATHS = ("auto", "from_pretrained", "zero_init", "4bit", "mxfp4_dequant")
#: The language-model loss: transformers' (fp32 logits), chunked or fused linear-cross-entropy.
LOSS_IMPLS = ("hf", "chunked", "fused")
#: AdamW with fp32 moments, bitsandbytes' 8-bit AdamW, or its paged 32-bit AdamW.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw")

#: GPU memory is given in GB as GPUs are sold; NVIDIA's "40GB" is 40 GiB (40,960 MiB in nvidia-smi).
BYTES_PER_GB = GiB


class SetupError(MoekitError):
    """An invalid training setup; the message says which values disagree and what to change."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: rank, scaling, dropout and what it targets.

    targets: groups a learner understands (``attention``, ``experts``, ``router``, ``all-linear``,
    ``shared_experts``) or raw module / parameter names (``q_proj``, ``gate_up_proj``, article-era
    ``w1``/``w2``/``w3``); ``moekit.lora`` resolves them against the real model.
    """

    r: int = 16
    alpha: int = 32
    #: 0 by default: peft's LoRA on fused expert tensors (``target_parameters``) rejects dropout.
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention", "experts")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        elif isinstance(self.targets, (list, tuple)) and all(isinstance(t, str) for t in self.targets):
            object.__setattr__(self, "targets", tuple(self.targets))
        else:
            raise SetupError(f"LoRA targets must be names, e.g. ('attention', 'experts'); got {self.targets!r}.")
        _check_int("LoRA rank r", self.r, "try r=8 or r=16")
        _check_int("lora_alpha", self.alpha, "the usual choice is 2*r")
        _check_number("LoRA dropout", self.dropout, "0.0 or 0.1")
        if self.r <= 0:
            raise SetupError(f"LoRA rank r must be a positive integer, got r={self.r}; try r=8 or r=16.")
        if self.alpha <= 0:
            raise SetupError(f"lora_alpha must be positive, got {self.alpha}; the usual choice is 2*r.")
        if not 0.0 <= self.dropout < 1.0:
            raise SetupError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        if not self.targets:
            raise SetupError("LoRA needs at least one target, e.g. targets=('attention', 'experts').")


#: The setup fields that set DeepSpeed's ZeRO size knobs (one field per knob of moekit.zero_knobs).
ZERO_KNOB_FIELDS = tuple(KNOBS)


@dataclass(frozen=True)
class TrainingSetup:
    """Everything that decides a fine-tuning run's memory and its DeepSpeed configuration."""

    model: str = "mixtral-8x7b"
    method: Method = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    precision: Precision = "bf16"
    zero_stage: int = 2
    offload: Offload = "none"
    offload_device: str = "cpu"
    nvme_path: str | None = None
    gpus_per_node: int = 8
    num_nodes: int = 1
    gpu_memory_gb: float = 40.0
    host_memory_gb: float | None = None
    seq_len: int = 4096
    micro_batch: int = 1
    grad_accum: int = 1
    activation_checkpointing: bool = False
    packing: bool = True
    attn_implementation: Attention = "sdpa"
    #: transformers' router load-balancing loss (output_router_logits); None: what the model's config says.
    router_aux_loss: bool | None = None
    load_path: str = "auto"
    loss_impl: str = "hf"
    optimizer: str = "adamw"
    #: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: the caching allocator grows segments instead of
    #: reserving new ones, so its reserve over the allocated peak shrinks to page rounding.
    expandable_segments: bool = False
    #: peft's get_peft_model(autocast_adapter_dtype): upcast 16-bit LoRA adapters to fp32 (peft's default).
    #: DeepSpeed casts them back, except under ZeRO-3's zero.Init (moekit.traps.adapter_precision).
    autocast_adapter_dtype: bool = True
    #: DeepSpeed's ZeRO size knobs in elements (what each decides: moekit.zero_knobs.MEANING); None: DeepSpeed's
    #: default, read from its DeepSpeedZeroConfig.
    reduce_bucket_size: int | None = None
    allgather_bucket_size: int | None = None
    stage3_prefetch_bucket_size: int | None = None
    stage3_max_live_parameters: int | None = None
    stage3_max_reuse_distance: int | None = None
    stage3_param_persistence_threshold: int | None = None
    sub_group_size: int | None = None

    def __post_init__(self) -> None:
        _check_type("model", self.model, str, "a preset name such as 'mixtral-8x7b' or a local folder")
        _check_type("lora", self.lora, LoraSpec, "LoraSpec(r=16, alpha=32)")
        for name in ("activation_checkpointing", "packing", "expandable_segments", "autocast_adapter_dtype"):
            _check_type(name, getattr(self, name), bool, "True or False")
        _check_type("nvme_path", self.nvme_path, (str, type(None)), "a folder path or None")
        _check_type("router_aux_loss", self.router_aux_loss, (bool, type(None)), "True, False or None (the config's)")
        _check_choice("load_path", self.load_path, LOAD_PATHS)
        _check_choice("loss_impl", self.loss_impl, LOSS_IMPLS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("method", self.method, METHODS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("offload", self.offload, OFFLOADS)
        _check_choice("offload_device", self.offload_device, OFFLOAD_DEVICES)
        _check_choice("attn_implementation", self.attn_implementation, ATTENTIONS)
        if isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3):
            raise SetupError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}.")
        if self.offload != "none" and self.zero_stage == 0:
            raise SetupError(
                f"offload='{self.offload}' needs ZeRO stage 1, 2 or 3 (DeepSpeed offloads the "
                "partitioned optimizer); set zero_stage>=1 or offload='none'."
            )
        if self.offload == "optimizer+params" and self.zero_stage != 3:
            raise SetupError(
                f"offloading parameters needs ZeRO-3 (only stage 3 partitions parameters), got "
                f"zero_stage={self.zero_stage}; use zero_stage=3 or offload='optimizer'."
            )
        if self.offload_device == "nvme" and not self.nvme_path:
            raise SetupError("offload_device='nvme' needs nvme_path (--nvme-path), a folder on a fast local disk.")
        if self.method == "qlora" and self.precision == "fp32":
            raise SetupError("QLoRA computes in 16 bits; use precision='bf16' (or 'fp16').")
        if self.load_path == "4bit" and self.method != "qlora":
            raise SetupError("load_path='4bit' loads a QLoRA base; use method='qlora' or another load_path.")
        if self.method == "qlora" and self.load_path not in ("auto", "4bit"):
            raise SetupError(f"QLoRA loads its base in 4 bits; use load_path='auto' or '4bit', not '{self.load_path}'.")
        if self.load_path == "zero_init" and self.zero_stage != 3:
            raise SetupError("load_path='zero_init' partitions at load, which only ZeRO-3 does; use zero_stage=3.")
        if self.optimizer != "adamw" and self.offload != "none":
            raise SetupError(
                f"optimizer='{self.optimizer}' runs on the GPU; DeepSpeed's offload steps with its own CPU Adam: "
                "use optimizer='adamw' with offload, or offload='none'."
            )
        if self.method == "qlora" and self.zero_stage == 3:
            raise SetupError(
                "QLoRA's 4-bit base weights cannot be partitioned by ZeRO-3 here; use zero_stage<=2."
            )
        for name in ZERO_KNOB_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SetupError(f"{name} must be a whole number of elements (>= 0) or None for DeepSpeed's default, "
                                 f"got {value!r}.")
        for name in ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size"):
            if getattr(self, name) == 0:
                raise SetupError(f"{name} must be at least 1 element (DeepSpeed divides work into pieces of it).")
        for name in ("gpus_per_node", "num_nodes", "seq_len", "micro_batch", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SetupError(f"{name} must be a positive integer, got {value!r}.")
        _check_number("gpu_memory_gb", self.gpu_memory_gb, "40")
        if self.gpu_memory_gb <= 0:
            raise SetupError(f"gpu_memory_gb must be positive, got {self.gpu_memory_gb}; e.g. 40 for an A100-40GB.")
        if self.host_memory_gb is not None:
            _check_number("host_memory_gb", self.host_memory_gb, "512")
            if self.host_memory_gb <= 0:
                raise SetupError(f"host_memory_gb must be positive (GB of RAM per node), got {self.host_memory_gb}.")

    # Derived values -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Data-parallel ranks: every GPU of every node."""
        return self.gpus_per_node * self.num_nodes

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step: micro-batch x accumulation x ranks."""
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def gpu_memory_bytes(self) -> int:
        return int(self.gpu_memory_gb * BYTES_PER_GB)

    @property
    def host_memory_bytes(self) -> int | None:
        return None if self.host_memory_gb is None else int(self.host_memory_gb * BYTES_PER_GB)

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "qlora")

    def replace(self, **changes) -> TrainingSetup:
        """A validated copy with some fields changed (``lora_r=8`` etc. change the LoRA spec)."""
        lora_changes = {k.removeprefix("lora_"): changes.pop(k) for k in list(changes) if k.startswith("lora_")}
        if lora_changes:
            changes["lora"] = dataclasses.replace(changes.get("lora", self.lora), **lora_changes)
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """Plain JSON-ready data; ``TrainingSetup.from_dict`` reads it back."""
        data = dataclasses.asdict(self)
        data["lora"]["targets"] = list(self.lora.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TrainingSetup:
        """The setup ``as_dict`` wrote (missing fields take their defaults; unknown ones are an error)."""
        data = dict(data)
        lora = dict(data.pop("lora", None) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SetupError(f"unknown setup fields {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
        if "targets" in lora:
            lora["targets"] = tuple(lora["targets"])
        return cls(**data, lora=LoraSpec(**lora))

    def describe(self) -> str:
        """A one-line summary for tables and plot titles."""
        method = self.method if not self.uses_lora else f"{self.method} r={self.lora.r} on {'+'.join(self.lora.targets)}"
        offload = "" if self.offload == "none" else f" +offload {self.offload}"
        ckpt = " +ckpt" if self.activation_checkpointing else ""
        traps = "".join(f" +{text}" for on, text in (
            (self.optimizer != "adamw", self.optimizer), (self.loss_impl != "hf", f"{self.loss_impl} loss"),
            (self.router_aux_loss is not None, f"router loss {'on' if self.router_aux_loss else 'off'}"),
            (self.expandable_segments, "expandable segments"), (self.load_path != "auto", f"load {self.load_path}"),
            (not self.autocast_adapter_dtype, "adapters not upcast"),
        ) if on)
        defaults = deepspeed_defaults()
        traps += "".join(f" +{name}={getattr(self, name):,}" for name in ZERO_KNOB_FIELDS
                         if getattr(self, name) not in (None, defaults[name]))
        return (
            f"{self.model} {method} {self.precision} ZeRO-{self.zero_stage}{offload}{ckpt}{traps} "
            f"seq {self.seq_len} x mb {self.micro_batch} on {self.num_nodes}x{self.gpus_per_node} "
            f"x {self.gpu_memory_gb:.4g} GB"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise SetupError(f"{name} must be one of {', '.join(choices)}; got '{value}'.")


def _check_type(name: str, value: object, types: type | tuple[type, ...], example: str) -> None:
    if not isinstance(value, types):
        raise SetupError(f"{name} must be {example}, got {value!r} ({type(value).__name__}).")


def _check_int(name: str, value: object, hint: str) -> None:
    """A whole number (not a float such as 8.5, not a bool): byte totals are counts of elements."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SetupError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}); {hint}.")


def _check_number(name: str, value: object, example: str) -> None:
    """A finite int or float (a string such as "40", nan or inf is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SetupError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}); e.g. {example}.")
