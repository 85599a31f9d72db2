"""The dashboard's callbacks: a control changes, the chart and verdict follow the estimate."""

import pytest

from moekit.breakdown import GiB
from moekit.estimate import estimate
from moekit.widgets import Dashboard, setup_from_controls


def bar_values(dashboard: Dashboard) -> dict[str, float]:
    return {trace.name: trace.y[0] for trace in dashboard.figure.data}


def test_dashboard_starts_at_the_articles_baseline_and_says_it_does_not_fit():
    board = Dashboard()
    assert board.setup.seq_len == 12288
    assert "DOES NOT FIT" in board.verdict.value
    assert bar_values(board)["activations"] == pytest.approx(estimate(board.setup).per_gpu["activations"] / GiB)


def test_turning_on_checkpointing_and_zero3_updates_chart_and_verdict_to_the_estimate():
    board = Dashboard(show_ladder=False)
    board.controls["zero_stage"].value = 3
    board.controls["activation_checkpointing"].value = True
    expected = estimate(setup_from_controls(board.values()))
    values = bar_values(board)
    for category, num_bytes in expected.per_gpu.items():
        assert values[category] == pytest.approx(num_bytes / GiB)
    assert values["peak (total)"] == pytest.approx(expected.total_bytes / GiB)
    assert expected.fits and "FITS" in board.verdict.value and "DOES NOT" not in board.verdict.value


def test_gpu_memory_line_moves_with_the_control():
    board = Dashboard(show_ladder=False)
    board.controls["gpu_memory_gb"].value = 80.0
    assert board.figure.layout.shapes[0].y0 == pytest.approx(80.0)


def test_an_invalid_combination_is_explained_and_clears_the_chart_until_it_is_valid_again():
    board = Dashboard()
    before = bar_values(board)
    board.controls["offload"].value = "optimizer+params"  # needs ZeRO-3, the board is at ZeRO-2
    assert "offloading parameters needs ZeRO-3" in board.verdict.value
    assert all(len(trace.y) == 0 for trace in board.figure.data) and not board.figure.layout.shapes
    assert board.ladder.value == ""  # no stale ladder of the last valid setup
    board.controls["offload"].value = "none"
    assert bar_values(board) == before and board.figure.layout.shapes[0].y0 == pytest.approx(40.0)
    assert "<td>yes</td>" in board.ladder.value


def test_ladder_ends_in_a_fit():
    board = Dashboard()
    assert board.ladder.value.count("<tr>") >= 3 and board.ladder.value.rstrip("</table>").endswith("<td>yes</td></tr")
