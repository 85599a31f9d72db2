"""Plotly figures carry exactly the numbers of the Breakdowns and samples they draw."""

import pytest

from moekit.breakdown import CATEGORIES, Breakdown, GiB
from moekit.monitor import MemorySample
from moekit.viz import CATEGORY_COLORS, PEAK_TRACE_NAME, FigureError, breakdown_figure, monitor_figure


def _breakdown(source: str, scale: int, total_bytes: int | None = None, gpu_memory_bytes: int | None = None) -> Breakdown:
    per_gpu = {category: (index + 1) * scale * 2**20 for index, category in enumerate(CATEGORIES)}
    return Breakdown(source=source, per_gpu=per_gpu, total_bytes=total_bytes, gpu_memory_bytes=gpu_memory_bytes)


def _traces(fig) -> dict:
    return {trace.name: trace for trace in fig.data}


def test_breakdown_bars_stack_every_category_in_gib_per_source():
    estimate = _breakdown("estimate", 100)
    measure = _breakdown("measure", 90, total_bytes=3 * GiB)
    traces = _traces(breakdown_figure([estimate, measure]))
    for category in CATEGORIES:
        assert list(traces[category].x) == ["estimate", "measure"]
        assert list(traces[category].y) == [estimate.per_gpu[category] / GiB, measure.per_gpu[category] / GiB]
    assert list(traces[PEAK_TRACE_NAME].y) == [estimate.total_bytes / GiB, 3.0]


def test_breakdown_colors_are_the_same_category_colors_in_every_figure():
    first = _traces(breakdown_figure([_breakdown("estimate", 1)]))
    second = _traces(breakdown_figure({"a": _breakdown("simulate", 5), "b": _breakdown("measure", 7)}))
    for category in CATEGORIES:
        assert first[category].marker.color == second[category].marker.color == CATEGORY_COLORS[category]


def test_breakdown_figure_stacks_and_draws_the_gpu_memory_line():
    fig = breakdown_figure([_breakdown("estimate", 1000)], gpu_memory_bytes=40 * GiB)  # a 27 GiB stack
    assert fig.layout.barmode == "stack"
    (line,) = fig.layout.shapes
    assert (line.y0, line.y1, line.line.dash) == (40.0, 40.0, "dash")
    assert fig.layout.yaxis.range[1] == pytest.approx(40 * 1.08)


def test_a_toy_chart_speaks_mib_and_leaves_off_a_card_its_bars_cannot_reach():
    toy = _breakdown("measure", 10, gpu_memory_bytes=40 * GiB)  # 280 MiB of bars under a 40 GiB card
    fig = breakdown_figure([toy])
    assert fig.layout.yaxis.title.text == "MiB per GPU" and not fig.layout.shapes
    assert list(_traces(fig)["weights"].y) == [10.0]
    assert "off this chart, 146x the tallest bar" in fig.layout.annotations[0].text
    assert _tallest_share(fig) > 0.9


def test_a_toy_budget_the_bars_reach_is_drawn_in_mib():
    fig = breakdown_figure([_breakdown("measure", 10)], gpu_memory_bytes=300 * 2**20)
    (line,) = fig.layout.shapes
    assert line.y0 == 300.0 and _tallest_share(fig) > 0.85


def _tallest_share(fig) -> float:
    """The tallest stacked bar as a share of the y range (the rule every lesson figure keeps)."""
    bars = [t for t in fig.data if t.type == "bar"]
    tallest = max(sum(t.y[i] for t in bars) for i in range(len(bars[0].y)))
    low, high = fig.layout.yaxis.range
    return tallest / (high - low)


def test_gpu_memory_line_defaults_to_the_breakdowns_own_gpu_size():
    on_80 = _breakdown("estimate", 1000, gpu_memory_bytes=80 * GiB)
    fig = breakdown_figure([on_80, _breakdown("measure", 900, gpu_memory_bytes=80 * GiB)])
    assert [shape.y0 for shape in fig.layout.shapes] == [80.0]
    no_line = breakdown_figure([on_80, _breakdown("measure", 900, gpu_memory_bytes=40 * GiB)])
    assert not no_line.layout.shapes


def test_pair_labels_give_grouped_bars_on_a_two_level_axis():
    fig = breakdown_figure({("seq 2048", "estimate"): _breakdown("estimate", 1), ("seq 2048", "measure"): _breakdown("measure", 2)})
    weights = _traces(fig)["weights"]
    assert [list(level) for level in weights.x] == [["seq 2048", "seq 2048"], ["estimate", "measure"]]


def test_repeated_sources_get_distinct_bars():
    traces = _traces(breakdown_figure([_breakdown("measure", 1), _breakdown("measure", 2)]))
    assert list(traces["weights"].x) == ["measure", "measure #2"]


def test_empty_or_mixed_labels_are_refused_with_advice():
    with pytest.raises(FigureError, match="at least one Breakdown"):
        breakdown_figure([])
    with pytest.raises(FigureError, match="label every bar the same way"):
        breakdown_figure({"a": _breakdown("estimate", 1), ("g", "b"): _breakdown("measure", 1)})


def test_monitor_figure_has_one_line_per_gpu_and_the_capacity_line():
    samples = [
        MemorySample(0.0, "GPU 0", 10 * GiB, 40 * GiB, "gpu"),
        MemorySample(0.0, "GPU 1", 12 * GiB, 40 * GiB, "gpu"),
        MemorySample(0.5, "GPU 0", 20 * GiB, 40 * GiB, "gpu"),
        MemorySample(0.5, "GPU 1", 22 * GiB, 40 * GiB, "gpu"),
    ]
    fig = monitor_figure(samples)
    traces = _traces(fig)
    assert list(traces) == ["GPU 0", "GPU 1"]
    assert list(traces["GPU 0"].x) == [0.0, 0.5] and list(traces["GPU 0"].y) == [10.0, 20.0]
    assert list(traces["GPU 1"].y) == [12.0, 22.0]
    assert [shape.y0 for shape in fig.layout.shapes] == [40.0]


def test_monitor_figure_of_processes_has_no_host_ram_line():
    fig = monitor_figure([MemorySample(0.0, "pid 1 (python)", GiB // 2, 64 * GiB, "process")])
    assert list(_traces(fig)["pid 1 (python)"].y) == [0.5]
    assert not fig.layout.shapes


def test_ladder_figure_has_one_bar_per_rung_equal_to_the_estimates():
    from moekit.plan import ladder
    from moekit.training_setup import TrainingSetup
    from moekit.viz import ladder_figure

    rungs = ladder(TrainingSetup(seq_len=12288, precision="fp16"))
    figure = ladder_figure(rungs)
    activations = next(t for t in figure.data if t.name == "activations")
    assert len(activations.y) == len(rungs)
    assert activations.y[-1] * 2**30 == pytest.approx(rungs[-1].breakdown.per_gpu["activations"])


def test_sweep_figure_follows_the_estimate():
    from moekit.estimate import estimate, sweep
    from moekit.training_setup import TrainingSetup
    from moekit.viz import sweep_figure

    # ZeRO-2: under ZeRO-3 without checkpointing every layer also keeps its gathered experts (a sequence-free
    # 87 GiB on Mixtral 8x7B, issue 14), so the activations would not scale with the tokens
    setup = TrainingSetup(method="full", zero_stage=2)
    breakdowns = sweep(setup, seq_len=[1024, 8192])
    figure = sweep_figure([1024, 8192], breakdowns, knob="seq_len")
    activations = next(t for t in figure.data if t.name == "activations")
    assert activations.y[1] * 2**30 == pytest.approx(estimate(setup.replace(seq_len=8192)).per_gpu["activations"])
    assert activations.y[1] > 7 * activations.y[0]


def test_the_readability_rule_flags_toy_bars_under_a_card_sized_axis_and_passes_moekit_figures():
    import json

    import plotly.graph_objects as go
    import plotly.io as pio

    from moekit.viz import readability_problem, tallest_share

    flat = go.Figure(go.Bar(y=[0.3]), layout={"title": {"text": "toy"}, "yaxis": {"range": [0, 40]}})
    assert readability_problem(flat) == "'toy': the tallest bar is 1% of the y range (at least 25% needed)"
    drawn = breakdown_figure([_breakdown("measure", 10, gpu_memory_bytes=40 * GiB)])
    as_in_a_notebook = json.loads(pio.to_json(drawn))  # what nbval reads back from a cell's output
    assert readability_problem(as_in_a_notebook) is None and tallest_share(as_in_a_notebook) > 0.9


def test_notebook_figure_check_reads_plotly_outputs_of_a_cell():
    import importlib.util
    from pathlib import Path

    import plotly.graph_objects as go

    path = Path(__file__).resolve().parents[1] / "notebooks" / "conftest.py"
    spec = importlib.util.spec_from_file_location("notebook_conftest", path)
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    flat = go.Figure(go.Bar(y=[0.3]), layout={"title": {"text": "toy"}, "yaxis": {"range": [0, 40]}}).to_plotly_json()
    outputs = [{"name": "stdout", "text": "hi"}, {"data": {conftest.PLOTLY_MIME: flat}}]
    assert conftest.figure_problems(outputs) == ["'toy': the tallest bar is 1% of the y range (at least 25% needed)"]
