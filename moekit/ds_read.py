"""A DeepSpeed config you already have, read into a ``TrainingSetup``: ``moekit estimate/plan --ds-config FILE``.

The Hugging Face "auto" values are resolved by transformers' own ``HfTrainerDeepSpeedConfig`` (micro-batch,
accumulation, precision from the setup's flags; ``reduce_bucket_size`` = hidden x hidden and ZeRO-3's prefetch
0.9 x hidden x hidden from the model), then DeepSpeed's own parser checks the result for the setup's world
size (``moekit.zero.validate_ds_config``): an unknown ZeRO key, a batch size that disagrees with micro-batch x
accumulation x ranks, or fp16 and bf16 both on is one line naming the key. What moekit models is read back:
precision, ZeRO stage, offload and its device, micro-batch, accumulation and the ZeRO size knobs; the rest
(optimizer, scheduler, logging) changes no memory moekit counts and is left as it is.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

from moekit.errors import MoekitError
from moekit.training_setup import SetupError, TrainingSetup
from moekit.zero_knobs import KNOBS


class DsConfigError(MoekitError):
    """A DeepSpeed config moekit cannot read, or one that contradicts itself; the message names the key."""


def precision_of(config: dict) -> str:
    """bf16 or fp16 when the config enables it, else fp32 (DeepSpeed's own default)."""
    if (config.get("bf16") or {}).get("enabled") is True:
        return "bf16"
    if (config.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    return "fp32"


def zero_fields_of(config: dict) -> dict:
    """Stage, offload, offload device and the size knobs the config's ``zero_optimization`` sets."""
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    optimizer, param = zero.get("offload_optimizer") or {}, zero.get("offload_param") or {}
    on = [section for section in (optimizer, param) if section.get("device") in ("cpu", "nvme")]
    offload = "none" if not on else ("optimizer+params" if param in on else "optimizer")
    fields: dict = {"zero_stage": stage, "offload": offload}
    if on and on[0]["device"] == "nvme":
        fields.update(offload_device="nvme", nvme_path=on[0].get("nvme_path") or "nvme")
    fields.update({knob: int(zero[knob]) for knob in KNOBS if isinstance(zero.get(knob), (int, float))})
    return fields


def load_ds_config(path: str | Path) -> dict:
    """The JSON object in ``path``, or a DsConfigError saying why not."""
    try:
        config = json.loads(Path(path).expanduser().read_text())
    except OSError as err:
        raise DsConfigError(f"cannot read the DeepSpeed config {path}: {err.strerror or err}.") from None
    except ValueError as err:
        raise DsConfigError(f"{path} is not JSON ({err}); pass a DeepSpeed config file.") from None
    if not isinstance(config, dict):
        raise DsConfigError(f"{path} holds a JSON {type(config).__name__}, not a DeepSpeed config object.")
    return config


def _explicit(config: dict, dotted: str, default):
    """The config's value at ``a.b.c`` unless it is missing or "auto"."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return default if node == "auto" else node


def _check_zero_keys(config: dict) -> None:
    """An unknown ``zero_optimization`` key, named with DeepSpeed's closest one (its parser forbids extras)."""
    import difflib

    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    known = {name for name, field in DeepSpeedZeroConfig.model_fields.items()} | {
        field.alias for field in DeepSpeedZeroConfig.model_fields.values() if field.alias}
    for key in config.get("zero_optimization") or {}:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see DeepSpeed's ZeRO config documentation."
            raise DsConfigError(f"zero_optimization.{key} is not a DeepSpeed ZeRO setting: {hint}")


def resolve_auto(config: dict, setup: TrainingSetup) -> dict:
    """``config`` with every Hugging Face "auto" filled in as the Trainer fills it for ``setup``'s run."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig, unset_hf_deepspeed_config

    from moekit.estimate import model_facts

    _check_zero_keys(config)
    if _explicit(config, "bf16.enabled", False) is True and _explicit(config, "fp16.enabled", False) is True:
        raise DsConfigError("the config enables both fp16 and bf16; DeepSpeed trains in one: set the other's "
                            "\"enabled\" to false.")
    micro_batch = int(_explicit(config, "train_micro_batch_size_per_gpu", setup.micro_batch))
    grad_accum = _explicit(config, "gradient_accumulation_steps", None)
    batch = _explicit(config, "train_batch_size", None)
    if grad_accum is None:  # DeepSpeed derives it from the global batch when only that is given
        per_step = micro_batch * setup.world_size
        grad_accum = batch // per_step if isinstance(batch, int) and batch % per_step == 0 else setup.grad_accum
    precision = precision_of({"bf16": {"enabled": _explicit(config, "bf16.enabled", setup.precision == "bf16")},
                              "fp16": {"enabled": _explicit(config, "fp16.enabled", setup.precision == "fp16")}})
    # Arguments equal to the file's explicit values, so only a contradiction inside the file is a mismatch.
    args = SimpleNamespace(
        world_size=setup.world_size, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=int(grad_accum),
        max_grad_norm=_explicit(config, "gradient_clipping", 1.0),
        learning_rate=_explicit(config, "optimizer.params.lr", 1e-4),
        adam_beta1=(_explicit(config, "optimizer.params.betas", [0.9, 0.999]))[0],
        adam_beta2=(_explicit(config, "optimizer.params.betas", [0.9, 0.999]))[1],
        adam_epsilon=_explicit(config, "optimizer.params.eps", 1e-8),
        weight_decay=_explicit(config, "optimizer.params.weight_decay", 0.0),
        save_on_each_node=False, fp16=precision == "fp16", fp16_full_eval=False, bf16=precision == "bf16",
        bf16_full_eval=False, get_warmup_steps=lambda steps: 0,
    )
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=model_facts(setup.model).hidden))
    try:
        hf_config = HfTrainerDeepSpeedConfig(copy.deepcopy(config))
        hf_config.trainer_config_process(args)
        hf_config.trainer_config_finalize(args, model, num_training_steps=1)
        resolved = hf_config.config
        # what DeepSpeed derives when the file leaves them out (a missing key is no "auto" to transformers)
        resolved.setdefault("train_micro_batch_size_per_gpu", micro_batch)
        resolved.setdefault("gradient_accumulation_steps", int(grad_accum))
    except ValueError as err:
        raise DsConfigError(" ".join(str(err).split())) from None
    finally:
        unset_hf_deepspeed_config()  # transformers keeps a global reference to the last config it read
    return resolved


def setup_from_ds_config(config: dict | str | Path, setup: TrainingSetup | None = None) -> TrainingSetup:
    """``setup`` (model, ranks, sequence...) with what a DeepSpeed config decides read from the config.

    ``config``: the dict or a JSON file's path. Its "auto" values come from ``setup``, as the Hugging
    Face Trainer would fill them from its arguments.
    """
    from moekit.zero import ZeroConfigError, validate_ds_config

    setup = setup or TrainingSetup()
    source = config if isinstance(config, dict) else load_ds_config(config)
    resolved = resolve_auto(source, setup)
    try:
        validate_ds_config(resolved, setup.world_size)
    except ZeroConfigError as err:
        raise DsConfigError(str(err)) from None
    fields = {
        "precision": precision_of(resolved),
        **zero_fields_of(resolved),
        "micro_batch": int(resolved.get("train_micro_batch_size_per_gpu", setup.micro_batch)),
        "grad_accum": int(resolved.get("gradient_accumulation_steps", setup.grad_accum)),
    }
    try:
        return setup.replace(**fields)
    except SetupError as err:
        raise DsConfigError(f"the DeepSpeed config does not describe a run moekit can set up: {err}") from None
