"""Every figure an executed lesson shows keeps the readability rule (``moekit.viz.readability_problem``).

nbval runs each lesson cell by cell; after a cell runs, its plotly outputs are read back here, and a
figure whose tallest bar is under a quarter of its y range fails that cell, naming the figure.
"""

from __future__ import annotations

import pytest

PLOTLY_MIME = "application/vnd.plotly.v1+json"


def figure_problems(outputs) -> list[str]:
    from moekit.viz import readability_problem

    problems = []
    for output in outputs or []:
        figure = (output.get("data") or {}).get(PLOTLY_MIME) if hasattr(output, "get") else None
        if figure and (problem := readability_problem(figure)):
            problems.append(problem)
    return problems


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    problems = figure_problems(getattr(item, "test_outputs", None))
    if problems:
        raise AssertionError("unreadable figure: " + "; ".join(problems))
    return result
