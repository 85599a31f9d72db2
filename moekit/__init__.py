"""moekit: estimate, simulate, measure and plan the memory of fine-tuning mixture-of-experts LLMs, and
run it with DeepSpeed.

The public API is importable from here (``from moekit import TrainingSetup, estimate``). Each name
is loaded on first use (PEP 562), so ``import moekit`` stays cheap and the warm ``moekit estimate``
never imports torch: asking for ``moekit.simulate`` loads torch, asking for ``moekit.estimate`` does not.

Six functions share their module's name (``estimate``, ``simulate``, ``plan``, ``train``, ``launch``,
``measure_engine``): ``moekit.estimate`` is always the function. Reach a module with
``from moekit.estimate import ...`` or ``importlib.import_module("moekit.estimate")``
(``import moekit.estimate`` alone would give the function, as ``from moekit import estimate`` does:
Python compiles both to the same attribute lookup).
"""

from __future__ import annotations

import importlib
import sys
import types

#: Public name -> the module that defines it (the one home of each; listed here only to export it).
_EXPORTS: dict[str, str] = {
    # the setup and its results
    "TrainingSetup": "training_setup",
    "LoraSpec": "training_setup",
    "Breakdown": "breakdown",
    "CATEGORIES": "breakdown",
    "MoekitError": "errors",
    "GiB": "units",
    "MiB": "units",
    # estimate, simulate, measure
    "estimate": "estimate",
    "model_facts": "estimate",
    "sweep": "estimate",
    "simulate": "simulate",
    "simulate_per_layer": "simulate",
    "measure": "profile",
    "measure_step": "profile",
    "measure_engine": "measure_engine",
    "run_capped": "memcap",
    # planning
    "Constraints": "plan",
    "plan": "plan",
    "ladder": "plan",
    "constraints_from_setup": "plan",
    "step_time": "plan",
    # models, architectures, LoRA, DeepSpeed configs
    "list_presets": "models",
    "preset_description": "models",
    "load_config": "models",
    "build_model": "models",
    "parameter_census": "models",
    "arch_of": "arch",
    "apply_lora": "lora",
    "lora_census": "lora",
    "peft_config": "lora",
    "ds_config": "zero",
    "validated_ds_config": "zero",
    "setup_for_preset": "zero",
    "zero_knobs": "zero_knobs",
    "setup_from_ds_config": "ds_read",
    # training, launching, monitoring
    "RunOptions": "run_options",
    "train": "train",
    "launch": "launch",
    "run_plan": "launch",
    "MemoryMonitor": "monitor",
    # figures and widgets
    "breakdown_figure": "viz",
    "monitor_figure": "viz",
    "live_monitor_figure": "viz",
    "ladder_figure": "viz",
    "sweep_figure": "viz",
    "line_fit_figure": "viz",
    "magnitude_histogram_figure": "viz",
    "dashboard": "widgets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Load a public name's module on first use (submodules such as ``moekit.train`` load as usual)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moekit' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"moekit.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package, refusing to let a submodule replace the function of the same name on it (the
    import system binds ``moekit.estimate`` to the module when it loads it)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
