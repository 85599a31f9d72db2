"""binder/ asks a public Binder for what pyproject.toml asks pip for: the same packages, at versions it allows."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
BINDER = REPO / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["project"]["dependencies"])}


def binder_lines() -> list[str]:
    """Non-blank, non-comment lines of binder/requirements.txt."""
    lines = (line.split(" #")[0].strip() for line in (BINDER / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def binder_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, (line for line in binder_lines() if not line.startswith("-")))}


def pinned_version(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", f"binder should pin {requirement.name} exactly (==), not {specifier}"
    return Version(specifier.version)


def test_binder_installs_the_same_packages_as_pyproject():
    binder, project = set(binder_requirements()), set(pyproject_requirements())
    assert binder == project, f"only in binder: {sorted(binder - project)}; only in pyproject: {sorted(project - binder)}"


@pytest.mark.parametrize("name", sorted(pyproject_requirements()))
def test_binder_pins_a_version_pyproject_allows(name):
    version = pinned_version(binder_requirements()[name])
    allowed = pyproject_requirements()[name].specifier
    assert allowed.contains(version, prereleases=True), f"binder pins {name}=={version}, pyproject allows {allowed}"


def test_binder_takes_the_cpu_build_of_the_torch_make_setup_installs():
    assert f"--extra-index-url {CPU_INDEX}" in binder_lines()
    torch = pinned_version(binder_requirements()["torch"])
    assert torch.local == "cpu", "pin torch==X+cpu so pip cannot pick the CUDA build from PyPI"
    make_torch = re.search(r"^TORCH\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.MULTILINE).group(1)
    assert pinned_version(Requirement(make_torch)).public == torch.public, f"binder's torch {torch} is not the Makefile's {make_torch}"


def test_binder_python_satisfies_requires_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-")
    assert SpecifierSet(pyproject()["project"]["requires-python"]).contains(runtime.removeprefix("python-") + ".0")


def test_postbuild_installs_moekit_itself_without_touching_the_pins():
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "repo2docker runs binder/postBuild only when it is executable"
    assert re.search(r"pip install .*--no-deps .*-e \.$", post_build.read_text(), re.MULTILINE)
