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
    for dist in ("transformers", "peft"):
        try:
            digest.update(f"{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{dist}=none".encode())
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


def disk_cached(kind: str, decode: Callable[[Any], T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Cache ``fn(model, *args)`` on disk (and in memory); ``decode`` rebuilds the value from its JSON.

    The value is stored as JSON: a dataclass as its fields, a tuple as a list. A model name with no config
    file (a typo) is never cached, so its error comes from the real function each time.
    """

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.lru_cache(maxsize=256)
        @functools.wraps(fn)
        def cached(model: str, *args: Any) -> T:
            config = _config_bytes(model) if isinstance(model, str) else None
            if config is None:
                return fn(model, *args)
            key = hashlib.sha256(
                json.dumps([kind, _code_fingerprint(), config.hex(), model, [repr(a) for a in args]]).encode()
            ).hexdigest()
            path = cache_dir() / "facts" / f"{kind}-{key[:32]}.json"
            try:
                return decode(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                pass
            value = fn(model, *args)
            data = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                tmp.replace(path)  # atomic: a reader never sees half a file
            except OSError:
                pass
            return value

        return cached

    return wrap
