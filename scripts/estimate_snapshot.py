"""Every figure the estimate prints, over preset x method x stage x precision x checkpointing x offload,
as one JSON file: run it before and after a refactor and compare (the refactor must not move a byte).

    python scripts/estimate_snapshot.py before.json   # on the old tree
    python scripts/estimate_snapshot.py after.json    # on the new tree
    python scripts/estimate_snapshot.py --compare before.json after.json

The probe's wall time in a note (``(1.9 s, cached)``) is the one text allowed to differ.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re

WALL_TIME = re.compile(r"\(\d+\.\d+ s")


def snapshot() -> dict[str, str]:
    from moekit.catalog import list_presets
    from moekit.errors import MoekitError
    from moekit.estimate import estimate
    from moekit.training_setup import TrainingSetup

    figures = {}
    for preset, method, stage, precision, checkpointing, offload in itertools.product(
        list_presets(), ("full", "lora", "qlora"), (0, 1, 2, 3), ("fp32", "fp16", "bf16"), (False, True),
        ("none", "optimizer", "optimizer+params"),
    ):
        key = f"{preset}|{method}|{stage}|{precision}|{checkpointing}|{offload}"
        try:
            setup = TrainingSetup(model=preset, method=method, zero_stage=stage, precision=precision,
                                  activation_checkpointing=checkpointing, offload=offload, host_memory_gb=64)
            figures[key] = repr(estimate(setup).as_dict())
        except MoekitError as err:
            figures[key] = f"refused: {err}"
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.load(open(p)) for p in args.paths)
        differ = [k for k in before if WALL_TIME.sub("(T s", before[k]) != WALL_TIME.sub("(T s", after.get(k, ""))]
        print(f"{len(before)} setups, {sum(not v.startswith('refused') for v in before.values())} estimated, "
              f"{len(differ)} differ{': ' + ', '.join(differ[:10]) if differ else ''}")
        return
    figures = snapshot()
    with open(args.paths[0], "w") as handle:
        json.dump(figures, handle, indent=0, sort_keys=True)
    print(f"{len(figures)} setups written to {args.paths[0]}")


if __name__ == "__main__":
    main()
