"""The real training entry point: ``train(setup)`` runs DeepSpeed on the config ``ds_config(setup)`` gives.

One process is one rank. Under the DeepSpeed launcher (``deepspeed --num_gpus N -m moekit.train
--setup-json setup.json ...``) or torchrun, every rank runs ``main()``; called from Python without a
launcher, ``train`` runs a single rank. On a machine without GPUs DeepSpeed uses its CPU accelerator
and gloo, so the same code trains a tiny model with several CPU processes.

What a run does, in order: build the model (seeded random weights for a preset, or a local weights
folder), apply LoRA, mark MoE blocks as ZeRO-3 leaf modules, enable activation checkpointing when
asked, ``deepspeed.initialize``, then step through batches whose order is fixed by the step counter,
logging loss and memory per step to ``log.jsonl``, saving checkpoints every ``save_every`` steps and
resuming from the latest one.

**The training guard.** A falling loss proves little: attention adapters can carry the loss down while
the expert adapters never change. After the first optimizer step and at every checkpoint the guard
compares a fingerprint (sums and a few sampled values, gathered one tensor at a time under ZeRO-3) of
every group of weights the setup says is trainable, and stops the run with ``TrainingGuardError``
naming each group that did not move (``moekit.guard``).

**Building under ZeRO-3 (zero.Init).** A model too large for one device must be built already
partitioned, inside ``deepspeed.zero.Init``. Opening that context by hand around
``AutoModelForCausalLM.from_config`` is a trap with transformers 5: the parameters are partitioned
into empty shards as each module is constructed, and transformers initializes weights afterwards in
its own recursion (``smart_apply``), which bypasses the ``Module.apply`` wrapper DeepSpeed uses to
gather shards for initialization. Every tensor that transformers initializes in ``_init_weights``
instead of in the module's own constructor keeps the bytes ``torch.empty`` left: the fused expert
tensors ``gate_up_proj``/``down_proj`` and the router. Those bytes are usually tiny numbers, so each
expert's output is ~0, the gradient reaching the expert LoRA is ~1e-41, Adam's eps swamps it and the
expert adapters never move, while nn.Linear layers (initialized in their constructors) and their
attention adapters train and the loss falls. moekit's ZeRO-3 path avoids this by letting transformers
open zero.Init itself: it registers the DeepSpeed config with ``HfDeepSpeedConfig`` and then builds
(``from_config`` or ``from_pretrained``), and transformers then runs ``initialize_weights_zero3``,
which gathers each module's shards before initializing them. peft and DeepSpeed are not at fault:
peft's ParamWrapper folds the adapter into the expert weight correctly under ZeRO-3 once that weight
holds real values. ``scripts/repro_zero_init_expert_lora.py`` reproduces both paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.data import BatchOrder, TokenizedData
from moekit.errors import Interrupted, MoekitError, RunFailure
from moekit.guard import (
    GuardCheck,
    ParamGroup,
    TrainingGuard,
    check_lora_coverage,
    gathered,
    lora_components,
    param_groups,
)
from moekit.launch import TrainArgs, free_port
from moekit.training_setup import LoraSpec, TrainingSetup

#: Learning rates for real fine-tuning; tiny lesson models learn visibly with 1e-3 (full) to 1e-2 (LoRA).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}


class TrainingError(MoekitError):
    """A training run that cannot start or continue as asked; the message says what to change."""


class TrainingFailed(TrainingError, RunFailure):
    """The run started and then failed (a non-finite loss); the message says what to try next."""


# --------------------------------------------------------------------------------------------
# The setup as a file (the launcher hands it to every rank)
# --------------------------------------------------------------------------------------------


def save_setup(setup: TrainingSetup, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(setup.as_dict(), indent=2) + "\n")
    return path


def load_setup(path: str | Path) -> TrainingSetup:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"setup file {path} does not exist; write one with moekit.train.save_setup(setup, path).")
    try:
        return TrainingSetup.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:  # bad JSON, not UTF-8, wrong field types
        raise TrainingError(f"setup file {path} is not a moekit setup ({err}); remove it or write it with save_setup.") from None


# --------------------------------------------------------------------------------------------
# The run folder: one run per folder, never two mixed
# --------------------------------------------------------------------------------------------

#: What a moekit run writes into its folder (a folder holding only these is a moekit run); launcher.log is
#: where moekit.lessons sends the launcher's output, accelerate.yaml the config ``moekit launch`` writes for
#: ``accelerate launch``.
RUN_FILES = ("setup.json", "ds_config.json", "hostfile", "accelerate.yaml", "launcher.log", "log.jsonl",
             "guard.jsonl", "checkpoints")
#: The files that hold a run's progress: a folder with none of them was only prepared (``moekit launch``).
PROGRESS_FILES = ("log.jsonl", "guard.jsonl", "checkpoints")


#: Setup fields that describe the hardware the fit is checked against, not the run: they may change on resume.
FIT_ONLY_FIELDS = ("gpu_memory_gb", "host_memory_gb")


def setup_differences(old: TrainingSetup, new: TrainingSetup) -> list[str]:
    """``field old -> new`` for every field that changes the run (LoRA fields as ``lora.r``)."""

    def flat(setup: TrainingSetup) -> dict:
        data = setup.as_dict()
        lora = data.pop("lora")
        return {**data, **{f"lora.{k}": v for k, v in lora.items()}}

    before, after = flat(old), flat(new)
    return [f"{key} {before[key]!r} -> {after[key]!r}" for key in before
            if before[key] != after[key] and key not in FIT_ONLY_FIELDS]


@dataclass(frozen=True)
class RunFolder:
    """What is in a run folder before a run starts, and what the run will do with it."""

    path: Path
    start_step: int  # the checkpoint the run resumes from (0: a new run)
    move_aside_to: Path | None = None  # --no-resume on an old run: where the old run goes


def check_run_folder(output_dir: str | Path, setup: TrainingSetup, *, resume: bool) -> RunFolder:
    """Refuse (TrainingError) before anything is written when this run would mix with another one.

    - the folder is a file, or cannot be created or written;
    - it holds files that are not a moekit run (a run would scatter its files among them);
    - resume: the folder's run was made with another setup (the differing fields are named);
    - no resume: a run that made progress is moved aside to a named folder, never emptied in place.
    """
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise TrainingError(f"output folder {path} is a file; give a folder path (it is created if missing).")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise TrainingError(f"output folder {path} would be inside the file {existing}; give a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrainingError(f"cannot write into {existing}; choose an output folder you may write to.")
    if not path.is_dir() or not any(path.iterdir()):
        return RunFolder(path, 0)
    foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
    if foreign or not (path / "setup.json").is_file():
        shown = ", ".join(foreign[:3]) or "no setup.json"
        raise TrainingError(f"{path} is not empty and not a moekit run ({shown}); choose a new or empty output folder.")
    if not resume:
        if not any((path / name).exists() for name in PROGRESS_FILES):
            return RunFolder(path, 0)  # prepared by `moekit launch`, nothing run yet: nothing to move
        aside = path.with_name(f"{path.name}-old-{time.strftime('%Y%m%d-%H%M%S')}")
        return RunFolder(path, 0, move_aside_to=aside)
    old = load_setup(path / "setup.json")
    differences = setup_differences(old, setup)
    if differences:
        raise TrainingError(
            f"{path} holds a run with another setup ({'; '.join(differences)}); resuming would mix two runs. Use the "
            "same flags to resume it, another output folder for this setup, or --no-resume to move the old run aside."
        )
    return RunFolder(path, latest_checkpoint_step(path) or 0)


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


# --------------------------------------------------------------------------------------------
# Distributed start
# --------------------------------------------------------------------------------------------


SINGLE_RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group, or make a one-rank group for a plain call; return (rank, world size).

    DeepSpeed picks the backend for the accelerator: NCCL on GPUs, gloo (or oneCCL) on the CPU. A
    one-rank group lives as long as the process (DeepSpeed caches its groups, so it cannot be taken
    down and made again between two ``train`` calls in a notebook); it is closed at exit.
    """
    import atexit

    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update({**SINGLE_RANK_ENV, "MASTER_PORT": str(free_port())})
        atexit.register(close_process_group)
    deepspeed.init_distributed(verbose=False)
    release_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def shm_allreduce_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's shared-memory workspace (about 69 MB)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    return Path("/dev/shm") / name


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's name for DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    On the CPU accelerator DeepSpeed creates one shared-memory file per rank and never unlinks it
    (``shm.cpp`` has ``shared_close`` but nothing calls it), so every run left ~69 MB per rank in
    ``/dev/shm``: a test suite's worth filled the RAM. The mappings stay valid after the unlink
    (POSIX keeps the memory until the last ``munmap``), so removing the name right after the
    barrier frees it at exit, even when a rank is killed. GPUs (NCCL) have no such buffer: nothing to do.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()  # every rank has opened every other rank's buffer by now (shm_initialize waits for them)
    shm_allreduce_buffer_path(dist.get_rank()).unlink(missing_ok=True)  # absent without DeepSpeed's shm op


def close_process_group() -> None:
    """Leave the process group in step with the other ranks: a process exiting while its communication
    threads still run can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup_for_world(setup: TrainingSetup, world_size: int) -> TrainingSetup:
    """The setup as this run executes it: same micro-batch and accumulation, the ranks that really started."""
    if setup.world_size == world_size:
        return setup
    return setup.replace(gpus_per_node=world_size, num_nodes=1)


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------


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
    zero.Init by hand instead leaves the fused experts uninitialized (see the module docstring).
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


def add_lora(model: torch.nn.Module, spec: LoraSpec, lora_config=None) -> torch.nn.Module:
    """``moekit.lora.apply_lora``, or ``get_peft_model`` with a LoraConfig resolved beforehand.

    Under zero.Init the parameters are partitioned (they look empty until gathered), so moekit
    resolves the targets from the preset or config before building (``peft_config(spec, setup.model)``)
    and passes that config here.
    """
    if lora_config is None:
        from moekit.lora import apply_lora

        return apply_lora(model, spec)
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        return get_peft_model(model, lora_config)


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """The module classes that hold a router and experts (MixtralSparseMoeBlock and its relatives)."""
    from moekit.arch import moe_block_classes as classes_of

    return sorted(classes_of(model), key=lambda c: c.__name__)


def prepare_model(model: torch.nn.Module, setup: TrainingSetup, lora_config=None) -> torch.nn.Module:
    """Activation checkpointing, LoRA and ZeRO-3 leaf modules, in the order they need."""
    model.config.use_cache = False
    if setup.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setup.uses_lora:
        model = add_lora(model, setup.lora, lora_config)
    if setup.zero_stage == 3:
        classes = moe_block_classes(model)
        if classes:
            from deepspeed.utils import set_z3_leaf_modules

            # An expert that gets no tokens would skip its ZeRO-3 hooks and the ranks would wait forever.
            set_z3_leaf_modules(model, classes)
    return model


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def checkpoint_tag(step: int) -> str:
    return f"step{step:06d}"


def latest_checkpoint_step(output_dir: str | Path) -> int | None:
    """The step of the newest checkpoint to resume from: the one ``latest`` names (DeepSpeed writes it
    last), or the newest step folder when ``latest`` is unreadable or names a missing folder; None if none."""
    steps = checkpoint_steps(output_dir)
    return steps[0] if steps else None


def checkpoint_steps(output_dir: str | Path) -> list[int]:
    """Checkpoint steps to try, best first: the one ``latest`` names, then every older step folder."""
    folder = checkpoint_dir(Path(output_dir))
    if not (folder / "latest").is_file():
        return []  # DeepSpeed writes latest after its files: without it no checkpoint was completed
    found = sorted((int(p.name.removeprefix("step")) for p in folder.glob("step*") if p.is_dir()
                    and p.name.removeprefix("step").isdigit()), reverse=True)
    try:
        named = int((folder / "latest").read_text().strip().removeprefix("step"))
    except (OSError, ValueError):
        named = None
    return [named] + [s for s in found if s < named] if named in found else found


def save_checkpoint(engine, setup: TrainingSetup, output_dir: Path, step: int) -> Path:
    """Hugging Face weights (LoRA adapters or the full model), then DeepSpeed's engine state and ``latest``."""
    tag = checkpoint_tag(step)
    folder = checkpoint_dir(output_dir) / tag
    save_hf_weights(engine, setup, folder / "hf")
    engine.save_checkpoint(str(checkpoint_dir(output_dir)), tag=tag, client_state={"step": step},
                           exclude_frozen_parameters=setup.uses_lora)
    return folder


def save_hf_weights(engine, setup: TrainingSetup, folder: Path) -> None:
    """Adapters with peft's save_pretrained, or full 16-bit weights with transformers' (gathered under ZeRO-3)."""
    import torch.distributed as dist

    module = engine.module
    if setup.uses_lora:
        state = {}
        for name, param in module.named_parameters():
            if "lora_" in name:
                with gathered(param) as full:
                    state[name] = full.detach().cpu().clone()
    elif setup.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # DeepSpeed's gather, also used by HF accelerate
    else:
        state = module.state_dict()
    if dist.get_rank() == 0:
        module.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    dist.barrier()


def resume_from(engine, output_dir: Path, setup: TrainingSetup, say: Callable[[str], None] = print) -> int:
    """Load the newest readable checkpoint into the engine; return its step (0 when there is none).

    A checkpoint that fails to load on any rank (a truncated file, ``latest`` naming a missing folder) is
    skipped for the previous one, on every rank together, and the skip is said.
    """
    steps = checkpoint_steps(output_dir)
    for step in steps:
        try:
            path, client_state = engine.load_checkpoint(str(checkpoint_dir(output_dir)), tag=checkpoint_tag(step),
                                                        load_module_strict=not setup.uses_lora)
            loaded = path is not None and int(client_state["step"]) == step
            problem = "DeepSpeed found no checkpoint there"
        except Exception as err:  # torch.load / DeepSpeed raise many kinds on a damaged file
            loaded, problem = False, f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
        if _all_ranks(float(loaded), "min") == 1.0:
            return step
        say(f"checkpoint {checkpoint_tag(step)} cannot be loaded ({problem}); falling back to the previous one")
    if steps:
        raise TrainingError(f"no checkpoint in {checkpoint_dir(output_dir)} can be loaded; use --no-resume to start over "
                            "(the old run is moved aside).")
    return 0


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def memory_now(device: torch.device) -> tuple[int, str]:
    """Peak CUDA memory allocated since the last call on a GPU, resident memory on the CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak), "cuda_max_allocated"
    import psutil

    return int(psutil.Process().memory_info().rss), "rss"


def _all_ranks(value: float, op: str) -> float:
    import torch.distributed as dist

    sign = -1.0 if op == "min" else 1.0  # min(x) = -max(-x): gloo and NCCL both have MAX
    tensor = torch.tensor([sign * value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "mean" else dist.ReduceOp.MAX)
    return sign * float(tensor.item()) / (dist.get_world_size() if op == "mean" else 1)


def read_log(output_dir: str | Path) -> list[dict]:
    """The per-step records of a run's log.jsonl."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop records after the checkpoint we resume from (a run killed between checkpoints wrote them)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _append_json(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON: never write it


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run did: the steps it ran, the loss at each, and the guard's checks."""

    output_dir: Path
    start_step: int
    last_step: int
    losses: dict[int, float] = field(default_factory=dict)
    checks: list[GuardCheck] = field(default_factory=list)
    world_size: int = 1

    @property
    def log_path(self) -> Path:
        return self.output_dir / "log.jsonl"


def training_config(setup: TrainingSetup, lr: float, config: dict | None = None) -> dict:
    """``ds_config(setup)`` (or a given config) plus DeepSpeed's AdamW, validated by DeepSpeed's parser."""
    from moekit.zero import ds_config, optimizer_section, validate_ds_config

    config = dict(config) if config is not None else ds_config(setup)
    config.setdefault("optimizer", optimizer_section(lr))
    return validate_ds_config(config, setup.world_size)


def train(
    setup: TrainingSetup,
    data: str | Path | None = None,
    *,
    steps: int = 20,
    output_dir: str | Path = "runs/moekit",
    save_every: int = 0,
    resume: bool = True,
    seed: int = 0,
    weights: str | Path | None = None,
    lr: float | None = None,
    zero_init: bool | None = None,
    check_frozen: bool = False,
    config: dict | None = None,
    model_hook: Callable[[torch.nn.Module], None] | None = None,
    kill_after_checkpoint: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``steps`` optimizer steps with DeepSpeed as this process's rank; resume from the latest checkpoint.

    data: a local .txt / .jsonl file, or None for the bundled text. weights: a local model folder
    (default: seeded random weights of the preset). save_every: checkpoint every N steps (0: only at
    the end). zero_init: build the model already partitioned (ZeRO-3 only; default on under ZeRO-3).
    check_frozen: also make the guard check that frozen weights did not change (gathers them too).
    config: a DeepSpeed config to use instead of ``ds_config(setup)``. model_hook: called on the
    prepared model before ``deepspeed.initialize`` (for experiments, e.g. freezing a group to see
    the guard fire). kill_after_checkpoint: SIGKILL every rank right after saving that step (a
    resume drill).
    """
    folder = check_train_inputs(setup, data, steps=steps, output_dir=output_dir, save_every=save_every, resume=resume,
                                seed=seed, weights=weights, lr=lr, zero_init=zero_init)
    zero_init = setup.zero_stage == 3 if zero_init is None else zero_init
    check_precision_supported(setup.precision)
    rank, world_size = init_distributed()
    return _train_rank(setup, data, rank, world_size, steps=steps, folder=folder, save_every=save_every,
                       seed=seed, weights=weights, lr=lr, zero_init=zero_init, check_frozen=check_frozen,
                       config=config, model_hook=model_hook, kill_after_checkpoint=kill_after_checkpoint, progress=progress)


def check_train_inputs(setup: TrainingSetup, data: str | Path | None = None, *, steps: int = 20,
                       output_dir: str | Path = "runs/moekit", save_every: int = 0, resume: bool = True, seed: int = 0,
                       weights: str | Path | None = None, lr: float | None = None, zero_init: bool | None = None) -> RunFolder:
    """Every check of ``train``'s inputs, before anything is written or DeepSpeed is imported; the run folder.

    The run arguments (``TrainArgs``), the data file (read once), the weights folder, the run folder
    (``check_run_folder``) and, on the CPU, whether the model can be built in this machine's RAM.
    """
    if not isinstance(setup, TrainingSetup):
        raise TrainingError(f"train takes a TrainingSetup, got {type(setup).__name__}; e.g. train(TrainingSetup(model='tiny')).")
    TrainArgs(steps=steps, save_every=save_every, data=data, weights=weights, lr=lr, seed=seed)  # raises on bad values
    if zero_init and setup.zero_stage != 3:
        raise TrainingError(f"zero_init builds the model partitioned, which only ZeRO-3 does; the setup is ZeRO-{setup.zero_stage}.")
    if data is not None:
        from moekit.data import load_documents

        load_documents(data)  # a missing, non-UTF-8 or malformed file is refused here
    weights_folder(setup, weights)  # raises when the folder is missing
    folder = check_run_folder(output_dir, setup, resume=resume)
    check_fits_this_machine(setup_for_world(setup, int(os.environ.get("WORLD_SIZE", "1"))))
    return folder


def check_fits_this_machine(setup: TrainingSetup) -> None:
    """On the CPU, refuse a run whose model clearly cannot be built in this machine's RAM (before building it).

    Uses ``moekit.profile``'s deliberately rough upper bound, the one ``moekit measure`` refuses with; every
    rank on this machine needs its own copy. On GPUs ``moekit launch`` checks the estimate before starting.
    """
    if torch.cuda.is_available():  # DeepSpeed picks its CUDA accelerator then
        return
    import psutil

    from moekit.profile import _FIT_MARGIN, rough_step_bytes

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", setup.world_size if setup.num_nodes == 1 else 1))
    need = int(rough_step_bytes(setup) * _FIT_MARGIN) * local_ranks
    free = psutil.virtual_memory().available
    if need > free:
        gib = 2**30
        raise TrainingError(
            f"training {setup.describe()} here needs roughly {need / gib:.1f} GiB of RAM for {local_ranks} CPU rank(s) "
            f"but {free / gib:.1f} GiB is available; train a small preset here (--model tiny or small) or run on GPUs "
            "(moekit launch)."
        )


def _train_rank(setup: TrainingSetup, data, rank: int, world_size: int, *, steps: int, folder: RunFolder, save_every: int,
                seed: int, weights, lr: float | None, zero_init: bool, check_frozen: bool, config: dict | None,
                model_hook, kill_after_checkpoint: int | None, progress: bool) -> TrainResult:
    """train() for this rank, once the process group exists and the run folder was checked."""
    import torch.distributed as dist

    output_dir = folder.path
    run_setup = setup_for_world(setup, world_size)
    lr = DEFAULT_LR[setup.method] if lr is None else lr
    ds_config = training_config(run_setup, lr, config)
    weights_path = weights_folder(setup, weights)
    say = print if rank == 0 else (lambda message: None)
    if folder.start_step >= steps:
        say(f"moekit train: {output_dir} is already at step {folder.start_step}: nothing to do "
            f"(ask for more than {folder.start_step} steps to train further).")
        return TrainResult(output_dir, folder.start_step, folder.start_step, world_size=world_size)
    if rank == 0:
        if folder.move_aside_to is not None:
            output_dir.rename(folder.move_aside_to)
            say(f"moekit train: moved the old run in {output_dir} to {folder.move_aside_to}; starting a new run.")
        _write_run_files(output_dir, setup, ds_config, world_size)
    dist.barrier()  # the folder is ready before any rank reads it

    # Resolve LoRA targets before building: under zero.Init the weights look empty, and a meta-device
    # build for the inventory must not happen while transformers sees a ZeRO-3 config.
    wanted = lora_components(run_setup)
    lora_config = _peft_config(run_setup) if zero_init and run_setup.uses_lora else None
    with zero3_build_context(ds_config, zero_init):
        model = prepare_model(build_base_model(run_setup, weights_path, seed), run_setup, lora_config)
        groups = param_groups(model, run_setup)
        check_lora_coverage(groups, wanted)
        if model_hook is not None:
            model_hook(model)
        engine = _initialize(model, ds_config)
        return _run(engine, run_setup, groups, _batches(run_setup, data, weights_path, model.config, seed, world_size),
                    steps=steps, output_dir=output_dir, save_every=save_every, resume=folder.start_step > 0,
                    check_frozen=check_frozen, kill_after_checkpoint=kill_after_checkpoint, progress=progress and rank == 0,
                    say=say)


def _write_run_files(output_dir: Path, setup: TrainingSetup, ds_config: dict, world_size: int) -> None:
    """setup.json and the ds_config.json the run uses; a note when fewer ranks started than the setup says."""
    output_dir.mkdir(parents=True, exist_ok=True)
    save_setup(setup, output_dir / "setup.json")
    (output_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    if setup.world_size != world_size:
        print(
            f"moekit train: the setup describes {setup.world_size} ranks but {world_size} started; keeping "
            f"micro-batch {setup.micro_batch} x accumulation {setup.grad_accum} on {world_size}.",
            file=sys.stderr,
        )


def check_precision_supported(precision: str) -> None:
    """fp16 needs a GPU: DeepSpeed's CPU accelerator refuses it ("Type fp16 is not supported on your device")."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if precision == "fp16" and not accelerator.is_fp16_supported():
        raise TrainingError(
            f"precision='fp16' is not supported by DeepSpeed's {accelerator.device_name()} accelerator here; "
            "use precision='bf16' (or 'fp32') on this machine, fp16 on a GPU."
        )


def _peft_config(setup: TrainingSetup):
    from moekit.lora import peft_config

    return peft_config(setup.lora, setup.model)


def _initialize(model: torch.nn.Module, config: dict):
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("no parameter requires a gradient; check the method and the LoRA targets.")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config)
    return engine


@dataclass
class _Batches:
    """Token rows and the order ranks read them in."""

    data: TokenizedData
    order: BatchOrder

    def get(self, step: int, micro_step: int, rank: int) -> dict[str, torch.Tensor]:
        return self.data.collate(self.order.row_indices(step, micro_step, rank))


def _batches(setup: TrainingSetup, data, folder, model_config, seed: int, world_size: int) -> _Batches:
    from moekit.data import load_documents, tokenize, tokenizer_for

    tokenizer = tokenizer_for(model_config.vocab_size, folder)
    tokenized = tokenize(load_documents(data), tokenizer, setup.seq_len, setup.packing)
    order = BatchOrder(tokenized.num_rows, setup.micro_batch, setup.grad_accum, world_size, seed)
    return _Batches(tokenized, order)


def _run(engine, setup: TrainingSetup, groups: list[ParamGroup], batches: _Batches, *, steps: int, output_dir: Path,
         save_every: int, resume: bool, check_frozen: bool, kill_after_checkpoint: int | None, progress: bool,
         say: Callable[[str], None] = print) -> TrainResult:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank, world_size = dist.get_rank(), dist.get_world_size()
    start = resume_from(engine, output_dir, setup, say) if resume else 0
    if start:
        say(f"moekit train: resuming from step {start} in {output_dir}")
    log_path, guard_path = output_dir / "log.jsonl", output_dir / "guard.jsonl"
    if rank == 0:
        _truncate_log(log_path, start)
        _truncate_log(guard_path, start)
    result = TrainResult(output_dir, start, start, world_size=world_size)
    guard = TrainingGuard(engine.module, groups, check_frozen, engine.optimizer)
    first_check_done, applied_since_check = False, False
    device = engine.device
    saved_step, step = start, start
    try:
        for step in tqdm(range(start, steps), initial=start, total=steps, disable=not progress, desc="moekit train"):
            began = time.perf_counter()
            loss = _optimizer_step(engine, batches, step, rank, setup.grad_accum, device)
            memory_bytes, memory_kind = memory_now(torch.device(device))
            record = {"step": step + 1, "loss": _all_ranks(loss, "mean"), "lr": float(engine.get_lr()[0]),
                      "seconds": round(time.perf_counter() - began, 4), "memory_bytes": int(_all_ranks(memory_bytes, "max")),
                      "memory_kind": memory_kind, "step_applied": bool(engine.was_step_applied())}
            if not math.isfinite(record["loss"]):  # checked before logging: NaN is not JSON
                raise TrainingFailed(_non_finite_loss_message(record["loss"], step + 1, first=step == start))
            result.losses[step + 1] = record["loss"]
            result.last_step = step + 1
            if rank == 0:
                _append_json(log_path, record)
            checkpoint_now = step + 1 == steps or (save_every and (step + 1) % save_every == 0)
            # fp16 skips steps whose gradients overflowed: only a step that was applied can move weights.
            applied_since_check = applied_since_check or record["step_applied"]
            if applied_since_check and (checkpoint_now or not first_check_done):
                check = guard.check(step + 1)
                first_check_done, applied_since_check = True, False
                result.checks.append(check)
                if rank == 0:
                    _append_json(guard_path, check.as_dict())
            if checkpoint_now:
                save_checkpoint(engine, setup, output_dir, step + 1)
                saved_step = step + 1
                if kill_after_checkpoint == step + 1:
                    dist.barrier()
                    os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted at step {step + 1}; rerun the same command to resume from step {saved_step}"
            + ("" if saved_step else " (no checkpoint yet: it starts again; --save-every N saves more often)")
        ) from None
    return result


def _non_finite_loss_message(loss: float, step: int, first: bool) -> str:
    if first:
        return (
            f"the loss is {loss} at step {step}, before this run changed any weight: the model's weights hold NaN, inf "
            "or garbage. A model built inside a hand-opened deepspeed.zero.Init keeps uninitialized expert and router "
            "weights (docs/training.md); let moekit build it (zero_init=True) or load real weights."
        )
    return f"the loss is {loss} at step {step}; lower the learning rate, or use bf16 instead of fp16."


def _optimizer_step(engine, batches: _Batches, step: int, rank: int, grad_accum: int, device) -> float:
    """One optimizer step of grad_accum micro-batches; returns this rank's mean loss."""
    total = 0.0
    for micro_step in range(grad_accum):
        batch = {k: v.to(device) for k, v in batches.get(step, micro_step, rank).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        total += float(loss.detach().float().item())
    return total / grad_accum


# --------------------------------------------------------------------------------------------
# The script form: python -m moekit.train (one rank; run it under deepspeed or torchrun)
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m moekit.train",
        description="One rank of a moekit training run; start it with `deepspeed --num_gpus N --module moekit.train ...` "
        "or `torchrun --nproc_per_node N -m moekit.train ...` (moekit launch prints the exact command).",
    )
    p.add_argument("--setup-json", required=True, help="the TrainingSetup as JSON (moekit.train.save_setup)")
    p.add_argument("--output-dir", default="runs/moekit", help="log, checkpoints and weights go here (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps to reach (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps; 0: only at the end (default: %(default)s)")
    p.add_argument("--data", default=None, help="a local .txt or .jsonl file (default: moekit's bundled text)")
    p.add_argument("--weights", default=None, help="a local Hugging Face model folder (default: seeded random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 LoRA, 2e-5 full)")
    p.add_argument("--ds-config", default=None, help="a DeepSpeed JSON to use instead of the one built from the setup")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if a checkpoint exists")
    p.add_argument(
        "--zero-init", choices=("auto", "on", "off"), default="auto", help="build partitioned under ZeRO-3 (auto: on for ZeRO-3)"
    )
    p.add_argument("--check-frozen", action="store_true", help="the guard also checks that frozen weights did not change")
    p.add_argument("--kill-after-checkpoint", type=int, default=None, help="resume drill: SIGKILL every rank after saving this step")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        setup = load_setup(args.setup_json)
        config = read_ds_config(args.ds_config) if args.ds_config else None
        result = train(
            setup, args.data, steps=args.steps, output_dir=args.output_dir, save_every=args.save_every,
            resume=not args.no_resume, seed=args.seed, weights=args.weights, lr=args.lr,
            zero_init={"auto": None, "on": True, "off": False}[args.zero_init], check_frozen=args.check_frozen,
            config=config, kill_after_checkpoint=args.kill_after_checkpoint, progress=not args.no_progress,
        )
    except Interrupted as err:
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("moekit train: error: interrupted before training started; rerun the same command", file=sys.stderr)
        return 130
    except RunFailure as err:
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 1
    except MoekitError as err:
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 2
    close_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and result.losses:
        print(f"moekit train: steps {result.start_step + 1}-{result.last_step}, loss {result.losses[result.last_step]:.4f}, "
              f"log {result.log_path}")
    return 0


def read_ds_config(path: str | Path) -> dict:
    """A DeepSpeed JSON file, or TrainingError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # missing, unreadable, not UTF-8, not JSON
        raise TrainingError(f"cannot read the DeepSpeed config {path} ({err}); write it with `moekit ds-config --out`.") from None


def exit_now(code: int) -> None:
    """Exit without Python's interpreter teardown, after flushing output.

    Seen on the CPU with 2 ranks: a rank that finished cleanly (process group destroyed) can still
    abort during teardown with "terminate called without an active exception" (a C++ thread
    destroyed while joinable), turning a good run into exit code -6. All files are closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
