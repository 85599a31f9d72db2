"""Probe-calibrated activations for MoE families moekit has no checked formula for.

Any decoder-only MoE that transformers builds can still be planned: a one- and a two-MoE-layer model
(after the family's dense first layers, if any) are simulated on fake tensors at the setup's batch and
length (``moekit.simulate``), and the difference gives the bytes one MoE layer saves; what remains of
the one-layer run is the part outside the layers. The result is cached on disk, keyed by the config,
the knobs that change saved tensors, and the torch / transformers / peft versions, so the probe runs
once per setup (a few seconds) and the estimate stays instant afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from moekit.training_setup import TrainingSetup

#: Where probe results are cached; ``MOEKIT_CACHE_DIR`` overrides it.
DEFAULT_CACHE_DIR = Path("~/.cache/moekit/probes")


@dataclass(frozen=True)
class ProbeResult:
    """Activation bytes at the end of forward, split into one MoE layer and the rest (per micro-batch)."""

    layer_bytes: int  # one MoE decoder layer (with checkpointing: what it keeps until backward)
    outside_bytes: int  # everything else of a model with the dense first layers (if any) and no MoE layer
    num_probed_layers: int  # MoE layers in the larger probe
    seconds: float  # how long the probe took when it ran

    def note(self) -> str:
        return (f"activations calibrated by a {self.num_probed_layers}-layer fake-tensor probe "
                f"({self.seconds:.1f} s, cached): moekit has no checked formula for this family")


def cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def _probe_setup(setup: TrainingSetup) -> TrainingSetup:
    """The setup's saved-tensor knobs on one rank (what states the optimizer keeps does not change what a layer
    saves); ZeRO-3 stays, since DeepSpeed's linear and zero.Init's fp32 adapters do (moekit.traps)."""
    return setup.replace(zero_stage=3 if setup.zero_stage == 3 else 0, offload="none", gpus_per_node=1, num_nodes=1,
                         grad_accum=1)


def cache_key(setup: TrainingSetup) -> str:
    """A hash of the config, the knobs that change saved tensors, and the library versions."""
    import peft
    import torch
    import transformers

    from moekit.models import as_config

    probe = _probe_setup(setup)
    knobs = {k: v for k, v in probe.as_dict().items() if k in (
        "method", "lora", "precision", "seq_len", "micro_batch", "attn_implementation", "activation_checkpointing",
        "zero_stage", "load_path", "autocast_adapter_dtype")}
    data = {
        "config": as_config(setup.model).to_dict(),
        "knobs": knobs,
        "versions": [torch.__version__, transformers.__version__, peft.__version__],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:24]


def calibrate(setup: TrainingSetup) -> ProbeResult:
    """The probe's figures for this setup: from the disk cache, or simulated now and cached."""
    path = cache_dir() / f"{cache_key(setup)}.json"
    if path.is_file():
        return ProbeResult(**json.loads(path.read_text()))
    from moekit.arch import arch_of
    from moekit.simulate import simulate_step

    probe = _probe_setup(setup)
    num_dense = arch_of(setup.model).num_dense_layers
    start = time.perf_counter()
    one, two = (simulate_step(probe, num_layers=num_dense + n, progress=False) for n in (1, 2))
    seconds = time.perf_counter() - start
    layer = two.breakdown.per_gpu["activations"] - one.breakdown.per_gpu["activations"]
    result = ProbeResult(layer, one.breakdown.per_gpu["activations"] - layer, 2, seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(result)))
    return result
