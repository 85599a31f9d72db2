"""ipywidgets dashboards: every knob of a TrainingSetup as a control, the estimate as a live chart.

The callbacks are plain methods (``Dashboard.refresh``) that only call ``estimate`` and ``ladder``, so
tests can set a control's value and read the figure's data back.
"""

from __future__ import annotations

import html
from dataclasses import fields

import ipywidgets as w
import plotly.graph_objects as go

from moekit.breakdown import Breakdown
from moekit.errors import MoekitError
from moekit.estimate import estimate
from moekit.models import list_presets
from moekit.plan import ladder
from moekit.training_setup import ATTENTIONS, OFFLOADS, PRECISIONS, LoraSpec, TrainingSetup
from moekit.units import GiB
from moekit.viz import breakdown_figure

#: LoRA target choices offered in the dashboard (label -> targets).
TARGET_CHOICES = {
    "attention + experts": ("attention", "experts"),
    "attention only": ("attention",),
    "experts only": ("experts",),
    "all-linear": ("all-linear",),
}


def build_controls(setup: TrainingSetup) -> dict[str, w.ValueWidget]:
    """One control per knob, starting at the setup's values (keys are TrainingSetup field names)."""
    style = {"description_width": "150px"}
    layout = w.Layout(width="420px")
    toggle_style = {**style, "button_width": "64px"}  # narrow buttons keep a row of choices on one line

    def toggles(options, value, description):
        return w.ToggleButtons(options=options, value=value, description=description, style=toggle_style)

    def dropdown(options, value, description):
        return w.Dropdown(options=options, value=value, description=description, style=style, layout=layout)

    def slider(options, value, description):
        return w.SelectionSlider(options=options, value=value, description=description, style=style, layout=layout)

    def integer(value, maximum, description):
        return w.BoundedIntText(value=value, min=1, max=maximum, description=description, style=style, layout=layout)

    targets_label = next((k for k, v in TARGET_CHOICES.items() if v == setup.lora.targets), "attention + experts")
    return {
        "model": dropdown([p for p in list_presets()], setup.model, "model"),
        "method": toggles(["full", "lora", "qlora"], setup.method, "method"),
        "lora_r": slider(sorted({4, 8, 16, 32, 64, 128, setup.lora.r}), setup.lora.r, "LoRA rank r"),
        "lora_targets": dropdown(list(TARGET_CHOICES), targets_label, "LoRA targets"),
        "precision": toggles(list(PRECISIONS), setup.precision, "precision"),
        "zero_stage": toggles([0, 1, 2, 3], setup.zero_stage, "ZeRO stage"),
        "offload": dropdown(list(OFFLOADS), setup.offload, "offload"),
        "gpus_per_node": integer(setup.gpus_per_node, 64, "GPUs per node"),
        "num_nodes": integer(setup.num_nodes, 256, "nodes"),
        "gpu_memory_gb": dropdown([16.0, 24.0, 40.0, 48.0, 80.0, 96.0, 141.0], setup.gpu_memory_gb, "GPU memory (GB)"),
        "seq_len": slider(sorted({512, 1024, 2048, 4096, 8192, 11000, 12288, 16384, 32768, setup.seq_len}), setup.seq_len, "sequence"),
        "micro_batch": slider(sorted({1, 2, 4, 8, 16, setup.micro_batch}), setup.micro_batch, "micro-batch"),
        "grad_accum": integer(setup.grad_accum, 1024, "grad accumulation"),
        "activation_checkpointing": w.Checkbox(
            value=setup.activation_checkpointing, description="activation checkpointing", style=style, layout=layout
        ),
        "attn_implementation": dropdown(list(ATTENTIONS), setup.attn_implementation, "attention"),
    }


def setup_from_controls(values: dict) -> TrainingSetup:
    """The TrainingSetup the controls describe (raises SetupError for an invalid combination)."""
    names = {f.name for f in fields(TrainingSetup)}
    kwargs = {k: v for k, v in values.items() if k in names}
    r = int(values.get("lora_r", 16))
    targets = TARGET_CHOICES[values.get("lora_targets", "attention + experts")]
    return TrainingSetup(lora=LoraSpec(r=r, alpha=2 * r, targets=targets), **kwargs)


def verdict_html(setup: TrainingSetup, breakdown: Breakdown) -> str:
    """The fit verdict in one line of HTML: fits or not, headroom, and the largest category."""
    headroom = breakdown.headroom_bytes / GiB
    color, word = ("green", "FITS") if breakdown.fits else ("red", "DOES NOT FIT")
    return (
        f"<b style='color:{color}'>{word}</b>: peak {breakdown.total_bytes / GiB:.1f} GiB of "
        f"{setup.gpu_memory_gb:.4g} GB per GPU, headroom {headroom:+.1f} GiB; "
        f"largest: <b>{breakdown.largest_category()}</b> ({breakdown.per_gpu[breakdown.largest_category()] / GiB:.1f} GiB)"
    )


def ladder_html(setup: TrainingSetup) -> str:
    """The planner's ladder from this setup as a small HTML table."""
    rows = ["<tr><th align='left'>change</th><th>GiB/GPU</th><th>saved</th><th>fits</th></tr>"]
    for rung in ladder(setup):
        rows.append(
            f"<tr><td>{html.escape(rung.description if rung.change != 'baseline' else 'your setup')}</td>"
            f"<td align='right'>{rung.breakdown.total_bytes / GiB:.1f}</td>"
            f"<td align='right'>{rung.saved_bytes / GiB:.1f}</td><td>{'yes' if rung.fits else 'no'}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _figure(breakdown: Breakdown) -> go.Figure:
    return breakdown_figure({"estimate": breakdown}, title="Estimated memory per GPU")


class Dashboard:
    """Knobs on the left, the estimate as a stacked bar on the right, the verdict and the ladder below."""

    def __init__(self, setup: TrainingSetup | None = None, *, show_ladder: bool = True) -> None:
        self.setup = setup or TrainingSetup(seq_len=12288, precision="fp16")
        self.controls = build_controls(self.setup)
        self.breakdown = estimate(self.setup)
        self.figure = go.FigureWidget(_figure(self.breakdown))
        self.verdict = w.HTML(verdict_html(self.setup, self.breakdown))
        self.ladder = w.HTML(ladder_html(self.setup) if show_ladder else "")
        self.show_ladder = show_ladder
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.widget = w.VBox([w.HBox([w.VBox(list(self.controls.values())), self.figure]), self.verdict, self.ladder])

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def _on_change(self, _change: dict) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-estimate from the controls and update the chart, the verdict and the ladder in place.

        An invalid combination clears the chart and the ladder (nothing stale stays on screen) and says why.
        """
        try:
            setup = setup_from_controls(self.values())
        except MoekitError as err:
            self.verdict.value = f"<b style='color:orange'>invalid setup</b>: {html.escape(str(err))}"
            with self.figure.batch_update():
                for trace in self.figure.data:
                    trace.y = []
                self.figure.layout.shapes, self.figure.layout.annotations = (), ()
            self.ladder.value = ""
            return
        self.setup, self.breakdown = setup, estimate(setup)
        drawn = _figure(self.breakdown)
        with self.figure.batch_update():
            for trace, new in zip(self.figure.data, drawn.data):
                trace.y = new.y
                trace.hovertemplate = new.hovertemplate
            self.figure.layout.shapes, self.figure.layout.annotations = drawn.layout.shapes, drawn.layout.annotations
            self.figure.layout.yaxis.range, self.figure.layout.yaxis.title = drawn.layout.yaxis.range, drawn.layout.yaxis.title
        self.verdict.value = verdict_html(setup, self.breakdown)
        if self.show_ladder:
            self.ladder.value = ladder_html(setup)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def dashboard(setup: TrainingSetup | None = None) -> Dashboard:
    """The knob dashboard of lesson 09; display it as the last expression of a cell."""
    return Dashboard(setup)
