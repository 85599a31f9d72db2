"""One way to turn a setup into the model it trains: build (seeded random weights, a local folder's
weights, 4-bit for QLoRA), then prepare (activation checkpointing, LoRA, which weights train).

``prepare_for_training`` is shared by the real run (``moekit.train``, ``moekit.measure_engine``,
``moekit.hf``: DeepSpeed casts the fp32 model it is given) and the memory harness
(``moekit.step.build_for_training``: built in the working dtype, on FakeTensors when simulating), so
the model a simulation tracks is the model a run trains. ``prepare_model`` adds what only a real
DeepSpeed run needs: ZeRO-3 leaf modules.

Activation checkpointing is non-reentrant everywhere (``use_reentrant=False``), said explicitly:
it is transformers 5's default and PyTorch's recommendation, the real run always asked for it, and
writing it here keeps a change of transformers' default from splitting the simulated and real runs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

from moekit.errors import TrainingError
from moekit.training_setup import LoraSpec, TrainingSetup


def weights_folder(setup: TrainingSetup, weights: str | Path | None) -> Path | None:
    """The local folder to load weights from: ``weights``, or setup.model when it is a folder with safetensors."""
    if weights is not None:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise TrainingError(f"weights folder {folder} does not exist; give a local Hugging Face model folder.")
        return folder
    candidate = Path(str(setup.model)).expanduser()
    if candidate.is_dir() and any(candidate.glob("*.safetensors")):
        return candidate
    return None


@contextlib.contextmanager
def zero3_build_context(config: dict, enabled: bool) -> Iterator[object | None]:
    """Let transformers build under ZeRO-3 itself: zero.Init *and* weight init on gathered shards.

    ``HfDeepSpeedConfig`` registers the config (transformers keeps a weak reference, so the object
    must stay alive while the model is built and trained); ``from_config``/``from_pretrained`` then
    open ``deepspeed.zero.Init`` and, for random weights, run ``initialize_weights_zero3``. Opening
    zero.Init by hand instead leaves the fused experts uninitialized (see ``moekit.train``'s docstring).
    """
    if not enabled:
        yield None
        return
    from transformers.integrations import HfDeepSpeedConfig

    registration = HfDeepSpeedConfig(config)
    yield registration


def build_base_model(setup: TrainingSetup, folder: Path | None, seed: int) -> torch.nn.Module:
    """Seeded random weights for a preset, or a local folder's weights (4-bit for QLoRA)."""
    from moekit.models import build_model, load_pretrained

    if setup.method == "qlora":
        return _load_quantized(setup, folder)
    if folder is not None:
        torch.manual_seed(seed)
        return load_pretrained(folder, dtype=torch.float32, attn_implementation=setup.attn_implementation)
    return build_model(setup.model, "cpu", seed=seed, dtype=torch.float32, attn_implementation=setup.attn_implementation)


def _load_quantized(setup: TrainingSetup, folder: Path | None) -> torch.nn.Module:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from moekit.lora import bitsandbytes_config

    quantization = bitsandbytes_config(setup)  # raises a clear error without bitsandbytes + CUDA
    if folder is None:
        raise TrainingError("QLoRA quantizes real weights: give a local weights folder (weights=...), or use method='lora'.")
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, quantization_config=quantization, attn_implementation=setup.attn_implementation
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=setup.activation_checkpointing)


def add_lora(model: torch.nn.Module, spec: LoraSpec, lora_config=None, working_dtype: torch.dtype | None = None,
             adapter_dtype: torch.dtype | None = None, autocast_adapter_dtype: bool = True) -> torch.nn.Module:
    """``moekit.lora.apply_lora``, or ``get_peft_model`` with a LoraConfig resolved beforehand.

    Under zero.Init the parameters are partitioned (they look empty until gathered), so moekit
    resolves the targets from the preset or config before building (``peft_config_for(setup)``)
    and passes that config here. working_dtype: build the adapters in this dtype and give every
    trainable weight adapter_dtype (default: the same), as DeepSpeed's engine leaves them
    (``moekit.traps.adapter_precision``; the memory harness, on FakeTensors).
    """
    if lora_config is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
            return get_peft_model(model, lora_config, autocast_adapter_dtype=autocast_adapter_dtype)
    from moekit.lora import apply_lora

    if working_dtype is None:
        return apply_lora(model, spec, autocast_adapter_dtype)
    from moekit.models import default_dtype

    with default_dtype(working_dtype), mock.patch.object(torch.nn.Module, "to", _to_if_needed(torch.nn.Module.to)):
        model = apply_lora(model, spec, autocast_adapter_dtype)
    _cast_trainable(model, adapter_dtype or working_dtype)
    return model


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """The module classes that hold a router and experts (MixtralSparseMoeBlock and its relatives)."""
    from moekit.arch import moe_block_classes as classes_of

    return sorted(classes_of(model), key=lambda c: c.__name__)


def prepare_for_training(model: torch.nn.Module, setup: TrainingSetup, lora_config=None,
                         working_dtype: torch.dtype | None = None,
                         adapter_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """No KV cache, activation checkpointing, then LoRA (or every weight trainable for a full
    fine-tune), in train mode: the one preparation the real run and the memory harness share."""
    model.config.use_cache = False
    if setup.activation_checkpointing:
        enable_activation_checkpointing(model)
    if setup.uses_lora:
        model = add_lora(model, setup.lora, lora_config, working_dtype, adapter_dtype, setup.autocast_adapter_dtype)
    elif setup.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    model.train()
    return model


def prepare_model(model: torch.nn.Module, setup: TrainingSetup, lora_config=None) -> torch.nn.Module:
    """``prepare_for_training`` plus ZeRO-3 leaf modules: a real DeepSpeed run's model."""
    model = prepare_for_training(model, setup, lora_config)
    if setup.zero_stage == 3:
        classes = moe_block_classes(model)
        if classes:
            from deepspeed.utils import set_z3_leaf_modules

            # An expert that gets no tokens would skip its ZeRO-3 hooks and the ranks would wait forever.
            set_z3_leaf_modules(model, classes)
    return model


def peft_config_for(setup: TrainingSetup):
    """The setup's LoraConfig, resolved from the preset or config before building (zero.Init hides shapes)."""
    from moekit.lora import peft_config

    return peft_config(setup.lora, setup.model)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward, non-reentrant (see the module docstring)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _to_if_needed(original: Callable) -> Callable:
    """``nn.Module.to`` that returns the module untouched when nothing would change.

    peft moves every new adapter to its base layer's device and dtype; on FakeTensors that no-op move
    still swaps tensors, which fails. Building adapters in the right dtype makes every move a no-op.
    """

    def to(self: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        for tensor in list(self.parameters()) + list(self.buffers()):
            if device is not None and tensor.device != torch.device(device):
                return original(self, *args, **kwargs)
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                return original(self, *args, **kwargs)
        return self

    return to


def _cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give trainable parameters the dtype DeepSpeed's engine leaves them in (new Parameters, no swap)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.dtype != dtype:
                module._parameters[name] = torch.nn.Parameter(param.detach().to(dtype), requires_grad=True)
