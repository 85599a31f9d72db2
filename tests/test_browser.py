"""The lessons in a real browser: JupyterLab on localhost, driven by headless Chromium through Playwright.

Opens ``09_dashboard``, runs all cells, reads the dashboard's knobs from the page, clicks another ZeRO stage
and checks that the rendered plotly chart and the fit verdict now say what ``estimate`` says for the new setup; then opens
``01_baseline_oom`` and checks that its plot renders with no error in the browser console. Screenshots
and the server's log go to ``test-artifacts/``.

Needs Chromium at /usr/bin/chromium and the playwright package (``make setup`` installs both); without
them the test fails and says how to install them, unless MOEKIT_SKIP_BROWSER=1 is set.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path

import pytest
from browser_support import (
    INSTALL_HINT,
    SKIP_ENV,
    ConsoleLog,
    chromium_browser,
    missing_browser_parts,
    open_notebook,
    run_all_cells,
    running_lab,
    shown_bars,
    shown_controls,
    shown_tallest_share,
    wait_for,
    wait_until_all_cells_ran,
)

from moekit.breakdown import CATEGORIES, Breakdown, GiB
from moekit.estimate import estimate
from moekit.training_setup import TrainingSetup
from moekit.viz import PEAK_TRACE_NAME
from moekit.widgets import build_controls, setup_from_controls, verdict_html

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
DASHBOARD_NOTEBOOK = "notebooks/09_dashboard.ipynb"
BASELINE_NOTEBOOK = "notebooks/01_baseline_oom.ipynb"
TOY_NOTEBOOK = "notebooks/04_batch_and_accumulation.ipynb"  # full-size and toy charts, a quick run
VIEWPORT = {"width": 1600, "height": 1200}


# --------------------------------------------------------------------------------------------
# Fixtures: one server and one browser for the module, a fresh page per test
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = missing_browser_parts()
    if missing and os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1 and this machine lacks {', '.join(missing)}")
    if missing:
        pytest.fail(f"the browser test needs {' and '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    with chromium_browser() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def lab(browser):
    ARTIFACTS.mkdir(exist_ok=True)
    with running_lab(REPO, ARTIFACTS / "jupyterlab.log") as server:
        yield server


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def console(page) -> ConsoleLog:
    log = ConsoleLog()
    log.listen(page)
    return log


def run_notebook(page, lab, path: str, timeout_s: float) -> bytes:
    """Open a lesson and run all its cells; return the file's bytes from before (to check it was not saved)."""
    assert (REPO / path).is_file(), f"{path} is missing"
    committed = (REPO / path).read_bytes()
    try:
        open_notebook(page, lab, path)
        run_all_cells(page)
        wait_until_all_cells_ran(page, timeout_s)
    except Exception:
        page.screenshot(path=ARTIFACTS / f"{Path(path).stem}_failure.png")
        raise
    return committed


# --------------------------------------------------------------------------------------------
# What the dashboard should show, computed here with moekit
# --------------------------------------------------------------------------------------------


def knob_values(shown: dict[str, str | bool]) -> dict:
    """The dashboard's control values (keys as in build_controls), parsed from what the browser displays."""
    values = {}
    for name, control in build_controls(TrainingSetup()).items():
        text = shown[control.description]
        values[name] = text if isinstance(text, bool) else type(control.value)(text)
    return values


def plain_text(markup: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", markup)).split())


def assert_board_shows(board, expected: Breakdown, setup: TrainingSetup) -> str:
    """Every bar of the rendered chart and the verdict's text equal the estimate of ``setup``; returns the verdict."""
    bars = shown_bars(board)
    for category in CATEGORIES:
        assert bars[category] == [pytest.approx(expected.per_gpu[category] / GiB, rel=1e-9)], category
    assert bars[PEAK_TRACE_NAME] == [pytest.approx(expected.total_bytes / GiB, rel=1e-9)]
    verdict = " ".join(board.locator(".widget-html-content").filter(has_text="headroom").first.inner_text().split())
    assert verdict == plain_text(verdict_html(setup, expected))
    assert f"headroom {expected.headroom_bytes / GiB:+.1f} GiB" in verdict
    assert verdict.startswith("FITS" if expected.fits else "DOES NOT FIT")
    return verdict


def bars_equal(board, expected: Breakdown) -> bool:
    return shown_bars(board).get(PEAK_TRACE_NAME) == [pytest.approx(expected.total_bytes / GiB, rel=1e-9)]


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------


def test_dashboard_chart_and_verdict_follow_the_estimate_when_the_zero_stage_changes(page, console, lab):
    committed = run_notebook(page, lab, DASHBOARD_NOTEBOOK, timeout_s=120)
    board = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-label", has_text="ZeRO stage")).first
    board.scroll_into_view_if_needed()
    knobs = knob_values(shown_controls(board))
    setup = setup_from_controls(knobs)
    verdict_before = assert_board_shows(board, estimate(setup), setup)
    board.screenshot(path=ARTIFACTS / "09_dashboard_before.png")

    new_knobs = {**knobs, "zero_stage": 3 if knobs["zero_stage"] != 3 else 2}
    zero_stage = board.locator(".widget-toggle-buttons").filter(has=page.locator(".widget-label", has_text="ZeRO stage"))
    zero_stage.get_by_role("button", name=str(new_knobs["zero_stage"]), exact=True).click()
    new_setup = setup_from_controls(new_knobs)
    new_expected = estimate(new_setup)
    assert wait_for(lambda: bars_equal(board, new_expected), timeout_s=30), f"the chart did not update: {shown_bars(board)}"
    assert knob_values(shown_controls(board)) == new_knobs
    verdict_after = assert_board_shows(board, new_expected, new_setup)
    assert verdict_after != verdict_before
    board.screenshot(path=ARTIFACTS / "09_dashboard_after.png")

    assert console.errors == []
    assert (REPO / DASHBOARD_NOTEBOOK).read_bytes() == committed, "the browser saved the notebook"


def test_baseline_lesson_renders_its_plot_with_no_console_errors(page, console, lab):
    committed = run_notebook(page, lab, BASELINE_NOTEBOOK, timeout_s=240)
    plot = page.locator(".jp-OutputArea .js-plotly-plot").first  # plotly's renderer makes the output itself the plot
    plot.scroll_into_view_if_needed()
    assert plot.locator("svg.main-svg").count() >= 1
    bars = shown_bars(plot)
    assert set(CATEGORIES) <= set(bars) and all(value > 0 for value in bars["weights"])
    plot.screenshot(path=ARTIFACTS / "01_baseline_oom_plot.png")

    assert console.errors == []
    assert (REPO / BASELINE_NOTEBOOK).read_bytes() == committed, "the browser saved the notebook"


def test_toy_charts_show_bars_a_reader_can_see(page, console, lab):
    committed = run_notebook(page, lab, TOY_NOTEBOOK, timeout_s=300)
    plots = page.locator(".jp-OutputArea .js-plotly-plot")
    assert plots.count() == 2  # the full-size micro-batches and the toy measured on this CPU
    for index in range(plots.count()):
        plot = plots.nth(index)
        plot.scroll_into_view_if_needed()
        plot.screenshot(path=ARTIFACTS / f"04_batch_and_accumulation_plot{index}.png")
        assert shown_tallest_share(plot) >= 0.25, f"plot {index}: its bars are flat under the y range"
    toy = plots.nth(1)
    assert "MiB" in toy.locator(".ytitle").text_content()  # the toy speaks MiB, not GiB of a card
    assert console.errors == []
    assert (REPO / TOY_NOTEBOOK).read_bytes() == committed, "the browser saved the notebook"
