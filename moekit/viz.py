"""Plotly figures: memory breakdowns side by side, and memory over time.

Every figure is a plain ``plotly.graph_objects.Figure`` built only from moekit's own results
(``Breakdown``, ``MemorySample``), so a notebook shows it and a test can read its data back.
Each figure has its own section below; add new figures as new sections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from moekit.breakdown import CATEGORIES, Breakdown
from moekit.errors import MoekitError
from moekit.monitor import MemoryMonitor, MemorySample, samples_by_label
from moekit.units import GiB, MiB

#: One color per category, the same in every figure (plotly's default qualitative palette).
CATEGORY_COLORS: dict[str, str] = {
    "weights": "#636EFA",
    "gradients": "#EF553B",
    "optimizer_states": "#00CC96",
    "activations": "#AB63FA",
    "temporaries": "#FFA15A",
    "buffers": "#19D3F3",
    "overhead": "#B6B6B6",
}

PEAK_TRACE_NAME = "peak (total)"


class FigureError(MoekitError):
    """Input a figure cannot draw; the message says what to pass instead."""


def _gib(num_bytes: float) -> float:
    return num_bytes / GiB


@dataclass(frozen=True)
class Scale:
    """The unit a memory chart speaks in: MiB when its bars are below a GiB (a toy), else GiB."""

    name: str
    num_bytes: int

    def of(self, num_bytes: float) -> float:
        return num_bytes / self.num_bytes


GIB_SCALE, MIB_SCALE = Scale("GiB", GiB), Scale("MiB", MiB)

#: A capacity line is drawn only where the tallest bar reaches at least this share of the y range;
#: a 40 GB card above 0.3 GiB of toy bars would flatten them to nothing.
MIN_TALLEST_SHARE = 0.25
#: Head room above the tallest mark (bar, peak marker or capacity line), as a share of it.
Y_PADDING = 0.08


def scale_for(tallest_bytes: float) -> Scale:
    """MiB for a chart whose tallest bar is under 1 GiB, else GiB."""
    return MIB_SCALE if tallest_bytes < GiB else GIB_SCALE


def _capacity_line_fits(tallest_bytes: float, capacity_bytes: int) -> bool:
    """Whether a line at ``capacity_bytes`` leaves the tallest bar at least MIN_TALLEST_SHARE of the range."""
    return tallest_bytes * (1 + Y_PADDING) >= MIN_TALLEST_SHARE * capacity_bytes * (1 + Y_PADDING)


def _add_gpu_memory_line(fig: go.Figure, gpu_memory_bytes: int, tallest_bytes: float, scale: Scale) -> float:
    """The card's capacity as a dashed red line, the one every memory chart draws, and the y range's top.

    When the card is far above the bars (a toy step under a full-size card), no line is drawn: a note
    at the top of the chart says how far off the chart the card is, so the bars stay readable.
    """
    shown = _gib(gpu_memory_bytes) if gpu_memory_bytes >= GiB else gpu_memory_bytes / MiB
    label = f"GPU memory {shown:,.4g} {'GiB' if gpu_memory_bytes >= GiB else 'MiB'}"
    if _capacity_line_fits(tallest_bytes, gpu_memory_bytes):
        fig.add_hline(
            y=scale.of(gpu_memory_bytes),
            line_dash="dash",
            line_color="red",
            annotation_text=label,
            annotation_position="top left",
        )
        return max(tallest_bytes, gpu_memory_bytes)
    times = gpu_memory_bytes / tallest_bytes if tallest_bytes else float("inf")
    fig.add_annotation(
        text=f"{label}: off this chart, {times:,.0f}x the tallest bar",
        xref="paper", yref="paper", x=0, y=1, xanchor="left", yanchor="bottom", showarrow=False,
        font={"color": "red"},
    )
    return tallest_bytes


def _set_y_range(fig: go.Figure, top_bytes: float, scale: Scale) -> None:
    """A y axis from 0 to just above the tallest mark, so the tallest bar is most of the chart."""
    fig.update_yaxes(range=[0, scale.of(top_bytes) * (1 + Y_PADDING) or 1])


# --------------------------------------------------------------------------------------------
# Breakdowns: estimate vs simulate vs measure, as stacked bars
# --------------------------------------------------------------------------------------------

BarLabel = str | tuple[str, str]


def _labelled(breakdowns: Sequence[Breakdown] | Mapping[BarLabel, Breakdown]) -> list[tuple[BarLabel, Breakdown]]:
    """(label, breakdown) pairs: a mapping keeps its keys, a list is labelled by each source."""
    if isinstance(breakdowns, Mapping):
        pairs = list(breakdowns.items())
    else:
        pairs = []
        seen: dict[str, int] = {}
        for breakdown in breakdowns:
            seen[breakdown.source] = seen.get(breakdown.source, 0) + 1
            label = breakdown.source if seen[breakdown.source] == 1 else f"{breakdown.source} #{seen[breakdown.source]}"
            pairs.append((label, breakdown))
    if not pairs:
        raise FigureError("breakdown_figure needs at least one Breakdown, e.g. [estimate(setup), measure(setup)].")
    grouped = [isinstance(label, tuple) for label, _ in pairs]
    if any(grouped) and not all(grouped):
        raise FigureError("label every bar the same way: all strings, or all (group, bar) pairs such as ('seq 4096', 'estimate').")
    return pairs


def _x_axis(labels: list[BarLabel]) -> list:
    """Plain labels, or plotly's two-level (multicategory) axis for (group, bar) pairs."""
    if labels and isinstance(labels[0], tuple):
        return [[label[0] for label in labels], [label[1] for label in labels]]
    return list(labels)


def _common_gpu_memory(breakdowns: list[Breakdown]) -> int | None:
    sizes = {b.gpu_memory_bytes for b in breakdowns if b.gpu_memory_bytes is not None}
    return sizes.pop() if len(sizes) == 1 else None


def breakdown_figure(
    breakdowns: Sequence[Breakdown] | Mapping[BarLabel, Breakdown],
    gpu_memory_bytes: int | None = None,
    *,
    title: str = "Memory per GPU by category",
) -> go.Figure:
    """One stacked bar per breakdown (stacks: ``CATEGORIES``), a peak marker, and the GPU's memory.

    breakdowns: a list (bars labelled by source: estimate, simulate, measure) or a mapping from
      label to Breakdown; labels that are (group, bar) pairs, e.g. ``("seq 4096", "measure")``,
      give grouped stacked bars.
    gpu_memory_bytes: where to draw the dashed GPU-memory line; default: the breakdowns' own
      ``gpu_memory_bytes`` when they agree, else no line.
    The peak marker shows ``total_bytes``, which is not always the sum of the stack (temporaries of
    backward and of the optimizer step are not alive at once).
    """
    pairs = _labelled(breakdowns)
    labels = [label for label, _ in pairs]
    x = _x_axis(labels)
    tallest_bytes = max(max(b.total_bytes, sum(b.per_gpu[c] for c in CATEGORIES)) for _, b in pairs)
    scale = scale_for(tallest_bytes)
    fig = go.Figure()
    for category in CATEGORIES:
        values = [scale.of(b.per_gpu[category]) for _, b in pairs]
        fig.add_trace(
            go.Bar(
                name=category,
                x=x,
                y=values,
                marker_color=CATEGORY_COLORS[category],
                hovertemplate=f"{category}: %{{y:.2f}} {scale.name}<extra></extra>",
            )
        )
    fig.add_trace(
        go.Scatter(
            name=PEAK_TRACE_NAME,
            x=x,
            y=[scale.of(b.total_bytes) for _, b in pairs],
            mode="markers",
            marker={"symbol": "line-ew-open", "size": 28, "color": "black", "line": {"width": 3}},
            hovertemplate=f"peak: %{{y:.2f}} {scale.name}<extra></extra>",
        )
    )
    line_bytes = gpu_memory_bytes if gpu_memory_bytes is not None else _common_gpu_memory([b for _, b in pairs])
    top_bytes = tallest_bytes if line_bytes is None else _add_gpu_memory_line(fig, line_bytes, tallest_bytes, scale)
    _set_y_range(fig, top_bytes, scale)
    fig.update_layout(barmode="stack", title=title, yaxis_title=f"{scale.name} per GPU", legend_traceorder="normal")
    return fig


# --------------------------------------------------------------------------------------------
# Memory over time: the live monitor's samples
# --------------------------------------------------------------------------------------------


def monitor_figure(
    samples: Sequence[MemorySample], *, title: str = "Memory in use", labels: Sequence[str] | None = None,
    step_times: Sequence[tuple[float, int]] = (),
) -> go.Figure:
    """One line per GPU (or process) of used GiB over time; dashed lines at each GPU's capacity.

    The capacity lines are drawn for GPU samples only: for processes, the total is the host's RAM,
    which would flatten the lines that matter.
    labels: draw only these series (e.g. the training ranks, without the helper processes they start).
    step_times: (seconds, step) pairs: a dotted vertical line where each optimizer step ended.
    """
    series = samples_by_label(samples)
    if labels is not None:
        series = {label: series[label] for label in labels if label in series}
    tallest_bytes = max((p.used_bytes for points in series.values() for p in points), default=0)
    fig = go.Figure()
    capacities: set[int] = set()
    for label, points in series.items():
        fig.add_trace(
            go.Scatter(
                name=label,
                x=[p.time_s for p in points],
                y=[_gib(p.used_bytes) for p in points],  # GiB always: moekit.monitor's live updates add GiB
                mode="lines",
                hovertemplate=f"{label}: %{{y:.2f}} GiB at %{{x:.1f}} s<extra></extra>",
            )
        )
        if points[-1].kind == "gpu":
            capacities.add(points[-1].total_bytes)
    for total_bytes in sorted(capacities):
        _add_gpu_memory_line(fig, total_bytes, tallest_bytes, GIB_SCALE)
    for time_s, step in step_times:
        fig.add_vline(x=time_s, line_dash="dot", line_color="#888", line_width=1,
                      annotation_text=str(step) if step == 1 or step % 5 == 0 else "", annotation_position="top")
    # The y axis follows the data (a live chart grows); a line far above the data is left off as in every chart.
    fig.update_layout(title=title, xaxis_title="seconds (dotted: an optimizer step ends)" if step_times else "seconds",
                      yaxis_title="GiB", yaxis_rangemode="tozero", legend={"orientation": "h", "y": -0.25})
    return fig


#: Points per line sent to a live chart; the oldest are dropped so updates stay small.
LIVE_POINTS = 2_000


def live_monitor_figure(monitor: MemoryMonitor) -> go.FigureWidget:
    """A plotly ``FigureWidget`` that the monitor's thread updates after every poll (notebooks)."""
    widget = go.FigureWidget(monitor_figure(monitor.samples))
    monitor.add_listener(lambda _samples: update_live_figure(widget, monitor.samples))
    return widget


def update_live_figure(widget: go.FigureWidget, samples: Sequence[MemorySample]) -> None:
    """Refresh a live chart's lines with the latest samples (adds a line for a new GPU or process)."""
    with widget.batch_update():
        traces = {trace.name: trace for trace in widget.data}
        for label, points in samples_by_label(samples).items():
            points = points[-LIVE_POINTS:]
            x = [p.time_s for p in points]
            y = [_gib(p.used_bytes) for p in points]
            if label in traces:
                traces[label].x, traces[label].y = x, y
            else:
                widget.add_scatter(name=label, x=x, y=y, mode="lines")


# --------------------------------------------------------------------------------------------
# The planner's ladder: one stacked bar per rung
# --------------------------------------------------------------------------------------------


def ladder_figure(rungs: Sequence, *, title: str = "One mitigation at a time") -> go.Figure:
    """Stacked bars per rung of ``moekit.plan.ladder`` with the GPU-memory line: where the bytes go as
    each knob is turned, and the rung where the run first fits."""
    if not rungs:
        raise FigureError("ladder_figure needs the rungs of moekit.plan.ladder(setup).")
    labels = [f"{i}. {rung.change}" for i, rung in enumerate(rungs)]
    return breakdown_figure(dict(zip(labels, (rung.breakdown for rung in rungs))), title=title)


# --------------------------------------------------------------------------------------------
# A knob swept: one stacked bar per value
# --------------------------------------------------------------------------------------------


def sweep_figure(values: Sequence, breakdowns: Sequence[Breakdown], *, knob: str, title: str | None = None) -> go.Figure:
    """Stacked bars of estimates over the values of one knob (e.g. sequence length)."""
    if len(values) != len(breakdowns) or not values:
        raise FigureError("sweep_figure needs one Breakdown per value, e.g. from moekit.estimate.sweep(setup, seq_len=[...]).")
    labelled = {f"{knob}={value}": breakdown for value, breakdown in zip(values, breakdowns)}
    return breakdown_figure(labelled, title=title or f"Memory per GPU as {knob} changes")


# --------------------------------------------------------------------------------------------
# One category against a numeric knob, with its fitted straight line
# --------------------------------------------------------------------------------------------


def line_fit_figure(
    values: Sequence[float], measured_bytes: Sequence[float], *, slope_bytes: float, intercept_bytes: float,
    knob: str, what: str = "activations", title: str | None = None,
) -> go.Figure:
    """Points of one category on a numeric axis, and the line ``intercept + slope x value`` drawn from 0.

    The line starts at the knob's zero, so its intercept (what does not shrink with the knob) is visible.
    """
    if len(values) != len(measured_bytes) or not values:
        raise FigureError("line_fit_figure needs one byte count per value, e.g. activations per seq_len.")
    fitted_at = [0, max(values)]
    fitted = [intercept_bytes + slope_bytes * value for value in fitted_at]
    tallest_bytes = max([*measured_bytes, *fitted])
    scale = scale_for(tallest_bytes)
    fig = go.Figure()
    fig.add_trace(go.Scatter(name=what, x=list(values), y=[scale.of(b) for b in measured_bytes], mode="markers",
                             marker={"size": 10, "color": CATEGORY_COLORS.get(what, "black")},
                             hovertemplate=f"{knob}=%{{x}}: %{{y:.2f}} {scale.name}<extra></extra>"))
    fig.add_trace(go.Scatter(name=f"fit: {scale.of(intercept_bytes):.2f} {scale.name} + {slope_bytes / MiB:.3f} MiB x {knob}",
                             x=fitted_at, y=[scale.of(b) for b in fitted], mode="lines", line={"dash": "dash", "color": "black"}))
    fig.add_annotation(x=0, y=scale.of(intercept_bytes), text=f"intercept {scale.of(intercept_bytes):.2f} {scale.name}",
                       showarrow=True, arrowhead=2, ax=60, ay=-30)
    _set_y_range(fig, tallest_bytes, scale)
    fig.update_layout(title=title or f"{what} as {knob} grows", xaxis_title=knob, yaxis_title=f"{scale.name} per GPU",
                      xaxis_rangemode="tozero", legend={"x": 0.01, "y": 0.99})
    return fig


# --------------------------------------------------------------------------------------------
# Gradient magnitudes on a log axis, with what each 16-bit format can hold
# --------------------------------------------------------------------------------------------

#: What a 16-bit format holds: (smallest subnormal, smallest normal, largest), from torch.finfo.
FormatRange = tuple[float, float, float]


def magnitude_histogram_figure(
    magnitudes: Sequence[float], formats: Mapping[str, FormatRange], *, bins_per_decade: int = 4,
    title: str = "Gradient magnitudes",
) -> go.Figure:
    """A histogram of |values| on a log axis, with each format's subnormal band and normal range marked.

    Below a format's smallest subnormal a value becomes zero; between its smallest subnormal and its
    smallest normal it keeps fewer significant bits; above its largest it overflows to inf.
    """
    import math

    import numpy as np

    positive = np.asarray(magnitudes, dtype=np.float64)
    positive = positive[positive > 0]
    if positive.size == 0:
        raise FigureError("magnitude_histogram_figure needs nonzero magnitudes, e.g. grads[grads != 0].abs().")
    decades = np.log10(positive)
    low = math.floor(decades.min() * bins_per_decade)
    high = math.ceil(decades.max() * bins_per_decade) + 1
    counts, _ = np.histogram(decades, bins=[i / bins_per_decade for i in range(low, high + 1)])
    edges = [10 ** (i / bins_per_decade) for i in range(low, high + 1)]
    centers = [math.sqrt(a * b) for a, b in zip(edges, edges[1:])]
    shares = [100 * float(c) / positive.size for c in counts]
    fig = go.Figure(go.Bar(x=centers, y=shares, width=[b - a for a, b in zip(edges, edges[1:])], name="gradients",
                           marker_color=CATEGORY_COLORS["gradients"],
                           hovertemplate="|g| ~ %{x:.1e}: %{y:.2f}%<extra></extra>"))
    colors = ["#FFA15A", "#19D3F3", "#AB63FA"]
    notes = []
    for (name, (subnormal, normal, largest)), color in zip(formats.items(), colors):
        if normal <= edges[0] and largest >= edges[-1]:
            notes.append(f"{name} holds every value here as a normal number ({normal:.0e} to {largest:.0e})")
            continue
        fig.add_vrect(x0=subnormal, x1=normal, fillcolor=color, opacity=0.15, line_width=0,
                      annotation_text=f"{name} subnormal", annotation_position="top left")
        for x, what in ((subnormal, "zero below"), (normal, "smallest normal"), (largest, "inf above")):
            if edges[0] <= x <= edges[-1]:
                fig.add_vline(x=x, line_dash="dot", line_color=color,
                              annotation_text=f"{name} {what} {x:.0e}", annotation_textangle=-90)
    if notes:
        fig.add_annotation(text="; ".join(notes), xref="paper", yref="paper", x=1, y=1, xanchor="right",
                           yanchor="bottom", showarrow=False)
    _set_y_range(fig, max(shares), Scale("%", 1))
    fig.update_xaxes(type="log", range=[math.log10(edges[0]), math.log10(edges[-1])], title="|gradient|")
    fig.update_layout(title=title, yaxis_title="% of nonzero gradients", bargap=0, showlegend=False)
    return fig


# --------------------------------------------------------------------------------------------
# The readability rule every lesson figure keeps (checked on every executed notebook)
# --------------------------------------------------------------------------------------------


def tallest_share(figure: go.Figure | Mapping) -> float | None:
    """The tallest bar (stacked bars summed per x) or line point as a share of the y axis range.

    ``figure``: a Figure or its plotly JSON (a notebook's ``application/vnd.plotly.v1+json`` output).
    None for a figure with nothing to measure (no numeric y, or no fixed y range).
    """
    data = figure.to_plotly_json() if isinstance(figure, go.Figure) else figure
    traces = data.get("data", [])
    y_range = data.get("layout", {}).get("yaxis", {}).get("range")
    stacks: dict[int, float] = {}
    tallest = 0.0
    for trace in traces:
        values = [v for v in (trace.get("y") or []) if isinstance(v, int | float)]
        if trace.get("type") == "bar":
            for i, value in enumerate(values):
                stacks[i] = stacks.get(i, 0.0) + max(value, 0.0)
        elif values:
            tallest = max(tallest, max(values))
    tallest = max([tallest, *stacks.values()])
    if not y_range or tallest <= 0:
        return None
    return tallest / (y_range[1] - y_range[0])


def readability_problem(figure: go.Figure | Mapping) -> str | None:
    """Why a memory figure is unreadable (its tallest bar under MIN_TALLEST_SHARE of the y range), or None."""
    share = tallest_share(figure)
    if share is not None and share < MIN_TALLEST_SHARE:
        data = figure.to_plotly_json() if isinstance(figure, go.Figure) else figure
        title = data.get("layout", {}).get("title", {}).get("text", "a figure")
        return f"'{title}': the tallest bar is {share:.0%} of the y range (at least {MIN_TALLEST_SHARE:.0%} needed)"
    return None
