"""Every lesson's exercises: three per lesson, each with a collapsed solution, and each runs to the end.

An exercise that changes a knob stores it in its markdown cell's metadata
(``{"moekit": {"exercise": n, "parameters": {"NAME": "python source"}}}``). The run test injects a
lesson's exercise parameters after its parameters cell (as papermill does) and executes the whole lesson
with papermill, solutions included; a cell that raises, or a figure whose bars are unreadable, fails it.
One run per lesson carries all its exercises' knobs (they touch different parameters), which keeps CI short.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LESSONS = ["00_tour", "01_baseline_oom", "02_lora", "03_sequence_length_and_packing", "04_batch_and_accumulation",
           "05_mixed_precision", "06_zero_stages_and_offload", "07_activation_checkpointing", "08_monitoring",
           "09_dashboard", "10_launch_8gpu"]
#: Lessons whose exercise run would cost CI too much; nbval still runs them with their defaults, solutions included.
NOT_RUN_WITH_EXERCISES = {
    "06_zero_stages_and_offload": "measures four ZeRO stages on real DeepSpeed ranks and launches a real run",
}
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _cells(lesson: str) -> list[dict]:
    return json.loads((NOTEBOOKS / f"{lesson}.ipynb").read_text())["cells"]


def exercise_parameters(lesson: str) -> dict[str, str]:
    """All the knobs a lesson's exercises turn, NAME -> Python source."""
    merged: dict[str, str] = {}
    for cell in _cells(lesson):
        merged.update(cell["metadata"].get("moekit", {}).get("parameters", {}))
    return merged


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_lesson_has_three_exercises_each_followed_by_a_collapsed_solution(lesson):
    cells = _cells(lesson)
    numbers = []
    for index, cell in enumerate(cells):
        number = cell["metadata"].get("moekit", {}).get("exercise")
        if number is None:
            continue
        numbers.append(number)
        assert cell["cell_type"] == "markdown" and f"### Exercise {number}" in "".join(cell["source"])
        solution = cells[index + 1]
        assert solution["cell_type"] == "code" and solution["metadata"]["moekit"] == {"solution": number}
        # JupyterLab shows it collapsed, and keeps its output folded after Run All
        assert solution["metadata"]["jupyter"] == {"outputs_hidden": True, "source_hidden": True}
    assert numbers == [1, 2, 3]
    parameters_cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    for name in exercise_parameters(lesson):
        assert f"\n{name} = " in "\n" + "".join(parameters_cell["source"]), f"{name} is not a parameter of {lesson}"


def _with_injected_parameters(lesson: str, parameters: dict[str, str]) -> dict:
    notebook = json.loads((NOTEBOOKS / f"{lesson}.ipynb").read_text())
    cells = notebook["cells"]
    at = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])) + 1
    source = "# Parameters\n" + "\n".join(f"{name} = {value}" for name, value in parameters.items())
    cells.insert(at, {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
                      "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": source})
    return notebook


@pytest.mark.slow
@pytest.mark.parametrize("lesson", [lesson for lesson in LESSONS
                                    if exercise_parameters(lesson) and lesson not in NOT_RUN_WITH_EXERCISES])
def test_a_lesson_runs_to_the_end_with_its_exercises_knobs_turned(lesson, tmp_path):
    import papermill

    from moekit.viz import readability_problem

    source, executed = tmp_path / f"{lesson}.ipynb", tmp_path / f"{lesson}.out.ipynb"
    source.write_text(json.dumps(_with_injected_parameters(lesson, exercise_parameters(lesson))))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # run in tmp_path: the lesson's run folders (runs/...) must not meet the ones the plain nbval run makes
    papermill.execute_notebook(str(source), str(executed), kernel_name="python3", cwd=str(tmp_path),
                               progress_bar=False)  # raises PapermillExecutionError naming the cell that failed
    cells = json.loads(executed.read_text())["cells"]
    solutions = [c for c in cells if c["metadata"].get("moekit", {}).get("solution")]
    assert len(solutions) == 3 and all(c["execution_count"] for c in solutions)
    problems = [problem for cell in cells for output in cell.get("outputs", [])
                if (figure := output.get("data", {}).get(PLOTLY_MIME)) and (problem := readability_problem(figure))]
    assert not problems
