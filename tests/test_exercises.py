"""Every lesson's exercises: three per lesson, each with a collapsed solution, and each runs to the end.

An exercise that changes a knob stores it in its markdown cell's metadata
(``{"moekit": {"exercise": n, "parameters": {"NAME": "python source"}}}``). The run test injects a
lesson's exercise parameters after its parameters cell (as papermill does) and executes the whole lesson
with papermill, solutions included; a cell that raises, or a figure whose bars are unreadable, fails it.
One run per lesson carries all its exercises' knobs (they touch different parameters). The runs go in a
background process started with the session (tests/exercise_runs.py, tests/conftest.py).
"""

from __future__ import annotations

import pytest
from exercise_runs import cells_of, exercise_parameters

LESSONS = ["00_tour", "01_baseline_oom", "02_lora", "03_sequence_length_and_packing", "04_batch_and_accumulation",
           "05_mixed_precision", "06_zero_stages_and_offload", "07_activation_checkpointing", "08_monitoring",
           "09_dashboard", "10_launch_8gpu"]


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_lesson_has_three_exercises_each_followed_by_a_collapsed_solution(lesson):
    cells = cells_of(lesson)
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


@pytest.mark.slow
@pytest.mark.parametrize("lesson", [lesson for lesson in LESSONS if exercise_parameters(lesson)])
def test_a_lesson_runs_to_the_end_with_its_exercises_knobs_turned(lesson, exercise_runs):
    result = exercise_runs.result(lesson)
    assert result["error"] is None, f"{lesson} with its exercises' knobs failed:\n{result['error']}"
    assert result["solutions"] == result["solutions_executed"] == 3
    assert not result["problems"], result["problems"]
