"""ZeRO's size knobs (buckets, prefetch, live and reused parameters, sub-groups): DeepSpeed's defaults, read
from DeepSpeed's own config model, with a setup's values over them.

One home for these numbers: ``moekit.zero`` writes them into the DeepSpeed config, ``moekit.estimate`` counts
their bytes and ``moekit.step`` allocates them, all through ``zero_knobs(setup)``. A setup field left at
``None`` means "DeepSpeed's default", which is what ``DeepSpeedZeroConfig()`` holds for the installed
DeepSpeed. Reading it imports DeepSpeed (seconds), so the defaults of the DeepSpeed version moekit was
tested with ship in ``presets/deepspeed_defaults.json`` (``python -m moekit.zero_knobs`` writes it;
tests/test_zero_knobs.py reads DeepSpeed again and compares), and another version's are read once and kept
in moekit's cache folder.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import metadata, resources

#: The setup field of each knob -> the attribute of ``deepspeed.runtime.zero.config.DeepSpeedZeroConfig`` that
#: holds it (the JSON key in ``zero_optimization`` is the setup field's name).
KNOBS: dict[str, str] = {
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "stage3_max_reuse_distance": "max_reuse_distance",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "sub_group_size": "sub_group_size",
}

#: What each knob decides, in elements (said by ``--help`` and the docs).
MEANING: dict[str, str] = {
    "reduce_bucket_size": "gradient-reduction bucket, allocated whole (two with overlap_comm at ZeRO-1/2)",
    "allgather_bucket_size": "ZeRO-1/2 all-gather chunk of the updated weights (gathered in place: no buffer)",
    "stage3_prefetch_bucket_size": "ZeRO-3: parameters gathered ahead of the module being computed",
    "stage3_max_live_parameters": "ZeRO-3: gathered parameters beyond which nothing more is prefetched",
    "stage3_max_reuse_distance": "ZeRO-3: a module used again within this many parameters stays gathered",
    "stage3_param_persistence_threshold": "ZeRO-3: parameters this small stay whole on every rank",
    "sub_group_size": "ZeRO-3: the optimizer steps its partition in sub-groups of this many elements",
}

#: Where the shipped defaults live inside the package.
SHIPPED_DEFAULTS = "presets/deepspeed_defaults.json"


@dataclass(frozen=True)
class ZeroKnobs:
    """The knob values a run uses, in elements (the setup's, else DeepSpeed's defaults)."""

    reduce_bucket_size: int
    allgather_bucket_size: int
    stage3_prefetch_bucket_size: int
    stage3_max_live_parameters: int
    stage3_max_reuse_distance: int
    stage3_param_persistence_threshold: int
    sub_group_size: int


def deepspeed_version() -> str:
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return "none"


def read_deepspeed_defaults() -> dict[str, int]:
    """The knobs' defaults as DeepSpeed's own config model has them (imports DeepSpeed)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = DeepSpeedZeroConfig()
    return {knob: int(getattr(config, attribute)) for knob, attribute in KNOBS.items()}


def _shipped() -> dict:
    try:
        return json.loads(resources.files("moekit").joinpath(SHIPPED_DEFAULTS).read_text())
    except (OSError, ValueError):
        return {}


def deepspeed_defaults() -> dict[str, int]:
    """DeepSpeed's defaults for the installed version: shipped, cached on disk, or read from DeepSpeed."""
    return dict(_defaults_for(deepspeed_version()))


@functools.lru_cache(maxsize=4)
def _defaults_for(version: str) -> dict[str, int]:
    shipped = _shipped()
    if shipped.get("deepspeed") == version:
        return shipped["defaults"]
    from moekit.cache import cache_dir, write_json_quietly

    path = cache_dir() / f"deepspeed-defaults-{version}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    defaults = read_deepspeed_defaults()
    write_json_quietly(path, defaults)
    return defaults


def zero_knobs(setup) -> ZeroKnobs:
    """The knob values ``setup`` runs with: each field it sets, DeepSpeed's default for the others."""
    defaults = deepspeed_defaults()
    return ZeroKnobs(**{knob: defaults[knob] if getattr(setup, knob) is None else getattr(setup, knob)
                        for knob in KNOBS})


if __name__ == "__main__":
    target = resources.files("moekit").joinpath(SHIPPED_DEFAULTS)
    data = {"deepspeed": deepspeed_version(), "defaults": read_deepspeed_defaults()}
    with resources.as_file(target) as path:
        path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote DeepSpeed {data['deepspeed']}'s ZeRO defaults to {target}")
