"""The lessons' exercise runs: each lesson executed by papermill with its exercises' knobs injected.

A run is a whole lesson (real DeepSpeed ranks included), so ``tests/conftest.py`` starts every run the
session collected in one background process at the start of the session, at a lower CPU priority
(``nice``): they use the CPU the rest of the suite leaves idle (it waits on processes, kernels and
browsers much of the time) instead of adding their minutes after it. The tests, moved to the end of the
session, read each lesson's result file. Run alone (``pytest tests/test_exercises.py``) they work the same.

    python tests/exercise_runs.py OUT_DIR LESSON [LESSON ...]   # what the background process runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
#: CPU priority of the background runs (0 is normal, 19 the lowest): the suite's own tests go first.
NICENESS = 10


def cells_of(lesson: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{lesson}.ipynb").read_text())["cells"]


def exercise_parameters(lesson: str) -> dict[str, str]:
    """All the knobs a lesson's exercises turn, NAME -> Python source."""
    merged: dict[str, str] = {}
    for cell in cells_of(lesson):
        merged.update(cell["metadata"].get("moekit", {}).get("parameters", {}))
    return merged


def with_injected_parameters(lesson: str, parameters: dict[str, str]) -> dict:
    """The lesson with a cell setting ``parameters`` right after its parameters cell, as papermill injects."""
    notebook = json.loads((NOTEBOOKS / f"{lesson}.ipynb").read_text())
    cells = notebook["cells"]
    at = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])) + 1
    source = "# Parameters\n" + "\n".join(f"{name} = {value}" for name, value in parameters.items())
    cells.insert(at, {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
                      "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": source})
    return notebook


def run_lesson(lesson: str, folder: Path) -> dict:
    """Execute the lesson with its exercises' knobs in ``folder`` (its own run folders stay there); the result."""
    import papermill

    from moekit.viz import readability_problem

    source, executed = folder / f"{lesson}.ipynb", folder / f"{lesson}.out.ipynb"
    source.write_text(json.dumps(with_injected_parameters(lesson, exercise_parameters(lesson))))
    began = time.monotonic()
    try:
        papermill.execute_notebook(str(source), str(executed), kernel_name="python3", cwd=str(folder),
                                   progress_bar=False)
    except Exception:  # PapermillExecutionError names the cell that failed and its traceback
        return {"error": traceback.format_exc(limit=3), "seconds": time.monotonic() - began}
    cells = json.loads(executed.read_text())["cells"]
    solutions = [c for c in cells if c["metadata"].get("moekit", {}).get("solution")]
    problems = [problem for cell in cells for output in cell.get("outputs", [])
                if (figure := output.get("data", {}).get(PLOTLY_MIME)) and (problem := readability_problem(figure))]
    return {"error": None, "solutions": len(solutions),
            "solutions_executed": sum(1 for c in solutions if c["execution_count"]),
            "problems": problems, "seconds": time.monotonic() - began}


@dataclass
class ExerciseRuns:
    """Lessons being run by one background process; ``result(lesson)`` waits for one."""

    out_dir: Path
    process: subprocess.Popen

    @classmethod
    def start(cls, lessons: list[str]) -> ExerciseRuns:
        out_dir = Path(tempfile.mkdtemp(prefix="moekit-exercises-"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        process = subprocess.Popen([sys.executable, __file__, str(out_dir), *lessons], env=env,
                                   stdout=(out_dir / "runner.log").open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        return cls(out_dir, process)

    def result(self, lesson: str, timeout_s: float = 3600) -> dict:
        path = self.out_dir / f"{lesson}.json"
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if self.process.poll() is not None and not path.exists():
                log = (self.out_dir / "runner.log").read_text()[-3000:]
                raise RuntimeError(f"the exercise runner stopped (exit {self.process.returncode}) before {lesson}:\n{log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lesson}'s exercise run did not finish in {timeout_s:.0f} s")
            time.sleep(1)
        return json.loads(path.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            import signal

            os.killpg(self.process.pid, signal.SIGTERM)  # the runner, its kernels and their DeepSpeed ranks
            self.process.wait(timeout=30)


def lower_priority() -> None:
    """Nice this process and what it starts. With Linux's autogroup scheduling a nice value only ranks
    processes of one session, and this runner has a session of its own (so it can be stopped as a group):
    the session's group is niced too, else it would get an equal share beside the suite's."""
    os.nice(NICENESS)  # inherited by the kernels and the ranks they launch
    try:
        Path("/proc/self/autogroup").write_text(str(NICENESS))
    except OSError:  # no autogroup (another OS, or scheduling without it): the nice value does the work
        pass


#: DeepSpeed's C++ ops the lessons' real runs load (JIT-built once into TORCH_EXTENSIONS_DIR).
OPS = ("FusedAdamBuilder", "CPUAdamBuilder", "ShareMemCommBuilder")


def build_deepspeed_ops() -> None:
    """Build the ops before lowering the priority: a test of the suite that needs one meanwhile waits on this
    build's lock, and would wait much longer on a niced one."""
    from deepspeed.accelerator import get_accelerator

    for name in OPS:
        builder = get_accelerator().create_op_builder(name)
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)


def main(out_dir: str, *lessons: str) -> None:
    build_deepspeed_ops()
    lower_priority()
    for lesson in lessons:
        with tempfile.TemporaryDirectory(prefix=f"moekit-{lesson}-") as folder:
            result = run_lesson(lesson, Path(folder))
        tmp = Path(out_dir) / f"{lesson}.json.tmp"
        tmp.write_text(json.dumps(result))
        tmp.replace(Path(out_dir) / f"{lesson}.json")  # atomic: the test never reads half a file


if __name__ == "__main__":
    main(*sys.argv[1:])
