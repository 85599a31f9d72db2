"""Model configs (presets, folders, config.json) and building models on meta / CPU / fake devices.

The lowest layer that touches transformers: ``moekit.arch`` reads a model built here and
``moekit.models`` counts its parameters, so neither needs the other. Everything here is offline:
shapes come from the JSON presets bundled in ``moekit/presets/models``
or from a local Hugging Face model folder; weights are seeded random numbers or read from local
safetensors files.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from moekit.catalog import list_presets, preset_dir
from moekit.errors import MoekitError

Device = Literal["meta", "cpu", "fake"]

class ModelError(MoekitError):
    """A model name, folder or config that moekit cannot use; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Presets and configs
# --------------------------------------------------------------------------------------------


def causal_lm_model_types() -> list[str]:
    """Every model_type the installed transformers builds as a decoder-only ``*ForCausalLM`` (BERT's
    ``BertLMHeadModel`` and other encoder heads are left out)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(t for t, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls.endswith("ForCausalLM"))


def config_from_dict(data: dict, source: str) -> PretrainedConfig:
    """A transformers config from config.json data; a one-line error unless it is a causal LM."""
    data = {k: v for k, v in data.items() if not k.startswith("_moekit")}
    model_type = data.get("model_type")
    if model_type is None:
        raise ModelError(f"{source} has no 'model_type'; is it a Hugging Face config.json?")
    if model_type not in causal_lm_model_types():
        raise ModelError(
            f"{source} is a '{model_type}' model, which is not a causal language model transformers can "
            "build (AutoModelForCausalLM); moekit plans decoder-only LMs such as mixtral, qwen3_moe, "
            "deepseek_v3 or gpt_oss (list them with `moekit models`)."
        )
    data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def load_config(model: str | Path) -> PretrainedConfig:
    """A transformers config from a preset name, a model folder, or a config.json path (offline)."""
    model_str = str(model)
    if model_str in list_presets():
        path = preset_dir() / f"{model_str}.json"
        config = config_from_dict(json.loads(path.read_text()), f"preset '{model_str}'")
        config.name_or_path = model_str
        return config
    path = Path(model_str).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(
                f"the folder {path} has no config.json; point --model at a Hugging Face model "
                "folder (config.json plus *.safetensors) or use a preset name."
            )
    elif path.is_file():
        config_file = path
    else:
        raise ModelError(
            f"unknown model '{model_str}': it is neither a preset nor an existing path. "
            f"Known presets: {', '.join(list_presets())}."
        )
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{config_file} is not valid JSON: {err}") from err
    config = config_from_dict(data, str(config_file))
    config.name_or_path = str(path)
    return config


def as_config(model: str | Path | PretrainedConfig) -> PretrainedConfig:
    """Accept a preset name, a path, or an already-loaded config."""
    return model if isinstance(model, PretrainedConfig) else load_config(model)


# --------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Temporarily set torch's default dtype (the way to build a bf16 model under fake tensors)."""
    if dtype is None:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def config_with_layers(config: PretrainedConfig, num_layers: int | None) -> PretrainedConfig:
    """A copy of the config truncated (or extended) to num_layers decoder layers."""
    data = config.to_dict()
    if num_layers is not None:
        data["num_hidden_layers"] = int(num_layers)
        types = data.get("layer_types")
        if isinstance(types, list) and types:  # per-layer lists (Qwen's sliding-window layout) follow
            data["layer_types"] = (types + [types[-1]] * num_layers)[:num_layers]
    return config.__class__.from_dict(data)


def build_model(
    model: str | Path | PretrainedConfig,
    device: Device = "meta",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = torch.float32,
    num_layers: int | None = None,
    attn_implementation: str | None = "sdpa",
) -> torch.nn.Module:
    """Build a causal LM from a preset or config with no weights downloaded.

    device:
      - ``meta``: shapes only, instant at any size (for censuses and LoRA counts).
      - ``cpu``: real seeded random weights (use the small presets).
      - ``fake``: PyTorch FakeTensors on the CPU: any size, no memory; call this inside your own
        ``FakeTensorMode`` context, or let this function open one (the tensors then stay fake).
    dtype: parameter dtype, applied through torch's default dtype while building (``model.to``
      does not work on fake tensors).
    """
    config = config_with_layers(as_config(model), num_layers)
    attn_implementation = attention_implementation(config, attn_implementation)
    config._attn_implementation = attn_implementation
    if dtype is not None:
        config.dtype = dtype  # from_config follows the config's dtype (the presets say bfloat16) over the default
    if device == "meta":
        ctx: contextlib.AbstractContextManager = torch.device("meta")
    elif device == "cpu":
        torch.manual_seed(seed)
        ctx = contextlib.nullcontext()
    elif device == "fake":
        ctx = _fake_mode_if_needed()
    else:
        raise ModelError(f"unknown device '{device}'; use 'meta', 'cpu' or 'fake'.")
    with ctx, default_dtype(dtype):
        built = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return built


def _fake_mode_if_needed() -> contextlib.AbstractContextManager:
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    if active_fake_mode() is not None:
        return contextlib.nullcontext()
    return FakeTensorMode(allow_non_fake_inputs=True)


def load_pretrained(
    folder: str | Path, *, dtype: torch.dtype | None = None, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """Load real weights from a local Hugging Face folder (safetensors); never touches the network."""
    folder = Path(folder).expanduser()
    load_config(folder)  # a clear error for a missing config or an unsupported architecture
    return AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=dtype,
        attn_implementation=attention_implementation(load_config(folder), attn_implementation),
    )


def causal_lm_class(config: PretrainedConfig) -> type:
    """The transformers class AutoModelForCausalLM builds for this config."""
    return AutoModelForCausalLM._model_mapping[type(config)]


def attention_implementation(config: PretrainedConfig, requested: str | None) -> str:
    """The attention kernel a run really gets: families without an SDPA path (gpt-oss, whose sinks
    SDPA cannot take) run eager attention when SDPA is asked for, as transformers' default does."""
    if requested in (None, "sdpa") and not getattr(causal_lm_class(config), "_supports_sdpa", True):
        return "eager"
    return requested or "sdpa"
