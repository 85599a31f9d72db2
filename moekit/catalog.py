"""The bundled model presets: where they are, their names and descriptions (plain JSON, no torch).

``moekit.models`` builds models from them; the command line lists them without importing torch.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path


def preset_dir() -> Path:
    return Path(str(resources.files("moekit") / "presets" / "models"))


def list_presets() -> list[str]:
    """Names of the bundled model presets, sorted."""
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def preset_description(name: str) -> str:
    """The one-line description stored with a preset."""
    data = json.loads((preset_dir() / f"{name}.json").read_text())
    return data.get("_moekit_description", "")
