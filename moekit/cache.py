"""A small on-disk cache for facts derived from a model's shapes, so ``moekit estimate`` needs no torch.

The estimate itself is arithmetic (microseconds), but the facts it starts from (exact parameter counts,
the LoRA census, which modules a target list resolves to) come from building the model on the meta
device, which imports torch and transformers (seconds). Those facts depend only on the model's config,
the LoRA spec and the code that counts them, so moekit keeps them in a JSON file per fact under
``$MOEKIT_CACHE_DIR`` (default ``~/.cache/moekit``). The key holds the model's config file bytes (a
preset's JSON or a folder's config.json), the arguments, the source of the modules that compute the facts,
and the installed transformers and peft versions: any change computes afresh. A cache that cannot be read
or written is skipped silently; the answer is the same, only slower.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from importlib import metadata, resources
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

#: The modules whose code decides the cached facts; editing one of them invalidates the cache.
_SOURCES = ("models.py", "arch.py", "lora.py", "estimate.py", "training_setup.py", "catalog.py", "traps.py")


def cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE_DIR") or Path.home() / ".cache" / "moekit")


@functools.lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    digest = hashlib.sha256()
    package = resources.files("moekit")
    for name in _SOURCES:
        digest.update(package.joinpath(name).read_bytes())
    for version in _versions():
        digest.update(version.encode())
    return digest.hexdigest()


def _config_bytes(model: str) -> bytes | None:
    """The bytes that define a model's shapes: a preset's JSON, or a local folder's / file's config.json."""
    from moekit.catalog import preset_dir

    preset = preset_dir() / f"{model}.json"
    if preset.is_file():
        return preset.read_bytes()
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


def _versions() -> list[str]:
    versions = []
    for dist in ("transformers", "peft"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    return versions


def bundle_key(kind: str, model: str, arg_reprs: list[str], config: bytes) -> str:
    """The key of a shipped fact: what it is, the preset's config bytes and the library versions (no code
    fingerprint: tests/test_cache.py recomputes every shipped fact with the current code instead)."""
    return hashlib.sha256(
        json.dumps([kind, model, arg_reprs, hashlib.sha256(config).hexdigest(), _versions()]).encode()
    ).hexdigest()


@functools.lru_cache(maxsize=1)
def shipped_facts() -> dict[str, Any]:
    """Facts of the bundled presets at their default setups, shipped with moekit (``presets/facts.json``,
    written by ``python -m moekit.cache``), so a first ``moekit estimate`` of a preset needs no torch.
    MOEKIT_NO_SHIPPED_FACTS=1 ignores them (to compute them afresh)."""
    if os.environ.get("MOEKIT_NO_SHIPPED_FACTS"):
        return {}
    try:
        return json.loads(resources.files("moekit").joinpath(SHIPPED_FACTS).read_text())
    except (OSError, ValueError):
        return {}


#: Where the shipped facts live inside the package.
SHIPPED_FACTS = "presets/facts.json"


def write_json_quietly(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half a file); a cache that cannot be
    written is skipped silently."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass


def disk_cached(kind: str, decode: Callable[[Any], T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Cache ``fn(model, *args)`` on disk (and in memory); ``decode`` rebuilds the value from its JSON.

    The value is stored as JSON: a dataclass as its fields, a tuple as a list, with what it is the value of
    (so ``python -m moekit.cache`` can ship it). A model name with no config file (a typo) is never cached,
    so its error comes from the real function each time. On a miss, a preset's fact shipped with moekit is
    used before computing.
    """

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=256)
        @functools.wraps(fn)
        def cached(model: str, *args: Any) -> T:
            config = _config_bytes(model) if isinstance(model, str) else None
            if config is None:
                return fn(model, *args)
            arg_reprs = [repr(a) for a in args]
            key = hashlib.sha256(json.dumps([kind, _code_fingerprint(), config.hex(), model, arg_reprs]).encode()).hexdigest()
            path = cache_dir() / "facts" / f"{kind}-{key[:32]}.json"
            try:
                return decode(json.loads(path.read_text())["value"])
            except (OSError, ValueError, TypeError, KeyError):
                pass
            shipped = shipped_facts().get(bundle_key(kind, model, arg_reprs, config))
            if shipped is not None:
                return decode(shipped)
            value = fn(model, *args)
            data = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            record = {"kind": kind, "model": model, "args": arg_reprs, "value": data}
            write_json_quietly(path, record)
            return value

        return cached

    return wrap


def compute_shipped_facts() -> dict[str, Any]:
    """Every fact ``moekit models`` and a default estimate of each bundled preset read (full fine-tune, and
    LoRA with the default spec), computed afresh in a temporary cache: the content of ``presets/facts.json``."""
    import subprocess
    import sys
    import tempfile

    from moekit.catalog import list_presets

    with tempfile.TemporaryDirectory() as folder:
        code = (
            "from moekit.catalog import list_presets\n"
            "from moekit.cli import _census_row\n"
            "from moekit.estimate import estimate\n"
            "from moekit.training_setup import TrainingSetup\n"
            "for name in list_presets():\n"
            "    _census_row(name)\n"  # moekit models
            "    for method in ('full', 'lora'):\n"
            "        try:\n"
            "            estimate(TrainingSetup(model=name, method=method))\n"
            "        except Exception:\n"  # a preset without the default LoRA targets (a dense model)
            "            pass\n"
        )
        env = {**os.environ, "MOEKIT_CACHE_DIR": folder, "MOEKIT_NO_SHIPPED_FACTS": "1"}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        facts = {}
        for file in sorted((Path(folder) / "facts").glob("*.json")):
            record = json.loads(file.read_text())
            if record["model"] in list_presets():
                config = _config_bytes(record["model"])
                facts[bundle_key(record["kind"], record["model"], record["args"], config)] = record["value"]
        return facts


if __name__ == "__main__":
    target = Path(str(resources.files("moekit").joinpath(SHIPPED_FACTS)))
    facts = compute_shipped_facts()
    target.write_text(json.dumps(facts, indent=0) + "\n")  # key order kept: a census lists its components in order
    print(f"wrote {len(facts)} facts to {target}")
