"""The real training entry point: ``train(setup)`` runs DeepSpeed on the config ``ds_config(setup)`` gives.

One process is one rank. Under the DeepSpeed launcher (``deepspeed --num_gpus N -m moekit.train
--setup-json setup.json ...``) or torchrun, every rank runs ``main()``; called from Python without a
launcher, ``train`` runs a single rank. On a machine without GPUs DeepSpeed uses its CPU accelerator
and gloo, so the same code trains a tiny model with several CPU processes.

What a run does, in order: build the model (seeded random weights for a preset, or a local weights
folder), apply LoRA, mark MoE blocks as ZeRO-3 leaf modules, enable activation checkpointing when
asked, ``deepspeed.initialize``, then step through batches whose order is fixed by the step counter,
logging loss and memory per step to ``log.jsonl``, saving checkpoints every ``save_every`` steps and
resuming from the latest one. This module keeps the loop; the model is built in ``moekit.build``, the
process group lives in ``moekit.distributed``, the run folder and checkpoints in ``moekit.checkpoints``
and the run options in ``moekit.run_options`` (their names stay importable from here).

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
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.build import (  # noqa: F401 (re-exported)
    add_lora,
    build_base_model,
    moe_block_classes,
    peft_config_for,
    prepare_model,
    weights_folder,
    zero3_build_context,
)
from moekit.checkpoints import (  # noqa: F401 (re-exported: the names callers have always imported from here)
    FIT_ONLY_FIELDS,
    PROGRESS_FILES,
    RUN_FILES,
    RunFolder,
    append_json,
    check_run_folder,
    checkpoint_dir,
    checkpoint_steps,
    checkpoint_tag,
    latest_checkpoint_step,
    load_setup,
    read_log,
    resume_from,
    save_checkpoint,
    save_hf_weights,
    save_setup,
    setup_differences,
    truncate_log,
)
from moekit.data import BatchOrder, TokenizedData
from moekit.distributed import (  # noqa: F401 (re-exported)
    all_ranks,
    close_process_group,
    exit_now,
    init_distributed,
    release_shm_allreduce_buffer,
    shm_allreduce_buffer_path,
)
from moekit.errors import Interrupted, MoekitError, RunFailure, TrainingError
from moekit.guard import (
    GuardCheck,
    ParamGroup,
    TrainingGuard,
    check_lora_coverage,
    lora_components,
    param_groups,
)
from moekit.run_options import DEFAULT_LR, RunOptions, add_run_option_flags  # noqa: F401 (DEFAULT_LR re-exported)
from moekit.training_setup import TrainingSetup
from moekit.units import GiB


class TrainingFailed(TrainingError, RunFailure):
    """The run started and then failed (a non-finite loss); the message says what to try next."""


def setup_for_world(setup: TrainingSetup, world_size: int) -> TrainingSetup:
    """The setup as this run executes it: same micro-batch and accumulation, the ranks that really started."""
    if setup.world_size == world_size:
        return setup
    return setup.replace(gpus_per_node=world_size, num_nodes=1)


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
    options = RunOptions(steps=steps, save_every=save_every, data=data, weights=weights, lr=lr, seed=seed)
    zero_init = setup.zero_stage == 3 if zero_init is None else zero_init
    check_precision_supported(setup.precision)
    rank, world_size = init_distributed()
    return _train_rank(setup, options, rank, world_size, folder=folder, zero_init=zero_init, check_frozen=check_frozen,
                       config=config, model_hook=model_hook, kill_after_checkpoint=kill_after_checkpoint, progress=progress)


def check_train_inputs(setup: TrainingSetup, data: str | Path | None = None, *, steps: int = 20,
                       output_dir: str | Path = "runs/moekit", save_every: int = 0, resume: bool = True, seed: int = 0,
                       weights: str | Path | None = None, lr: float | None = None, zero_init: bool | None = None) -> RunFolder:
    """Every check of ``train``'s inputs, before anything is written or DeepSpeed is imported; the run folder.

    The run options (``RunOptions``), the data file (read once), the weights folder, the run folder
    (``check_run_folder``) and, on the CPU, whether the model can be built in this machine's RAM.
    """
    if not isinstance(setup, TrainingSetup):
        raise TrainingError(f"train takes a TrainingSetup, got {type(setup).__name__}; e.g. train(TrainingSetup(model='tiny')).")
    RunOptions(steps=steps, save_every=save_every, data=data, weights=weights, lr=lr, seed=seed)  # raises on bad values
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

    Uses the estimate of one rank's step without CUDA's overhead (``moekit.profile.step_bytes_here``, what
    ``moekit measure`` refuses with); every rank on this machine needs its own copy. On GPUs ``moekit launch``
    checks the estimate before starting.
    """
    if torch.cuda.is_available():  # DeepSpeed picks its CUDA accelerator then
        return
    import psutil

    from moekit.profile import _FIT_MARGIN, step_bytes_here

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", setup.world_size if setup.num_nodes == 1 else 1))
    need = int(step_bytes_here(setup) * _FIT_MARGIN) * local_ranks
    free = psutil.virtual_memory().available
    if need > free:
        raise TrainingError(
            f"training {setup.describe()} here needs roughly {need / GiB:.1f} GiB of RAM for {local_ranks} CPU rank(s) "
            f"but {free / GiB:.1f} GiB is available; train a small preset here (--model tiny or small) or run on GPUs "
            "(moekit launch)."
        )


def _train_rank(setup: TrainingSetup, options: RunOptions, rank: int, world_size: int, *, folder: RunFolder,
                zero_init: bool, check_frozen: bool, config: dict | None, model_hook, kill_after_checkpoint: int | None,
                progress: bool) -> TrainResult:
    """train() for this rank, once the process group exists and the run folder was checked."""
    import torch.distributed as dist

    output_dir, steps, seed = folder.path, options.steps, options.seed
    run_setup = setup_for_world(setup, world_size)
    ds_config = training_config(run_setup, options.learning_rate(setup.method), config)
    weights_path = weights_folder(setup, options.weights)
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
    lora_config = peft_config_for(run_setup) if zero_init and run_setup.uses_lora else None
    with zero3_build_context(ds_config, zero_init):
        model = prepare_model(build_base_model(run_setup, weights_path, seed), run_setup, lora_config)
        groups = param_groups(model, run_setup)
        check_lora_coverage(groups, wanted)
        if model_hook is not None:
            model_hook(model)
        engine = _initialize(model, ds_config)
        return _run(engine, run_setup, groups, _batches(run_setup, options.data, weights_path, model.config, seed, world_size),
                    steps=steps, output_dir=output_dir, save_every=options.save_every, resume=folder.start_step > 0,
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
        truncate_log(log_path, start)
        truncate_log(guard_path, start)
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
            record = {"step": step + 1, "loss": all_ranks(loss, "mean"), "lr": float(engine.get_lr()[0]),
                      "seconds": round(time.perf_counter() - began, 4), "memory_bytes": int(all_ranks(memory_bytes, "max")),
                      "memory_kind": memory_kind, "step_applied": bool(engine.was_step_applied())}
            if not math.isfinite(record["loss"]):  # checked before logging: NaN is not JSON
                raise TrainingFailed(_non_finite_loss_message(record["loss"], step + 1, first=step == start))
            result.losses[step + 1] = record["loss"]
            result.last_step = step + 1
            if rank == 0:
                append_json(log_path, record)
            checkpoint_now = step + 1 == steps or (save_every and (step + 1) % save_every == 0)
            # fp16 skips steps whose gradients overflowed: only a step that was applied can move weights.
            applied_since_check = applied_since_check or record["step_applied"]
            if applied_since_check and (checkpoint_now or not first_check_done):
                check = guard.check(step + 1)
                first_check_done, applied_since_check = True, False
                result.checks.append(check)
                if rank == 0:
                    append_json(guard_path, check.as_dict())
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
    p.add_argument("--setup-json", required=True, help="the TrainingSetup as JSON (moekit.checkpoints.save_setup)")
    p.add_argument("--output-dir", default="runs/moekit", help="log, checkpoints and weights go here (default: %(default)s)")
    add_run_option_flags(p)
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
        options = RunOptions.from_args(args)
        result = train(
            setup, options.data, steps=options.steps, output_dir=args.output_dir, save_every=options.save_every,
            resume=not args.no_resume, seed=options.seed, weights=options.weights, lr=options.lr,
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


if __name__ == "__main__":
    exit_now(main())
