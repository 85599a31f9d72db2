"""The ``moekit`` command line: one subcommand per library call.

Each subcommand has an ``_add_<name>(subparsers)`` function that declares its flags and a
``_run_<name>(args)`` function that calls the library and prints. User mistakes (``MoekitError``)
print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from moekit.errors import MoekitError
from moekit.training_setup import (
    ATTENTIONS,
    METHODS,
    OFFLOADS,
    PRECISIONS,
    LoraSpec,
    TrainingSetup,
)

# --------------------------------------------------------------------------------------------
# Shared flags: the training setup
# --------------------------------------------------------------------------------------------


def add_setup_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a TrainingSetup; defaults are the article's baseline run."""
    d = TrainingSetup()
    g = parser.add_argument_group("training setup")
    g.add_argument("--model", default=d.model, help="preset name or local HF folder / config.json (default: %(default)s)")
    g.add_argument("--method", choices=METHODS, default=d.method, help="full fine-tuning, LoRA or QLoRA (default: %(default)s)")
    g.add_argument("--r", type=int, default=d.lora.r, help="LoRA rank (default: %(default)s)")
    g.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2*r)")
    g.add_argument("--dropout", type=float, default=d.lora.dropout, help="LoRA dropout (default: %(default)s)")
    g.add_argument(
        "--targets",
        default=",".join(d.lora.targets),
        help="comma-separated LoRA targets: groups (attention, experts, router, shared_experts, "
        "all-linear) or module/parameter names (q_proj, gate_up_proj, w1...) (default: %(default)s)",
    )
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision, help="bf16/fp16 mixed precision or fp32 (default: %(default)s)")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=d.zero_stage, help="DeepSpeed ZeRO stage (default: %(default)s)")
    g.add_argument("--offload", choices=OFFLOADS, default=d.offload, help="what ZeRO offloads to the CPU (default: %(default)s)")
    g.add_argument("--gpus", type=int, default=d.gpus_per_node, help="GPUs per node (default: %(default)s)")
    g.add_argument("--nodes", type=int, default=d.num_nodes, help="number of nodes (default: %(default)s)")
    g.add_argument("--gpu-mem", type=float, default=d.gpu_memory_gb, help="memory per GPU in GB as sold, e.g. 40 (default: %(default)s)")
    g.add_argument("--host-mem", type=float, default=None, help="host RAM per node in GB, checked for offload")
    g.add_argument("--seq", type=int, default=d.seq_len, help="sequence length in tokens (default: %(default)s)")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per GPU per step (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps (default: %(default)s)")
    g.add_argument("--checkpointing", action="store_true", help="recompute activations in backward (activation checkpointing)")
    g.add_argument("--no-packing", action="store_true", help="pad each batch instead of packing sequences to --seq")
    g.add_argument("--attn", choices=ATTENTIONS, default=d.attn_implementation, help="attention implementation (default: %(default)s)")


def setup_from_args(args: argparse.Namespace) -> TrainingSetup:
    """Build (and so validate) the TrainingSetup the flags describe."""
    alpha = args.alpha if args.alpha is not None else 2 * args.r
    return TrainingSetup(
        model=args.model,
        method=args.method,
        lora=LoraSpec(r=args.r, alpha=alpha, dropout=args.dropout, targets=args.targets),
        precision=args.precision,
        zero_stage=args.zero,
        offload=args.offload,
        gpus_per_node=args.gpus,
        num_nodes=args.nodes,
        gpu_memory_gb=args.gpu_mem,
        host_memory_gb=args.host_mem,
        seq_len=args.seq,
        micro_batch=args.micro_batch,
        grad_accum=args.grad_accum,
        activation_checkpointing=args.checkpointing,
        packing=not args.no_packing,
        attn_implementation=args.attn,
    )


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


# --------------------------------------------------------------------------------------------
# moekit models
# --------------------------------------------------------------------------------------------


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the bundled model presets with exact parameter counts",
        description="List the bundled model presets: total parameters, parameters active per token "
        "(only the top-k routed experts count), experts and top-k. Or census one model with --model.",
    )
    p.add_argument("--model", help="census one preset or local folder, by component")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_models)


def _run_models(args: argparse.Namespace) -> None:
    from moekit.models import list_presets, parameter_census, preset_description

    names = [args.model] if args.model else list_presets()
    censuses = [parameter_census(name) for name in names]
    if args.json:
        print_json([c.as_dict() for c in censuses])
        return
    print(f"{'name':<20}{'params':>18}{'active/token':>18}{'experts':>9}{'top-k':>7}  description")
    for census in censuses:
        description = preset_description(census.model) if not args.model else ""
        print(
            f"{census.model:<20}{census.num_params:>18,}{census.num_active_params:>18,}"
            f"{census.num_experts:>9}{census.experts_per_token:>7}  {description}"
        )
    if args.model:
        print("\nby component:")
        for component, count in censuses[0].num_params_by_component.items():
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
        print(f"\nlargest category: {breakdown.largest_category()} -- attack that first (see `moekit plan`).")


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
    d = LoraSpec()
    p.add_argument("--model", default=TrainingSetup().model, help="preset name or local HF folder / config.json (default: %(default)s)")
    p.add_argument("--r", type=int, default=d.r, help="LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default: 2*r)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout (default: %(default)s)")
    p.add_argument(
        "--targets",
        default=",".join(d.targets),
        help="comma-separated groups (attention, experts, router, shared_experts, all-linear) or names "
        "(q_proj, gate_up_proj, w1...) (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_run_lora)


def _run_lora(args: argparse.Namespace) -> None:
    from moekit.lora import lora_census, resolve_targets

    spec = LoraSpec(r=args.r, alpha=args.alpha if args.alpha is not None else 2 * args.r, dropout=args.dropout, targets=args.targets)
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
# Entry point
# --------------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_estimate, _add_lora]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit",
        description="Learn and plan fine-tuning of Mixture-of-Experts models when GPU memory is short.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except MoekitError as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
