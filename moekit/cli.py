"""The ``moekit`` command line: one subcommand per library call.

Each subcommand has an ``_add_<name>(subparsers)`` function that declares its flags and a
``_run_<name>(args)`` function that calls the library and prints. Every failure prints one line on
stderr (JSON with ``--json``), without a traceback: bad input (``MoekitError``, a bad flag, a file that
cannot be read or written) exits 2, a run that fails after starting (``RunFailure``) exits 1, Ctrl-C 130.

Only the modules a command needs are imported, inside its ``_run_<name>``: ``--help``, ``estimate``,
``plan`` and ``models`` never import DeepSpeed, and torch/transformers only when a model is built
(``moekit.cache`` keeps the facts the estimate needs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from moekit.errors import Interrupted, MoekitError, RunFailure
from moekit.run_options import RunOptions, add_run_option_flags, finite_float
from moekit.training_setup import (
    ATTENTIONS,
    LOAD_PATHS,
    LOSS_IMPLS,
    METHODS,
    OFFLOADS,
    OPTIMIZERS,
    PRECISIONS,
    LoraSpec,
    TrainingSetup,
)
from moekit.units import GiB
from moekit.zero_knobs import MEANING, deepspeed_defaults

# --------------------------------------------------------------------------------------------
# Flag types: bad values are one-line usage errors
# --------------------------------------------------------------------------------------------




def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Shared flags: the training setup
# --------------------------------------------------------------------------------------------


def add_lora_flags(group: argparse._ArgumentGroup | argparse.ArgumentParser) -> None:
    """--model and the LoRA spec's flags (rank, alpha, dropout, targets)."""
    d = TrainingSetup()
    # The LoRA flags default to None so that giving one with --method full can be refused.
    group.add_argument("--model", default=d.model, help="preset name or local HF folder / config.json (default: %(default)s)")
    group.add_argument("--r", type=int, default=None, help=f"LoRA rank (default: {d.lora.r})")
    group.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2*r)")
    group.add_argument("--dropout", type=finite_float, default=None, help=f"LoRA dropout (default: {d.lora.dropout})")
    group.add_argument(
        "--targets",
        default=None,
        help="comma-separated LoRA targets: groups (attention, experts, router, shared_experts, "
        f"all-linear) or module/parameter names (q_proj, gate_up_proj, w1...) (default: {','.join(d.lora.targets)})",
    )


LORA_FLAGS = {"r": "--r", "alpha": "--alpha", "dropout": "--dropout", "targets": "--targets"}


def lora_spec_from_args(args: argparse.Namespace) -> LoraSpec:
    """The LoraSpec the flags describe (alpha defaults to 2*r); refuses LoRA flags on a full fine-tune."""
    given = [flag for name, flag in LORA_FLAGS.items() if getattr(args, name) is not None]
    if getattr(args, "no_adapter_upcast", False):
        given.append("--no-adapter-upcast")
    if given and getattr(args, "method", "lora") == "full":
        raise MoekitError(f"{', '.join(given)} set LoRA, which --method full does not use; drop them or use --method lora.")
    d = LoraSpec()
    r = d.r if args.r is None else args.r
    alpha = args.alpha if args.alpha is not None else 2 * r
    dropout = d.dropout if args.dropout is None else args.dropout
    targets = d.targets if args.targets is None else args.targets
    return LoraSpec(r=r, alpha=alpha, dropout=dropout, targets=targets)


def add_setup_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a TrainingSetup; defaults are the article's baseline run."""
    d = TrainingSetup()
    g = parser.add_argument_group("training setup")
    add_lora_flags(g)
    g.add_argument("--method", choices=METHODS, default=d.method, help="full fine-tuning, LoRA or QLoRA (default: %(default)s)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="bf16/fp16 mixed precision or fp32 (default: %(default)s)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=d.zero_stage, help="DeepSpeed ZeRO stage (default: %(default)s)")
    g.add_argument("--offload", choices=OFFLOADS, default=d.offload, help="what ZeRO offloads (default: %(default)s)")
    g.add_argument(
        "--offload-device", choices=("cpu", "nvme"), default=d.offload_device, help="where --offload goes (default: %(default)s)"
    )
    g.add_argument("--nvme-path", default=None, help="folder on a fast local disk, for --offload-device nvme")
    g.add_argument("--gpus", type=int, default=d.gpus_per_node, help="GPUs per node (default: %(default)s)")
    g.add_argument("--nodes", type=int, default=d.num_nodes, help="number of nodes (default: %(default)s)")
    g.add_argument("--gpu-mem", type=finite_float, default=d.gpu_memory_gb,
                   help="memory per GPU in GB as sold, e.g. 40 (default: %(default)s)")
    g.add_argument("--host-mem", type=finite_float, default=None, help="host RAM per node in GB, checked for offload")
    g.add_argument("--seq", type=int, default=d.seq_len, help="sequence length in tokens (default: %(default)s)")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per GPU per step (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps (default: %(default)s)")
    g.add_argument("--checkpointing", action="store_true", help="recompute activations in backward (activation checkpointing)")
    g.add_argument("--no-packing", action="store_true", help="pad each batch instead of packing sequences to --seq")
    g.add_argument("--attn", choices=ATTENTIONS, default=d.attn_implementation, help="attention implementation (default: %(default)s)")
    g.add_argument("--router-aux-loss", choices=("on", "off"), default=None,
                   help="transformers' router load-balancing loss (output_router_logits) (default: the model's config)")
    g.add_argument("--load-path", choices=LOAD_PATHS, default=d.load_path,
                   help="how the weights are loaded: auto follows method, ZeRO stage and checkpoint (default: %(default)s)")
    g.add_argument("--loss-impl", choices=LOSS_IMPLS, default=d.loss_impl,
                   help="hf: transformers' fp32 logits; chunked/fused linear-cross-entropy (default: %(default)s)")
    g.add_argument("--expandable-segments", action="store_true",
                   help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: a smaller allocator reserve (CUDA)")
    g.add_argument("--no-adapter-upcast", action="store_true",
                   help="keep LoRA adapters in the working dtype (peft's autocast_adapter_dtype=False); under ZeRO-3's "
                   "zero.Init peft's fp32 adapters otherwise stay fp32, and each adapted Linear saves an fp32 input")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="adamw, bitsandbytes' adamw_8bit or paged_adamw (default: %(default)s)")
    reduce_default = deepspeed_defaults()["reduce_bucket_size"]
    z = parser.add_argument_group(f"DeepSpeed ZeRO sizes, in elements (default: DeepSpeed's own, e.g. "
                                  f"reduce_bucket_size {reduce_default:,})")
    for knob, meaning in MEANING.items():
        z.add_argument(f"--{knob.replace('_', '-')}", type=elements, default=None, metavar="N", help=meaning)


def elements(text: str) -> int:
    """A count of elements, written 50000000, 50_000_000 or 5e7."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of elements such as 5e7, got '{text}'") from None
    if not value.is_integer() or value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of elements >= 0, got '{text}'")
    return int(value)


def refuse_estimate_only_knobs(setup: TrainingSetup, command: str) -> None:
    """The field-trap knobs only the estimate models (moekit.traps): a real or simulated step runs AdamW,
    transformers' loss and the model's own router-loss setting, so asking for others would mix two runs."""
    d = TrainingSetup()
    given = [flag for flag, value, default in (("--optimizer", setup.optimizer, d.optimizer),
                                               ("--loss-impl", setup.loss_impl, d.loss_impl),
                                               ("--router-aux-loss", setup.router_aux_loss, None)) if value != default]
    if given:
        raise MoekitError(f"{', '.join(given)} are modelled by `moekit estimate`/`plan` only; `moekit {command}` runs "
                          "AdamW, transformers' loss and the config's router loss: drop them.")


def add_ds_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ds-config", metavar="FILE", default=None,
        help="read precision, ZeRO stage, offload, batch sizes and bucket sizes from your DeepSpeed JSON; its "
        "\"auto\" values are filled from the other flags as the Hugging Face Trainer fills them (a flag set "
        "away from its default must agree with the file)")


#: The flags a DeepSpeed config decides, by setup field (a flag given beside --ds-config must agree with it).
DS_CONFIG_FLAGS = {"precision": "--precision", "zero_stage": "--zero", "offload": "--offload",
                   "micro_batch": "--micro-batch", "grad_accum": "--grad-accum",
                   **{knob: f"--{knob.replace('_', '-')}" for knob in MEANING}}


def setup_from_args(args: argparse.Namespace) -> TrainingSetup:
    """Build (and so validate) the TrainingSetup the flags describe, read through --ds-config when given."""
    setup = _setup_from_flags(args)
    if getattr(args, "ds_config", None) is None:
        return setup
    from moekit.ds_read import setup_from_ds_config

    read = setup_from_ds_config(args.ds_config, setup)
    default = TrainingSetup()
    for name, flag in DS_CONFIG_FLAGS.items():
        given, in_file = getattr(setup, name), getattr(read, name)
        if given != getattr(default, name) and in_file != given:
            raise MoekitError(f"{flag} {given} contradicts {args.ds_config}, which gives {name} = {in_file}: "
                              "drop the flag or change the file.")
    return read


def _setup_from_flags(args: argparse.Namespace) -> TrainingSetup:
    return TrainingSetup(
        model=args.model,
        method=args.method,
        lora=lora_spec_from_args(args),
        precision=args.precision,
        zero_stage=args.zero,
        offload=args.offload,
        offload_device=args.offload_device,
        nvme_path=args.nvme_path,
        gpus_per_node=args.gpus,
        num_nodes=args.nodes,
        gpu_memory_gb=args.gpu_mem,
        host_memory_gb=args.host_mem,
        seq_len=args.seq,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        activation_checkpointing=args.checkpointing,
        packing=not args.no_packing,
        router_aux_loss=None if args.router_aux_loss is None else args.router_aux_loss == "on",
        load_path=args.load_path,
        loss_impl=args.loss_impl,
        optimizer=args.optimizer,
        expandable_segments=args.expandable_segments,
        autocast_adapter_dtype=not args.no_adapter_upcast,
        attn_implementation=args.attn,
        **{knob: getattr(args, knob) for knob in MEANING},
    )


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


# --------------------------------------------------------------------------------------------
# moekit models
# --------------------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the bundled model presets with exact parameter counts, and the model families",
        description="List the bundled model presets: total parameters, parameters active per token "
        "(only the top-k routed experts count), experts and top-k. Or census one model with --model.",
    )
    p.add_argument("--model", help="census one preset or local folder, by component")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _census_row(model: str) -> dict:
    """``parameter_census(model).as_dict()``, kept on disk by moekit.cache (so `moekit models` needs no torch)."""
    from moekit.cache import disk_cached

    @disk_cached("census", dict)
    def census(name: str) -> dict:
        from moekit.models import parameter_census

        return parameter_census(name).as_dict()

    return census(model)


def _run_models(args: argparse.Namespace) -> None:
    from moekit.catalog import list_presets, preset_description

    names = [args.model] if args.model else list_presets()
    censuses = [_census_row(name) for name in names]
    if args.json:
        print_json(censuses)
        return
    print(f"{'name':<20}{'params':>18}{'active/token':>18}{'experts':>9}{'top-k':>7}  description")
    for census in censuses:
        description = preset_description(census["name"]) if not args.model else ""
        print(
            f"{census['name']:<20}{census['num_params']:>18,}{census['num_active_params']:>18,}"
            f"{census['num_experts']:>9}{census['experts_per_token']:>7}  {description}"
        )
    if not args.model:
        from moekit.estimate import ANALYTIC_FAMILIES

        print(f"\nfamilies with checked activation formulas: {', '.join(ANALYTIC_FAMILIES)}.")
        print("any other decoder-only model transformers builds (phimoe, granitemoe, hunyuan_v1_moe, llama4_text, "
              "...): --model a folder with its config.json; its activations are calibrated by a 2-layer "
              "fake-tensor probe (cached).")
    if args.model:
        print("\nby component:")
        for component, count in censuses[0]["num_params_by_component"].items():
            print(f"  {component:<16}{count:>18,}")


# --------------------------------------------------------------------------------------------
# moekit estimate
# --------------------------------------------------------------------------------------------


def _add_estimate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="predict per-GPU memory of a training setup, instantly",
        description="Predict the per-GPU and per-host memory of one training step: model states as DeepSpeed "
        "keeps them, activations, temporaries, communication buffers and overhead, and whether it fits. "
        "Defaults are the article's run (Mixtral 8x7B LoRA on 8x A100-40GB, ZeRO-2).",
    )
    add_setup_flags(p)
    add_ds_config_flag(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_estimate)


def _run_estimate(args: argparse.Namespace) -> None:
    from moekit.estimate import estimate

    setup = setup_from_args(args)
    breakdown = estimate(setup)
    if args.json:
        print_json(breakdown.as_dict())
        return
    print(setup.describe())
    print(breakdown.table())
    if not breakdown.fits:
        from moekit.plan import first_advice

        print(f"\n{first_advice(breakdown)} (see `moekit plan`).")


# --------------------------------------------------------------------------------------------
# moekit lora
# --------------------------------------------------------------------------------------------


def _add_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora",
        help="what a LoRA spec targets on a model, and its exact trainable-parameter census",
        description="Resolve LoRA targets (groups such as attention/experts, raw names, or the article's "
        "w1/w2/w3) against the model's transformers-5 layout, and count the adapter parameters per group "
        "exactly as peft would, from shapes alone.",
    )
    add_lora_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_lora)


def _run_lora(args: argparse.Namespace) -> None:
    from moekit.lora import lora_census, resolve_targets

    spec = lora_spec_from_args(args)
    census = lora_census(args.model, spec)
    if args.json:
        print_json(census.as_dict())
        return
    resolved = resolve_targets(spec, args.model)
    print(f"LoRA r={spec.r} alpha={spec.alpha} on {args.model}, targets: {', '.join(spec.targets)}")
    print(f"{'group':<16}{'trainable':>16}  tensors")
    for group, count in census.by_group.items():
        print(f"{group:<16}{count:>16,}  {', '.join(resolved.groups[group])}")
    print(
        f"{'total':<16}{census.num_trainable_params:>16,}  of {census.num_total_params:,} parameters "
        f"({100 * census.fraction:.3f}% trainable)"
    )
    print(f"\npeft: target_modules={list(resolved.target_modules)} target_parameters={list(resolved.target_parameters)}")
    for note in census.notes:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------
# moekit monitor
# --------------------------------------------------------------------------------------------


def _add_monitor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "monitor",
        help="print every GPU's memory in use, live, until Ctrl-C",
        description="Print one line per poll with every GPU's used/total memory (NVIDIA's management library) "
        "and its peak so far. On a machine without GPUs: the resident memory of the processes given with --pid "
        "(e.g. the ranks of a deepspeed run), or else the host's RAM in use.",
    )
    p.add_argument("--interval", type=finite_float, default=0.5, help="seconds between polls (default: %(default)s)")
    p.add_argument("--pid", type=int, nargs="+", default=None, help="processes to watch when there is no GPU")
    p.add_argument("--count", type=int, default=None, help="stop after this many polls (default: until Ctrl-C)")
    p.add_argument(
        "--source",
        choices=("auto", "gpu", "process", "host"),
        default="auto",
        help="what to watch; auto: GPUs if any, else --pid processes, else the host (default: %(default)s)",
    )
    p.set_defaults(run=_run_monitor)


def _run_monitor(args: argparse.Namespace) -> None:
    from moekit.monitor import MonitorError, open_source, poll_rounds
    from moekit.monitor import format_line as format_monitor_line

    if args.interval <= 0:
        raise MonitorError(f"--interval must be positive, got {args.interval}.")
    if args.count is not None and args.count <= 0:
        raise MonitorError(f"--count must be a positive number of polls, got {args.count}.")
    source = open_source(args.source, args.pid, fallback="process" if args.pid else "host")
    peaks: dict[str, int] = {}
    try:
        for samples in poll_rounds(source, args.interval, args.count):
            for sample in samples:
                peaks[sample.label] = max(peaks.get(sample.label, 0), sample.used_bytes)
            print(format_monitor_line(samples, peaks), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        source.close()


# --------------------------------------------------------------------------------------------
# moekit plan
# --------------------------------------------------------------------------------------------


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from moekit.plan import ARTICLE_ORDER

    p = sub.add_parser(
        "plan",
        help="find the setups that fit, fastest first, and the ladder of mitigations from your setup",
        description="Search the knobs (method, LoRA rank/targets, ZeRO stage, offload, checkpointing, micro-batch "
        "with the gradient accumulation that keeps the global batch, and shorter sequences if --min-seq allows) "
        "for setups that fit the GPUs, ranked by a documented step-time model; then apply one mitigation at a "
        "time to the setup given by the flags until it fits.",
    )
    add_setup_flags(p)
    add_ds_config_flag(p)
    g = p.add_argument_group("constraints")
    g.add_argument("--min-seq", type=int, default=None, help="allow sequences down to this length (default: keep --seq)")
    g.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step to keep (default: from the flags)")
    g.add_argument("--methods", default="lora,full", help="methods the search may use (default: %(default)s)")
    g.add_argument("--ranks", default=None, help="LoRA ranks the search may use, e.g. 8,16,64 (default: keep --r)")
    g.add_argument("--no-offload", action="store_true", help="do not offload anything to CPU RAM (search and ladder)")
    g.add_argument("--order", default=None, help=f"ladder order, comma-separated (default: the article's, {','.join(ARTICLE_ORDER)})")
    g.add_argument("--top", type=positive_int, default=5, help="how many fitting setups to print (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--export", nargs=2, action="append", metavar=("KIND", "PATH"), default=[],
        help="write the best setup that fits for where you train: 'hf DIR' (TrainingArguments and SFTConfig JSON, "
        "DeepSpeed config, LoraConfig) or 'accelerate FILE' (accelerate config YAML + DeepSpeed config); repeatable",
    )
    p.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    from moekit.plan import (
        ARTICLE_ORDER,
        OFFLOAD_MITIGATIONS,
        RANKING,
        as_json,
        constraints_from_setup,
        ladder,
        plan,
        trap_rungs,
    )

    setup = setup_from_args(args)
    unknown = sorted({kind for kind, _ in args.export} - {"hf", "accelerate"})
    if unknown:
        raise MoekitError(f"unknown --export kind {', '.join(unknown)}; use 'hf DIR' or 'accelerate FILE'.")
    order = list(ARTICLE_ORDER) if args.order is None else [name.strip() for name in args.order.split(",") if name.strip()]
    overrides = {"min_seq_len": args.min_seq, "methods": tuple(m.strip() for m in args.methods.split(",") if m.strip())}
    if args.global_batch is not None:
        overrides["global_batch"] = args.global_batch
    if args.ranks is not None:
        overrides["lora_ranks"] = tuple(_whole_numbers("--ranks", args.ranks))
    if args.no_offload:
        if setup.offload != "none":
            raise MoekitError(f"--offload {setup.offload} and --no-offload contradict each other; drop one of them.")
        asked = [name for name in order if name in OFFLOAD_MITIGATIONS]
        if args.order is not None and asked:
            raise MoekitError(f"--order names {', '.join(asked)}, which --no-offload forbids; drop them or --no-offload.")
        overrides["offloads"] = ("none",)
        order = [name for name in order if name not in OFFLOAD_MITIGATIONS]
    result = plan(constraints_from_setup(setup, **overrides), top=args.top)
    rungs = ladder(setup, order, min_seq_len=args.min_seq)
    traps = trap_rungs(rungs[-1].setup)
    exported = _export_plan(result, args.export)
    if args.json:
        print_json(as_json(result, rungs, traps))
        if exported:
            print("\n".join(exported), file=sys.stderr)
        return
    print(result.verdict())
    print(f"ranking: {RANKING}")
    if result.fits:
        print(f"\n{'best setups that fit':<100}{'rel. s':>8}{'GiB/GPU':>9}")
        for c in result.fits:
            print(f"{c.setup.describe():<100}{c.time.total_s:>8.1f}{c.breakdown.total_bytes / GiB:>9.1f}")
    print(f"\n{'ladder from your setup':<20}{'GiB/GPU':>9}{'saved':>9}  fits  change")
    for rung in rungs:
        print(
            f"{rung.change:<20}{rung.breakdown.total_bytes / GiB:>9.1f}{rung.saved_bytes / GiB:>9.1f}"
            f"  {'yes ' if rung.fits else 'no  '}  {rung.description}"
        )
    if traps:
        print(f"\n{'field traps (each alone, from the last rung)':<44}{'GiB/GPU':>9}{'saved':>9}  change")
        for rung in traps:
            print(f"{rung.change:<44}{rung.breakdown.total_bytes / GiB:>9.1f}{rung.saved_bytes / GiB:>9.2f}"
                  f"  {rung.description}")
    for line in exported:
        print(line)


def _export_plan(result, exports: list[list[str]]) -> list[str]:
    """Write the best fitting setup as each ``--export KIND PATH`` asks; one line per file written."""
    if not exports:
        return []
    if result.best is None:
        raise MoekitError(f"nothing to export: {result.verdict()}")
    from moekit.export import export_accelerate, export_hf

    setup = result.best.setup
    lines = [f"\nexported: {setup.describe()}"]
    for kind, path in exports:
        files = export_hf(setup, path) if kind == "hf" else export_accelerate(setup, path)
        lines += [f"  {name:<14}{file}" for name, file in files.items()]
    return lines


def _whole_numbers(flag: str, text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MoekitError(f"{flag} takes comma-separated whole numbers, e.g. 8,16,64; got '{text}'.") from None
    if not values or min(values) <= 0:
        raise MoekitError(f"{flag} takes positive whole numbers, e.g. 8,16,64; got '{text}'.")
    return values


# --------------------------------------------------------------------------------------------
# moekit simulate / moekit measure
# --------------------------------------------------------------------------------------------


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run one full-size training step on fake tensors and report its memory",
        description="Run one training step of the setup at full size under PyTorch's FakeTensorMode with MemTracker "
        "(no memory is allocated; Mixtral 8x7B takes about a minute on a laptop CPU), arranged as one DeepSpeed "
        "rank holds it, and print memory by category.",
    )
    add_setup_flags(p)
    p.add_argument("--layers", type=int, default=None, help="simulate the model truncated to this many decoder layers")
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="simulate 1 and 2 layers and extrapolate to the full depth (seconds; exact when layers are identical)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_simulate)


def _run_simulate(args: argparse.Namespace) -> None:
    from moekit.simulate import simulate, simulate_per_layer

    setup = setup_from_args(args)
    refuse_estimate_only_knobs(setup, "simulate")
    if args.per_layer and args.layers is not None:
        raise MoekitError("--per-layer extrapolates to the full depth; drop --layers (or drop --per-layer).")
    if args.per_layer:
        breakdown = simulate_per_layer(setup, progress=not args.no_progress)
    else:
        breakdown = simulate(setup, num_layers=args.layers, progress=not args.no_progress)
    if args.json:
        print_json(breakdown.as_dict())
        return
    print(setup.describe() + (f" ({args.layers} layers)" if args.layers else ""))
    print(breakdown.table())


def _add_measure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measure",
        help="run one real training step on this machine (CPU or CUDA) and report its memory",
        description="Run one real training step of the setup (the same step `moekit simulate` runs on fake tensors) "
        "and print memory by category; on CUDA also the allocator's peaks. Refuses setups that cannot fit this "
        "machine: use --model tiny/small or --layers 1.",
    )
    add_setup_flags(p)
    p.add_argument("--layers", type=int, default=None, help="measure the model truncated to this many decoder layers")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda if available)")
    p.add_argument("--snapshot", default=None, help="CUDA: write an allocator snapshot here (open it in pytorch.org/memory_viz)")
    p.add_argument(
        "--engine", choices=("harness", "deepspeed"), default="harness",
        help="harness: moekit's one-process step (per category, --layers, --snapshot); deepspeed: the real DeepSpeed "
        "engine on --gpus ranks (CPU processes here), each rank's peak per phase beside the estimate (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=2, help="--engine deepspeed: optimizer steps to run (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_measure)


def _run_measure(args: argparse.Namespace) -> None:
    from moekit.profile import measure_step

    setup = setup_from_args(args)
    refuse_estimate_only_knobs(setup, "measure")
    if args.engine == "deepspeed":
        _run_measure_engine(setup, args)
        return
    result = measure_step(setup, num_layers=args.layers, device=args.device, snapshot_path=args.snapshot)
    breakdown = result.breakdown
    if args.json:
        data = breakdown.as_dict()
        data["saved_for_backward_bytes"] = result.saved_for_backward_bytes
        data["phases"] = result.phases
        if result.cuda:
            data["cuda"] = result.cuda
        print_json(data)
        return
    print(f"{setup.describe()} measured on {result.device}" + (f" ({args.layers} layers)" if args.layers else ""))
    print(breakdown.table())
    print(f"{'saved for backward':<18}{result.saved_for_backward_bytes / GiB:>14.2f}")
    if result.snapshot_path is not None:
        print(f"allocator snapshot: {result.snapshot_path} (drop it on https://pytorch.org/memory_viz)")


def _run_measure_engine(setup, args: argparse.Namespace) -> None:
    from moekit.measure_engine import measure_engine

    if args.layers is not None or args.snapshot is not None or args.device is not None:
        raise MoekitError("--engine deepspeed runs the whole model on every rank's own device; drop --layers, --snapshot "
                          "and --device (or use --engine harness).")
    import_deepspeed_logging_to_stderr()  # measure_engine asks DeepSpeed's accelerator: --json stays pure JSON
    result = measure_engine(setup, steps=args.steps, progress=not args.json)
    if args.json:
        print_json({"ranks": [{"rank": r.rank, "phase_peak_bytes": r.phase_peak_bytes, "cuda": r.cuda,
                               **r.breakdown.as_dict()} for r in result.ranks],
                    "estimate": result.estimate.as_dict(), "estimate_compared_bytes": result.estimate_bytes,
                    "errors": [result.error(r.rank) for r in result.ranks]})
        return
    print(result.table())


# --------------------------------------------------------------------------------------------
# moekit ds-config / moekit train / moekit launch
# --------------------------------------------------------------------------------------------


def _add_ds_config(sub: argparse._SubParsersAction) -> None:
    from moekit.zero import PRESETS

    p = sub.add_parser(
        "ds-config",
        help="print the DeepSpeed config for a setup (validated by DeepSpeed's own parser)",
        description="Print the DeepSpeed JSON for the setup the flags describe: ZeRO stage and offload, fp16 (dynamic "
        "loss scaling) or bf16, micro-batch / accumulation / global batch for the world size, clipping, buckets. "
        "--preset gives one of XTuner's five presets with its 'auto' values resolved (its stage and offload are used).",
    )
    add_setup_flags(p)
    p.add_argument("--preset", choices=tuple(PRESETS), default=None, help="one of XTuner's DeepSpeed presets")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step; sets the accumulation")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.set_defaults(run=_run_ds_config)


def _run_ds_config(args: argparse.Namespace) -> None:
    from pathlib import Path

    from moekit.zero import setup_for_preset, validated_ds_config

    setup = setup_from_args(args)
    if args.preset:
        setup = setup_for_preset(setup, args.preset)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise MoekitError(f"--out {out} is a folder; give a file name such as {out / 'ds_config.json'}.")
    if out is not None and not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        raise MoekitError(f"cannot write --out {out}: {out.parent} is not a folder you may write to; choose a writable path.")
    import_deepspeed_logging_to_stderr()
    config = validated_ds_config(setup, args.preset, global_batch=args.global_batch)
    if out is not None:
        try:
            out.write_text(json.dumps(config, indent=2) + "\n")
        except OSError as err:
            raise MoekitError(f"cannot write --out {out}: {err.strerror}; choose a writable path.") from None
    print_json(config)


def _add_run_flags(parser: argparse.ArgumentParser, output_flag: str) -> None:
    g = parser.add_argument_group("run")
    g.add_argument(output_flag, default="runs/moekit", help="setup, config, log and checkpoints go here (default: %(default)s)")
    add_run_option_flags(g)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train here, as one DeepSpeed rank (use `moekit launch` for several processes or GPUs)",
        description="Train the setup with DeepSpeed in this process (one rank): build the model, apply LoRA, train, "
        "log loss and memory per step to log.jsonl, checkpoint, resume from the latest checkpoint, and stop with an "
        "error if a group of weights meant to train does not move.",
    )
    add_setup_flags(p)
    _add_run_flags(p, "--output-dir")
    p.add_argument("--no-resume", action="store_true",
                   help="start a new run at step 0; an old run in the folder is moved aside to <folder>-old-<time>")
    p.add_argument("--check-frozen", action="store_true", help="also check that frozen weights did not change")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from moekit.train import check_train_inputs, train

    setup = setup_from_args(args)
    refuse_estimate_only_knobs(setup, "train")
    options = RunOptions.from_args(args)
    run = dict(steps=options.steps, output_dir=args.output_dir, save_every=options.save_every, resume=not args.no_resume,
               seed=options.seed, weights=options.weights, lr=options.lr)
    check_train_inputs(setup, options.data, **run)  # bad input is one line before DeepSpeed even loads
    import_deepspeed_logging_to_stderr()
    result = train(setup, options.data, **run, check_frozen=args.check_frozen)
    if result.losses:
        first, last = result.start_step + 1, result.last_step
        print(f"steps {first}-{last}: loss {result.losses[first]:.4f} -> {result.losses[last]:.4f}; log {result.log_path}")
    for check in result.checks:
        print(f"guard at step {check.step}: moved {', '.join(g for g, m in check.moved.items() if m)}")


def _add_launch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch",
        help="print (--dry-run) or run the exact deepspeed / torchrun command for the setup",
        description="Write the setup, the DeepSpeed config and, for several nodes, a hostfile into --run-dir, and print "
        "the deepspeed command (and the torchrun equivalent) with every argument quoted. Without --dry-run, run the "
        "deepspeed command here, unless the memory estimate says the setup will not fit (--force overrides). On a "
        "machine without GPUs the same command starts CPU processes.",
    )
    add_setup_flags(p)
    _add_run_flags(p, "--run-dir")
    g = p.add_argument_group("launch")
    g.add_argument("--hosts", default=None, help="comma-separated host names, one per node (default: node1, node2, ...)")
    g.add_argument("--master-addr", default=None, help="address of the first node (default: the first host)")
    g.add_argument("--master-port", type=int, default=29500, help="(default: %(default)s)")
    g.add_argument("--launcher", choices=("deepspeed", "torchrun"), default="deepspeed", help="what runs without --dry-run")
    g.add_argument("--dry-run", action="store_true", help="write the files and print the commands; start nothing")
    g.add_argument("--force", action="store_true", help="launch even if the estimate says it will not fit")
    p.set_defaults(run=_run_launch)


def _run_launch(args: argparse.Namespace) -> None:
    from moekit.checkpoints import check_run_folder
    from moekit.launch import check_hosts, launch, run_plan

    hosts = [h.strip() for h in args.hosts.split(",")] if args.hosts is not None else None
    if hosts is not None and not all(hosts):
        raise MoekitError(f"--hosts '{args.hosts}' has an empty name; give one host per node, e.g. node1,node2.")
    train_args = RunOptions.from_args(args)
    setup = setup_from_args(args)
    refuse_estimate_only_knobs(setup, "launch")
    check_hosts(setup, hosts, args.master_addr, args.master_port)
    check_run_folder(args.run_dir, setup, resume=True)
    import_deepspeed_logging_to_stderr()  # after the checks, so bad input stays one line
    plan = launch(
        setup, run_dir=args.run_dir, hosts=hosts, master_addr=args.master_addr,
        master_port=args.master_port, train_args=train_args,
    )
    if args.dry_run:
        plan.write()
        print(plan.describe())
        return
    print(plan.describe(), flush=True)
    try:
        code = run_plan(plan, force=args.force, launcher=args.launcher)
    except KeyboardInterrupt:
        from moekit.checkpoints import latest_checkpoint_step

        step = latest_checkpoint_step(plan.run_dir) or 0
        raise Interrupted(f"interrupted; rerun the same command to resume from step {step}") from None
    if code:
        raise RunFailure(f"the {args.launcher} run exited with code {code}; see its output above and {args.run_dir}/log.jsonl.")


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_estimate,
    _add_lora,
    _add_monitor,
    _add_plan,
    _add_simulate,
    _add_measure,
    _add_ds_config,
    _add_train,
    _add_launch,
]


class UsageError(MoekitError):
    """A flag argparse refused; carries the subcommand's name for the one-line message."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line naming the fix (not the usage block), exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(self.prog, f"{message}; see `{self.prog} --help`.")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moekit",
        description="Learn and plan fine-tuning of Mixture-of-Experts models when GPU memory is short.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def import_deepspeed_logging_to_stderr() -> None:
    """Import DeepSpeed with its logger writing to stderr, so ``moekit ds-config > ds.json`` stays valid JSON.

    DeepSpeed's logger writes to stdout, and importing it already logs (e.g. "Setting accelerator to CPU").
    """
    import contextlib

    if "deepspeed" in sys.modules:
        return
    with contextlib.redirect_stdout(sys.stderr):  # its logger's handler binds to the stream it sees now
        import deepspeed  # noqa: F401


def report_error(prog: str, message: str, code: int, as_json: bool) -> int:
    """Print one failure as one line on stderr (a JSON object with --json); return the exit code."""
    message = " ".join(str(message).split())  # one line, whatever the exception held
    if as_json:
        print(json.dumps({"command": prog, "error": message, "exit_code": code}), file=sys.stderr)
    else:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as err:
        return report_error(err.prog, str(err), 2, as_json)
    prog = f"moekit {args.command}"
    try:
        args.run(args)  # commands that use DeepSpeed import it once their inputs are checked
    except Interrupted as err:
        return report_error(prog, str(err), 130, as_json)
    except KeyboardInterrupt:
        return report_error(prog, "interrupted (Ctrl-C); nothing was finished", 130, as_json)
    except RunFailure as err:
        return report_error(prog, str(err), 1, as_json)
    except MoekitError as err:
        return report_error(prog, str(err), 2, as_json)
    except BrokenPipeError:  # `moekit plan | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except UnicodeDecodeError as err:
        return report_error(prog, f"a file is not UTF-8 text ({err.reason} at byte {err.start}); save the config / data "
                            "file as UTF-8", 2, as_json)
    except OSError as err:
        where = f" {err.filename}" if err.filename else ""
        return report_error(prog, f"cannot use{where}: {err.strerror or err}; check the path exists and you may "
                            "read / write it", 2, as_json)
    except Exception as err:
        if os.environ.get("MOEKIT_TRACEBACK"):
            raise
        return report_error(prog, f"unexpected {type(err).__name__}: {err} (a moekit bug: rerun with "
                            "MOEKIT_TRACEBACK=1 and report the traceback)", 1, as_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
