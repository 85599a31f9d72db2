"""Small helpers the lesson notebooks share, kept here so no notebook cell grows past a screen.

- ``without_overhead(breakdown)``: an estimate as a CPU step holds it, to put beside ``measure``.
- ``table(rows)``: a list of dicts shown as an HTML table in Jupyter and as aligned text elsewhere.
- ``short_run_plan`` / ``start_training`` / ``finish_training`` / ``run_training``: a real DeepSpeed run
  of a ``moekit.launch`` plan on this machine (GPUs, or CPU processes with gloo), its output kept in a
  file, its log and training-guard checks read back.
- ``seconds_per_step``: the wall time of real optimizer steps of a setup on the CPU (the recompute
  cost of activation checkpointing is measured with it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import json
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from moekit.breakdown import Breakdown
from moekit.distributed import free_port
from moekit.errors import MoekitError
from moekit.training_setup import TrainingSetup
from moekit.units import GiB, MiB

if TYPE_CHECKING:
    from moekit.launch import LaunchPlan



class LessonError(MoekitError):
    """A lesson step that could not run; the message carries what the failed command printed."""


def gib(num_bytes: float) -> float:
    """Bytes in GiB, rounded to 2 decimals for tables."""
    return round(num_bytes / GiB, 2)


def mib(num_bytes: float) -> float:
    """Bytes in MiB, rounded to 1 decimal for tables."""
    return round(num_bytes / MiB, 1)


def without_overhead(breakdown: Breakdown) -> Breakdown:
    """The breakdown without its ``overhead`` (CUDA context, allocator reserve): what a CPU step can be compared with.

    ``estimate`` always adds the CUDA context and the caching allocator's reserve; a measurement on the CPU has
    neither, so toy-scale charts put ``without_overhead(estimate(toy))`` beside ``measure(toy)``.
    """
    overhead = breakdown.per_gpu["overhead"]
    # The load phase's peak carries its own CUDA overhead and has no CPU counterpart: it is left out too.
    return dataclasses.replace(breakdown, per_gpu={**breakdown.per_gpu, "overhead": 0}, total_bytes=breakdown.total_bytes - overhead,
                               load_gpu_bytes=None)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class Table:
    """Rows under named columns: an HTML table in a notebook, aligned text in a terminal."""

    columns: list[str]
    rows: list[list]

    def __str__(self) -> str:
        cells = [self.columns] + [[_text(v) for v in row] for row in self.rows]
        widths = [max(len(str(row[i])) for row in cells) for i in range(len(self.columns))]
        lines = ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(v))}</td>" for v in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(rows: Sequence[dict]) -> Table:
    """A Table from dicts sharing their keys (the first row's keys are the columns)."""
    if not rows:
        raise LessonError("table() needs at least one row (a dict of column -> value).")
    columns = list(rows[0])
    return Table(columns, [[row.get(c, "") for c in columns] for row in rows])


# --------------------------------------------------------------------------------------------
# A real DeepSpeed run from a notebook
# --------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """A finished run: the launcher's exit code and output, the per-step log and the guard's checks."""

    run_dir: Path
    command: list[str]
    returncode: int
    seconds: float
    output: str
    log: list[dict] = field(default_factory=list)
    guard: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [record["loss"] for record in self.log]

    @property
    def peak_memory_bytes(self) -> int:
        """The largest per-rank memory the training script itself logged (RSS on CPU, allocator on CUDA)."""
        return max((record["memory_bytes"] for record in self.log), default=0)

    @property
    def moved(self) -> dict[str, bool]:
        """Per trainable group: did its weights change by the last guard check."""
        return dict(self.guard[-1]["moved"]) if self.guard else {}

    def check(self) -> TrainingRun:
        """Raise LessonError with the end of the launcher's output unless the run succeeded."""
        if self.returncode != 0 or not self.log:
            tail = "\n".join(self.output.strip().splitlines()[-30:])
            raise LessonError(f"the training run failed (exit code {self.returncode}); the end of its output:\n{tail}")
        return self


def short_run_plan(
    setup: TrainingSetup, run_dir: str | Path, *, steps: int = 8, lr: float | None = None, seed: int = 0, check_fit: bool = True,
    weights: str | Path | None = None, data: str | Path | None = None,
) -> LaunchPlan:
    """``moekit.launch.launch`` for a run of ``setup`` on a free port (a ``LaunchPlan``; nothing runs yet).

    weights: a local Hugging Face model folder (default: seeded random weights of the preset).
    data: a .txt or .jsonl file of training text (default: the bundled text).
    """
    from moekit.launch import launch
    from moekit.run_options import RunOptions

    train_args = RunOptions(steps=steps, lr=lr, seed=seed, weights=None if weights is None else str(weights),
                            data=None if data is None else str(data))
    return launch(setup, run_dir=run_dir, master_port=free_port(), train_args=train_args, check_fit=check_fit)


def require_weights(weights_dir: str | Path | None, model: str) -> Path:
    """The weights folder a real run needs, or a LessonError that says how to get it."""
    folder = Path(weights_dir).expanduser() if weights_dir else None
    if folder is None or not any(folder.glob("*.safetensors")):
        where = f"'{folder}' has no *.safetensors files" if folder else "WEIGHTS_DIR is not set"
        raise LessonError(
            f"a real fine-tune of {model} needs its weights on this machine: {where}. Download them (e.g. "
            f"`huggingface-cli download mistralai/Mixtral-8x7B-v0.1 --local-dir /data/mixtral`) and set WEIGHTS_DIR."
        )
    return folder


def training_env() -> dict[str, str]:
    """The launcher's environment; DeepSpeed's C++ ops are cached in the checkout's .cache as ``make`` does."""
    from moekit.distributed import launch_env

    env = launch_env()
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        env.setdefault("TORCH_EXTENSIONS_DIR", str(root / ".cache" / "torch_extensions"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


@dataclass
class StartedRun:
    """A run in progress: its plan, the launcher process (watch its pid) and the file its output goes to."""

    plan: LaunchPlan
    process: subprocess.Popen
    output_file: IO[str]
    started: float

    @property
    def pid(self) -> int:
        return self.process.pid


def start_training(plan: LaunchPlan) -> StartedRun:
    """Write the plan's files into a fresh run folder and start its ``deepspeed`` command (output to a file).

    The launcher's pid (``StartedRun.pid``) is what ``moekit.monitor.MemoryMonitor(pids=[...])`` watches.
    """
    if plan.run_dir.exists():
        shutil.rmtree(plan.run_dir)  # a fresh run: no checkpoint to resume from, no stale log
    plan.write()
    command = plan.deepspeed_argv() + ["--no-progress", "--no-resume"]
    output_file = open(plan.run_dir / "launcher.log", "w")  # closed by finish_training
    process = subprocess.Popen(command, env=training_env(), stdout=output_file, stderr=subprocess.STDOUT, text=True)
    return StartedRun(plan, process, output_file, time.monotonic())


def finish_training(run: StartedRun, *, timeout_s: float = 600) -> TrainingRun:
    """Wait for a run started by ``start_training`` (kill it after timeout_s) and read its log and guard checks."""
    from moekit.checkpoints import read_log

    try:
        run.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        run.process.kill()
        run.process.wait()
    finally:
        run.output_file.close()
    run_dir = run.plan.run_dir
    guard_path = run_dir / "guard.jsonl"
    guard = [json.loads(line) for line in guard_path.read_text().splitlines()] if guard_path.is_file() else []
    log = read_log(run_dir) if (run_dir / "log.jsonl").is_file() else []
    output = (run_dir / "launcher.log").read_text(errors="replace")
    return TrainingRun(run_dir, list(run.process.args), run.process.returncode, time.monotonic() - run.started, output, log, guard)


def run_training(plan: LaunchPlan, *, timeout_s: float = 600) -> TrainingRun:
    """Start the plan's DeepSpeed command here, wait for it, and return the checked run."""
    return finish_training(start_training(plan), timeout_s=timeout_s).check()


def demo_gpus() -> int:
    """Ranks for a demonstration run here: up to 2 GPUs when torch sees any, else 2 CPU processes."""
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


# --------------------------------------------------------------------------------------------
# A live chart of a run's ranks, with its steps marked
# --------------------------------------------------------------------------------------------


def rank_labels(labels: Sequence[str]) -> list[str]:
    """One series per training rank: the monitor labels helper processes with their parent's RANK too,
    so for each rank keep the first label seen (the rank process starts before its helpers)."""
    chosen: dict[str, str] = {}
    for label in labels:
        if label.startswith("rank "):
            chosen.setdefault(label.split()[1], label)
    return [chosen[rank] for rank in sorted(chosen, key=int)]


class StepClock:
    """A monitor listener that notes when each optimizer step ended: the time of the poll that first sees
    the step's line in the run's ``log.jsonl`` (so within one polling interval)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.log_path = Path(run_dir) / "log.jsonl"
        self.step_times: list[tuple[float, int]] = []

    def __call__(self, samples: Sequence) -> None:
        if not samples or not self.log_path.is_file():
            return
        num_steps = self.log_path.read_text().count("\n")
        while len(self.step_times) < num_steps:
            self.step_times.append((samples[-1].time_s, len(self.step_times) + 1))


def live_rank_chart(monitor, run_dir: str | Path, *, title: str = "Resident memory of each rank",
                    redraw_s: float = 1.0):
    """A plotly ``FigureWidget`` of the ranks only with the steps marked, and its clock.

    The clock sees every poll; the widget is redrawn at most every ``redraw_s`` seconds, since each redraw
    sends every sample so far to the browser (at every 0.1 s poll that grows with the square of the run
    and takes CPU from the ranks it watches). Show it with ``display(..., display_id=True)`` and replace
    it with ``rank_chart`` when the run ends, so a saved copy of the notebook keeps a plain figure instead
    of a widget's state.
    """
    import plotly.graph_objects as go

    from moekit.viz import monitor_figure

    clock = StepClock(run_dir)
    widget = go.FigureWidget(monitor_figure([], title=title))
    widget.update_layout(height=420, width=960)

    last_drawn = [float("-inf")]

    def redraw(latest: Sequence) -> None:
        clock(latest)
        if time.monotonic() - last_drawn[0] < redraw_s:
            return
        last_drawn[0] = time.monotonic()
        drawn = rank_chart(monitor.samples, clock, title=title)  # every sample so far (the lock is free here)
        with widget.batch_update():
            widget.data = ()
            widget.add_traces(drawn.data)
            widget.layout.shapes, widget.layout.annotations = drawn.layout.shapes, drawn.layout.annotations

    monitor.add_listener(redraw)
    return widget, clock


def rank_chart(samples: Sequence, clock: StepClock, *, title: str = "Resident memory of each rank"):
    """The ranks' memory over time with a dotted line at the end of each step (a plain plotly Figure).

    A process that has exited reads 0 bytes: those samples are left out, so a line ends where its rank did
    instead of dropping to zero as if it had crashed.
    """
    from moekit.viz import monitor_figure

    samples = [sample for sample in samples if sample.used_bytes > 0]
    labels = rank_labels(list(dict.fromkeys(sample.label for sample in samples)))
    figure = monitor_figure(samples, title=title, labels=labels or None, step_times=clock.step_times)
    figure.update_layout(height=420, width=960)
    return figure


@dataclass
class Answer:
    """A solution's printed answer, shown folded under a summary line (``answer``)."""

    text: str
    summary: str = "Show the answer"

    def _repr_html_(self) -> str:
        return f"<details><summary>{html.escape(self.summary)}</summary><pre>{html.escape(self.text)}</pre></details>"

    def __repr__(self) -> str:
        return self.text


@contextlib.contextmanager
def answer(summary: str = "Show the answer") -> Iterator[None]:
    """What a solution cell prints inside this block is shown folded, under ``summary``.

    JupyterLab unfolds a cell's outputs whenever it runs, so a collapsed solution cell alone would show its
    answer right under the exercise after Run All; an HTML ``<details>`` stays folded until clicked.
    """
    from IPython.display import display

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        yield
    display(Answer(printed.getvalue().rstrip("\n"), summary))


def static_image(figure, *, width: int = 960, height: int = 420):
    """A PNG of a plotly figure, for a notebook's saved copy (it shows on GitHub and in any viewer, where a
    live widget's state would be pages of numbers). plotly's kaleido draws it with a local Chrome or
    Chromium; where none is found the figure itself is returned, with one line saying how to get the PNG.
    """
    from IPython.display import Image

    try:
        return Image(figure.to_image(format="png", width=width, height=height))
    except Exception as err:  # kaleido finds no browser, or cannot start it
        print(f"no static image ({type(err).__name__}): showing the interactive figure; a PNG needs Chrome or "
              "Chromium (`apt-get install chromium`, or `plotly_get_chrome`)")
        return figure


# --------------------------------------------------------------------------------------------
# Time per training step
# --------------------------------------------------------------------------------------------


def seconds_per_step(setup: TrainingSetup, *, steps: int = 3, seed: int = 0, num_layers: int | None = None) -> float:
    """Median wall time of ``steps`` real optimizer steps (forward, backward, AdamW) of ``setup`` here.

    The model is built as the memory harness builds it (``moekit.step.build_for_training``: working
    dtype, LoRA, activation checkpointing); one warm-up step is not counted.
    """
    import torch

    from moekit.step import build_for_training

    model = build_for_training(setup, "cpu", num_layers=num_layers, seed=seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, model.config.vocab_size, (setup.micro_batch, setup.seq_len), generator=generator)
    times = []
    for _ in range(steps + 1):
        began = time.perf_counter()
        model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


__all__ = [
    "Answer", "GiB", "LessonError", "MiB", "StartedRun", "StepClock", "Table", "TrainingRun", "answer",
    "demo_gpus", "finish_training", "free_port", "gib", "live_rank_chart", "mib", "rank_chart", "rank_labels",
    "require_weights", "run_training", "seconds_per_step", "short_run_plan", "start_training", "static_image",
    "table", "training_env", "without_overhead",
]
