"""A run's folder and checkpoints: the setup as a file, one run per folder (never two mixed), saving
a checkpoint, and resuming from the newest one that loads (falling back to an older one).

Checkpoints are DeepSpeed's own (``engine.save_checkpoint``, which writes ``latest`` last) plus the
Hugging Face weights (LoRA adapters or the full model) in ``checkpoints/stepNNNNNN/hf``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.errors import TrainingError
from moekit.training_setup import TrainingSetup

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
        raise TrainingError(f"setup file {path} does not exist; write one with moekit.checkpoints.save_setup(setup, path).")
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

    from moekit.guard import gathered

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
    from moekit.distributed import all_ranks

    steps = checkpoint_steps(output_dir)
    for step in steps:
        try:
            path, client_state = engine.load_checkpoint(str(checkpoint_dir(output_dir)), tag=checkpoint_tag(step),
                                                        load_module_strict=not setup.uses_lora)
            loaded = path is not None and int(client_state["step"]) == step
            problem = "DeepSpeed found no checkpoint there"
        except Exception as err:  # torch.load / DeepSpeed raise many kinds on a damaged file
            loaded, problem = False, f"{type(err).__name__}: {' '.join(str(err).split())[:120]}"
        if all_ranks(float(loaded), "min") == 1.0:
            return step
        say(f"checkpoint {checkpoint_tag(step)} cannot be loaded ({problem}); falling back to the previous one")
    if steps:
        raise TrainingError(f"no checkpoint in {checkpoint_dir(output_dir)} can be loaded; use --no-resume to start over "
                            "(the old run is moved aside).")
    return 0


# --------------------------------------------------------------------------------------------
# The run's log: one JSON line per step (log.jsonl) and per guard check (guard.jsonl)
# --------------------------------------------------------------------------------------------


def read_log(output_dir: str | Path) -> list[dict]:
    """The per-step records of a run's log.jsonl."""
    path = Path(output_dir) / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, last_step: int) -> None:
    """Drop records after the checkpoint we resume from (a run killed between checkpoints wrote them)."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def append_json(path: Path, record: dict) -> None:
    """One JSON line appended to a run's log (log.jsonl, guard.jsonl)."""
    with path.open("a") as handle:
        handle.write(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON: never write it
