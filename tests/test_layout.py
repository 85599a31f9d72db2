"""The package's layout: no two moekit modules import each other, and each module imports alone."""

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import moekit

PACKAGE_DIR = Path(moekit.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__main__")


def moekit_imports(source: str) -> set[str]:
    """The moekit modules a source file imports, at the top or inside functions (TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] == "moekit":
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(node.module.split(".")[0] if node.module else "")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("moekit."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: moekit_imports((PACKAGE_DIR / f"{name}.py").read_text()) - {name} for name in MODULES}


def test_the_import_parser_sees_imports_at_the_top_and_inside_functions():
    source = "from moekit.a import x\nimport moekit.b\ndef f():\n    from moekit import c\n    from moekit.d.e import y\n"
    assert moekit_imports(source) == {"a", "b", "c", "d"}


def test_no_two_moekit_modules_import_each_other():
    graph = import_graph()
    assert set(itertools.chain.from_iterable(graph.values())) - {""} <= set(MODULES) | {"presets"}
    pairs = [(a, b) for a, b in itertools.combinations(MODULES, 2) if b in graph[a] and a in graph[b]]
    assert pairs == []


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter; before each module, every moekit module is forgotten, so each import starts
    from nothing of moekit (an import order that only works after another module fails here);
    torch and the other libraries stay loaded, which keeps this to seconds."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k == 'moekit' or k.startswith('moekit.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module('moekit.' + name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, *MODULES], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ""


def test_the_package_exports_its_public_api_lazily_and_torch_free():
    script = (
        "import sys, importlib\n"
        "import moekit\n"
        "from moekit import TrainingSetup, estimate, plan, RunOptions, launch\n"
        "assert 'torch' not in sys.modules, 'import moekit (and the estimate) loaded torch'\n"
        "import moekit.estimate\n"
        "assert moekit.estimate is estimate is importlib.import_module('moekit.estimate').estimate\n"
        "wrong = [n for n in moekit.__all__ if getattr(moekit, n) is not\n"
        "         getattr(importlib.import_module('moekit.' + moekit._EXPORTS[n]), n)]\n"
        "print(len(moekit.__all__), wrong)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    count, wrong = run.stdout.split(maxsplit=1)
    assert int(count) >= 40 and wrong.strip() == "[]"
