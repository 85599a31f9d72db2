"""Session hooks: the lessons' exercise runs start in the background as soon as they are collected.

Each is a whole lesson run (minutes in all), so one background process at a lower CPU priority runs them
while the rest of the suite goes on (tests/exercise_runs.py); their tests are moved to the end of the session
and read the results.
"""

from __future__ import annotations

import pytest
from exercise_runs import ExerciseRuns

RUN_TEST = "test_a_lesson_runs_to_the_end_with_its_exercises_knobs_turned"
RUNS = pytest.StashKey[ExerciseRuns]()


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    runs = [item for item in items if getattr(item, "originalname", None) == RUN_TEST]
    if not runs or config.option.collectonly:
        return
    items[:] = [item for item in items if getattr(item, "originalname", None) != RUN_TEST] + runs
    config.stash[RUNS] = ExerciseRuns.start([item.callspec.params["lesson"] for item in runs])


def pytest_unconfigure(config):
    runs = config.stash.get(RUNS, None)
    if runs is not None:
        runs.stop()


@pytest.fixture
def exercise_runs(request) -> ExerciseRuns:
    runs = request.config.stash.get(RUNS, None)
    if runs is None:  # collected some other way: run this test's lesson alone
        runs = ExerciseRuns.start([request.node.callspec.params["lesson"]])
        request.addfinalizer(runs.stop)
    return runs
