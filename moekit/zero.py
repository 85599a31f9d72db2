"""DeepSpeed configs that DeepSpeed itself accepts: ``ds_config(setup)`` and XTuner's five presets.

One TrainingSetup gives one config: the ZeRO stage and what it offloads (to CPU RAM or to an NVMe
folder), fp16 with dynamic loss scaling or bf16, and micro-batch / accumulation / global batch that
agree with the number of ranks. ``validate_ds_config`` runs DeepSpeed's own parser on the result
(``deepspeed.runtime.config.DeepSpeedConfig``) for the run's real world size, so a config that
moekit writes is one that ``deepspeed.initialize`` will take. Unknown keys are errors there too
(DeepSpeed's pydantic models forbid extra fields).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from moekit.errors import MoekitError
from moekit.training_setup import TrainingSetup
from moekit.zero_knobs import zero_knobs

#: Dynamic fp16 loss scaling starts at 2**16, as XTuner's presets do.
FP16_INITIAL_SCALE_POWER = 16
GRADIENT_CLIPPING = 1.0

#: XTuner's presets (xtuner/configs/deepspeed/*.json): stage and offload of each.
PRESETS: dict[str, tuple[int, str]] = {
    "zero1": (1, "none"),
    "zero2": (2, "none"),
    "zero2_offload": (2, "optimizer"),
    "zero3": (3, "none"),
    "zero3_offload": (3, "optimizer+params"),
}


class ZeroConfigError(MoekitError):
    """A DeepSpeed config that is inconsistent or that DeepSpeed rejects; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Building configs
# --------------------------------------------------------------------------------------------


def ds_config(setup: TrainingSetup, preset: str | None = None, *, global_batch: int | None = None) -> dict:
    """The DeepSpeed config for a setup (or one of XTuner's presets with its "auto" values resolved).

    global_batch: sequences per optimizer step you want; gradient accumulation is derived from it
    (it must be a multiple of micro-batch x world size). Default: the setup's micro-batch x
    accumulation x ranks.
    """
    grad_accum = _grad_accum_for(setup, global_batch)
    if preset is not None:
        config = preset_config(preset, setup)
        config["gradient_accumulation_steps"] = grad_accum
        return config
    config = {
        "train_batch_size": setup.micro_batch * grad_accum * setup.world_size,
        "train_micro_batch_size_per_gpu": setup.micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": GRADIENT_CLIPPING,
        **precision_section(setup.precision),
        "zero_optimization": zero_section(setup),
        "steps_per_print": 1_000_000,  # moekit logs every step itself
        "wall_clock_breakdown": False,
    }
    if setup.offload_device == "nvme" and setup.offload != "none":
        config["aio"] = aio_section()
    if setup.optimizer != "adamw":
        # bitsandbytes' AdamW8bit / PagedAdamW are no DeepSpeed optimizer type: the training script passes one
        # to deepspeed.initialize(optimizer=...), which ZeRO accepts only with this flag (not with offload).
        config["zero_allow_untested_optimizer"] = True
    return config


def _grad_accum_for(setup: TrainingSetup, global_batch: int | None) -> int:
    if global_batch is None:
        return setup.grad_accum
    per_step = setup.micro_batch * setup.world_size
    if global_batch <= 0 or global_batch % per_step:
        lower, upper = max(per_step, global_batch // per_step * per_step), (global_batch // per_step + 1) * per_step
        raise ZeroConfigError(
            f"a global batch of {global_batch} sequences is not a multiple of micro-batch {setup.micro_batch} x "
            f"{setup.world_size} ranks = {per_step}: gradient accumulation must be a whole number. "
            f"Use a global batch of {lower} or {upper}, or change the micro-batch."
        )
    return global_batch // per_step


def precision_section(precision: str) -> dict:
    """fp16 with dynamic loss scaling, bf16, or neither (fp32)."""
    fp16 = {
        "enabled": precision == "fp16",
        "loss_scale": 0,  # 0 = dynamic loss scaling
        "initial_scale_power": FP16_INITIAL_SCALE_POWER,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    return {"fp16": fp16, "bf16": {"enabled": precision == "bf16"}}


def zero_section(setup: TrainingSetup) -> dict:
    """``zero_optimization``: stage, offload targets and the size knobs (the setup's, else DeepSpeed's defaults,
    written out so the config says what the run uses)."""
    stage = setup.zero_stage
    section: dict = {"stage": stage}
    if stage == 0:
        return section
    knobs = zero_knobs(setup)
    section.update(
        overlap_comm=True,
        contiguous_gradients=True,
        reduce_bucket_size=knobs.reduce_bucket_size,
    )
    if stage in (1, 2):
        section.update(allgather_partitions=True, allgather_bucket_size=knobs.allgather_bucket_size, reduce_scatter=True)
    if setup.offload in ("optimizer", "optimizer+params"):
        section["offload_optimizer"] = offload_section(setup, "optimizer")
    if stage == 3:
        section.update(
            stage3_prefetch_bucket_size=knobs.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=knobs.stage3_param_persistence_threshold,
            stage3_max_live_parameters=knobs.stage3_max_live_parameters,
            stage3_max_reuse_distance=knobs.stage3_max_reuse_distance,
            sub_group_size=knobs.sub_group_size,
            stage3_gather_16bit_weights_on_model_save=True,
        )
        leaf_classes = moe_block_class_names(setup.model)
        if leaf_classes:
            # Without this an expert that gets no tokens skips its hooks and ZeRO-3 waits forever.
            section["leaf_module"] = {"classes": leaf_classes}
    if setup.offload == "optimizer+params":
        section["offload_param"] = offload_section(setup, "param")
    return section


def offload_section(setup: TrainingSetup, what: str) -> dict:
    """``offload_optimizer`` or ``offload_param`` to the CPU, or to NVMe under ``setup.nvme_path``."""
    section: dict = {"device": setup.offload_device, "pin_memory": True}
    if setup.offload_device == "nvme":
        section["nvme_path"] = setup.nvme_path
        section["buffer_count"] = 4 if what == "optimizer" else 5
        if what == "param":
            section.update(buffer_size=100_000_000, max_in_cpu=1_000_000_000)
    return section


def aio_section() -> dict:
    """DeepSpeed's async-I/O settings for NVMe offload (its documented defaults)."""
    return {"block_size": 1_048_576, "queue_depth": 8, "thread_count": 1, "single_submit": False, "overlap_events": True}


def optimizer_section(lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> dict:
    """AdamW as DeepSpeed's own optimizer (FusedAdam, or CPUAdam when the optimizer is offloaded).

    weight_decay defaults to 0: a decoupled decay moves every weight a little even with a zero
    gradient, which would hide from moekit's training guard an adapter that gets no gradient.
    """
    return {"type": "AdamW", "params": {"lr": lr, "betas": list(betas), "eps": 1e-8, "weight_decay": weight_decay}}


def moe_block_class_names(model: str) -> list[str]:
    """Class names of the MoE blocks (router + experts) to mark as ZeRO-3 leaf modules; [] for dense models.

    Read from every decoder layer (``moekit.arch``): DeepSeek's and GLM's first layers are dense."""
    from moekit.arch import arch_of

    return sorted(arch_of(str(model)).moe_block_classes)


# --------------------------------------------------------------------------------------------
# XTuner's presets
# --------------------------------------------------------------------------------------------


def xtuner_preset(name: str) -> dict:
    """XTuner's preset exactly as it ships, "auto" values included."""
    if name not in PRESETS:
        raise ZeroConfigError(f"unknown DeepSpeed preset '{name}'; choose one of {', '.join(PRESETS)}.")
    stage, offload = PRESETS[name]
    zero: dict = {"stage": stage, "overlap_comm": True}
    if offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "gradient_accumulation_steps": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "fp16": {"enabled": "auto", "initial_scale_power": FP16_INITIAL_SCALE_POWER},
        "bf16": {"enabled": "auto"},
    }


def setup_for_preset(setup: TrainingSetup, name: str) -> TrainingSetup:
    """The setup with the ZeRO stage and offload of a preset (so estimate and the config agree)."""
    if name not in PRESETS:
        raise ZeroConfigError(f"unknown DeepSpeed preset '{name}'; choose one of {', '.join(PRESETS)}.")
    stage, offload = PRESETS[name]
    return setup.replace(zero_stage=stage, offload=offload, offload_device="cpu")


def preset_config(name: str, setup: TrainingSetup) -> dict:
    """An XTuner preset with every "auto" resolved from the setup, which must have the preset's stage/offload."""
    config = xtuner_preset(name)
    stage, offload = PRESETS[name]
    if (setup.zero_stage, setup.offload) != (stage, offload):
        raise ZeroConfigError(
            f"preset '{name}' is ZeRO-{stage} with offload '{offload}', but the setup says ZeRO-{setup.zero_stage} "
            f"with offload '{setup.offload}'; use moekit.zero.setup_for_preset(setup, '{name}') (CLI: --zero {stage} "
            f"--offload {offload}) so the memory estimate and the config describe the same run."
        )
    config["gradient_accumulation_steps"] = setup.grad_accum
    config["train_micro_batch_size_per_gpu"] = setup.micro_batch
    config["gradient_clipping"] = GRADIENT_CLIPPING
    config["fp16"]["enabled"] = setup.precision == "fp16"
    config["bf16"]["enabled"] = setup.precision == "bf16"
    return config


# --------------------------------------------------------------------------------------------
# Validation with DeepSpeed's own parser
# --------------------------------------------------------------------------------------------


def check_consistency(config: dict, world_size: int) -> None:
    """moekit's own checks, with messages that name the numbers that disagree."""
    if _enabled(config.get("fp16")) and _enabled(config.get("bf16")):
        raise ZeroConfigError("fp16 and bf16 are both enabled; a run uses one 16-bit format: set one of them to false.")
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if _offload_device(zero.get("offload_param")) and stage != 3:
        raise ZeroConfigError(
            f"offload_param needs ZeRO stage 3 (only stage 3 partitions the parameters), but stage is {stage}; "
            "set stage 3 or remove offload_param."
        )
    if _offload_device(zero.get("offload_optimizer")) and stage == 0:
        raise ZeroConfigError("offload_optimizer needs ZeRO stage 1, 2 or 3; stage is 0.")
    for section in ("offload_param", "offload_optimizer"):
        if _offload_device(zero.get(section)) == "nvme" and not zero[section].get("nvme_path"):
            raise ZeroConfigError(f"{section} to nvme needs nvme_path, a folder on a fast local disk.")
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps", 1)
    total = config.get("train_batch_size")
    if any(isinstance(v, str) for v in (micro, accum, total)):
        raise ZeroConfigError("the config still holds 'auto' batch values; build it with ds_config(setup, preset=...).")
    if total is not None and micro is not None and total != micro * accum * world_size:
        raise ZeroConfigError(
            f"train_batch_size {total} != micro-batch {micro} x gradient accumulation {accum} x {world_size} ranks "
            f"= {micro * accum * world_size}; change one of them (or drop train_batch_size and DeepSpeed derives it)."
        )


def _enabled(section: object) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def _offload_device(section: object) -> str | None:
    if not isinstance(section, dict):
        return None
    device = section.get("device", "none")
    return None if device in (None, "none") else str(device)


class _DataParallelWorld:
    """The ``mpu`` interface DeepSpeedConfig asks for the data-parallel world size."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def get_data_parallel_world_size(self) -> int:
        return self.world_size


@contextlib.contextmanager
def _rank_zero_without_process_group() -> Iterator[None]:
    """Let DeepSpeedConfig ask for this process's rank when no process group exists.

    DeepSpeedConfig reads ``deepspeed.comm.get_rank()`` first and, when that fails (no
    distributed init), falls back to world size 1 and ignores the ``mpu`` it was given, so an
    8-GPU config would be checked as a 1-GPU one. Answering rank 0 keeps DeepSpeed's own parser
    and batch checks, at the real world size, without starting a process group.
    """
    import deepspeed.comm as dist

    if dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def validate_ds_config(config: dict, world_size: int) -> dict:
    """Parse a config with DeepSpeed's own ``DeepSpeedConfig`` for ``world_size`` ranks; return it unchanged.

    Raises ZeroConfigError with DeepSpeed's message when DeepSpeed rejects it (unknown keys,
    wrong types, batch sizes that disagree, ...).
    """
    check_consistency(config, world_size)
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)  # the parser logs its world size at INFO
    try:
        with _rank_zero_without_process_group():
            DeepSpeedConfig(copy.deepcopy(config), mpu=_DataParallelWorld(world_size))
    except (AssertionError, ValueError, TypeError) as err:
        message = " ".join(str(err).split())
        raise ZeroConfigError(f"DeepSpeed rejects this config: {message}") from err
    finally:
        ds_logger.setLevel(level)
    return config


def validated_ds_config(setup: TrainingSetup, preset: str | None = None, *, global_batch: int | None = None) -> dict:
    """``ds_config`` checked by DeepSpeed's parser for the setup's world size."""
    return validate_ds_config(ds_config(setup, preset, global_batch=global_batch), setup.world_size)
