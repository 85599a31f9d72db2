"""The lessons' shared helpers: tables, estimates without CUDA overhead, and running a launch plan here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from moekit.estimate import estimate
from moekit.lessons import (
    LessonError,
    finish_training,
    gib,
    mib,
    seconds_per_step,
    short_run_plan,
    start_training,
    table,
    training_env,
    without_overhead,
)
from moekit.training_setup import TrainingSetup

REPO = Path(__file__).resolve().parents[1]


def test_table_aligns_text_and_escapes_html():
    shown = table([{"name": "a<b", "count": 1234, "share": 0.5, "fits": True}, {"name": "c", "count": 5, "share": 12.25, "fits": False}])
    lines = str(shown).splitlines()
    assert lines[0].split() == ["name", "count", "share", "fits"]
    assert lines[2].split() == ["a<b", "1,234", "0.50", "yes"] and lines[3].split() == ["c", "5", "12.25", "no"]
    assert len({len(line) for line in lines}) == 1  # every row padded to the same width
    assert "<td>a&lt;b</td>" in shown._repr_html_()


def test_table_without_rows_says_what_it_needs():
    with pytest.raises(LessonError, match="at least one row"):
        table([])


def test_unit_helpers_round():
    assert gib(3 * 2**30 + 2**29) == 3.5 and mib(2**20 * 1.5) == 1.5


def test_without_overhead_drops_only_the_cuda_context_and_reserve():
    estimated = estimate(TrainingSetup(model="tiny", method="full", gpus_per_node=1, zero_stage=0, seq_len=64, gpu_memory_gb=0.5))
    bare = without_overhead(estimated)
    assert estimated.per_gpu["overhead"] > 600 * 2**20 and bare.per_gpu["overhead"] == 0
    assert bare.total_bytes == estimated.total_bytes - estimated.per_gpu["overhead"]
    assert {c: v for c, v in bare.per_gpu.items() if c != "overhead"} == {c: v for c, v in estimated.per_gpu.items() if c != "overhead"}
    assert estimated.fits is False and bare.fits is True  # a 0.5 GB "card" holds the tiny step, not a CUDA context
    assert estimated.per_gpu["overhead"] > 0  # the original is untouched


def test_short_run_plan_uses_a_free_port_and_writes_nothing(tmp_path):
    setup = TrainingSetup(model="tiny", method="lora", zero_stage=2, gpus_per_node=2, seq_len=64, micro_batch=2)
    plan = short_run_plan(setup, tmp_path / "run", steps=3, lr=0.01)
    argv = plan.deepspeed_argv()
    assert argv[:3] == ["deepspeed", "--num_gpus", "2"] and argv[argv.index("--master_port") + 1] != "29500"
    assert argv[argv.index("--steps") + 1] == "3" and argv[argv.index("--lr") + 1] == "0.01"
    assert plan.fits is True and not (tmp_path / "run").exists()


def test_training_env_caches_deepspeed_ops_in_the_checkout_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert training_env()["TORCH_EXTENSIONS_DIR"] == str(REPO / ".cache" / "torch_extensions")
    assert training_env()["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")
    assert training_env()["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


class _ScriptPlan:
    """A stand-in for a LaunchPlan whose command is a short Python script instead of deepspeed."""

    def __init__(self, run_dir: Path, script: str) -> None:
        self.run_dir = run_dir
        self.script = script

    def write(self) -> None:
        self.run_dir.mkdir(parents=True)

    def deepspeed_argv(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.run_dir)]


WRITES_A_RUN = """
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("training", sys.argv[2:])
for step, loss in enumerate([2.0, 1.5], start=1):
    record = {"step": step, "loss": loss, "memory_bytes": 1000 * step, "memory_kind": "rss"}
    (out / "log.jsonl").open("a").write(json.dumps(record) + "\\n")
(out / "guard.jsonl").write_text(json.dumps({"step": 2, "moved": {"attention LoRA": True}}) + "\\n")
"""


def test_a_started_run_is_read_back_from_a_fresh_folder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "log.jsonl").write_text(json.dumps({"step": 9, "loss": 9.0, "memory_bytes": 1, "memory_kind": "rss"}) + "\n")
    run = finish_training(start_training(_ScriptPlan(run_dir, WRITES_A_RUN)), timeout_s=60).check()
    assert run.returncode == 0 and run.losses == [2.0, 1.5]  # the stale step 9 was cleared with the old folder
    assert run.peak_memory_bytes == 2000 and run.moved == {"attention LoRA": True}
    assert "training ['--no-progress', '--no-resume']" in run.output


def test_a_failed_run_raises_with_the_end_of_its_output(tmp_path):
    plan = _ScriptPlan(tmp_path / "run", "import sys; print('rank 0: out of memory'); sys.exit(3)")
    run = finish_training(start_training(plan), timeout_s=60)
    assert run.returncode == 3 and run.log == [] and run.moved == {}
    with pytest.raises(LessonError, match=r"exit code 3(.|\n)*rank 0: out of memory"):
        run.check()


def test_seconds_per_step_times_real_steps_of_the_setup():
    seconds = seconds_per_step(TrainingSetup(model="tiny", method="lora", seq_len=32, gpus_per_node=1, zero_stage=0), steps=2)
    assert 0 < seconds < 60


def test_rank_chart_keeps_one_line_per_rank_and_marks_the_steps_the_log_shows(tmp_path):
    from moekit.lessons import StepClock, rank_chart, rank_labels
    from moekit.monitor import MemorySample

    labels = ["pid 10 (deepspeed)", "rank 0 (pid 11)", "rank 1 (pid 12)", "rank 0 (pid 13)", "rank 10 (pid 14)"]
    assert rank_labels(labels) == ["rank 0 (pid 11)", "rank 1 (pid 12)", "rank 10 (pid 14)"]
    clock = StepClock(tmp_path)
    samples = [MemorySample(0.5, label, 2**28, 2**34, "process") for label in labels]
    clock(samples)
    assert clock.step_times == []  # no log yet
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    clock([MemorySample(1.5, "rank 0 (pid 11)", 2**28, 2**34, "process")])
    assert clock.step_times == [(1.5, 1), (1.5, 2)]
    figure = rank_chart(samples, clock)
    assert [trace.name for trace in figure.data] == ["rank 0 (pid 11)", "rank 1 (pid 12)", "rank 10 (pid 14)"]
    assert [shape.x0 for shape in figure.layout.shapes] == [1.5, 1.5]


def test_a_real_run_without_weights_says_where_to_get_them(tmp_path):
    from moekit.lessons import require_weights

    with pytest.raises(LessonError, match="WEIGHTS_DIR is not set"):
        require_weights(None, "mixtral-8x7b")
    with pytest.raises(LessonError, match=f"'{tmp_path}' has no \\*.safetensors files.*huggingface-cli download"):
        require_weights(tmp_path, "mixtral-8x7b")
    (tmp_path / "model-00001-of-00019.safetensors").write_bytes(b"")
    assert require_weights(tmp_path, "mixtral-8x7b") == tmp_path


def test_short_run_plan_passes_weights_and_data_to_every_rank(tmp_path):
    setup = TrainingSetup(model="tiny", method="lora", zero_stage=2, gpus_per_node=2, seq_len=64, micro_batch=2)
    argv = short_run_plan(setup, tmp_path / "run", weights="/data/mixtral", data="/data/text.jsonl").deepspeed_argv()
    assert argv[argv.index("--weights") + 1] == "/data/mixtral" and argv[argv.index("--data") + 1] == "/data/text.jsonl"


def test_live_rank_chart_marks_every_step_but_redraws_at_most_once_per_redraw_interval(tmp_path):
    from moekit.lessons import live_rank_chart
    from moekit.monitor import MemorySample

    class FakeMonitor:  # the two things the chart asks of a MemoryMonitor
        def __init__(self):
            self.samples, self.listeners = [], []

        def add_listener(self, listener):
            self.listeners.append(listener)

    monitor = FakeMonitor()
    widget, clock = live_rank_chart(monitor, tmp_path, redraw_s=3600)
    log = tmp_path / "log.jsonl"
    for poll in range(50):
        sample = MemorySample(poll * 0.1, "rank 0 (pid 1)", 2**20 * (1 + poll), 2**34, kind="process")
        monitor.samples.append(sample)
        if poll % 10 == 9:
            log.write_text('{"step": 1}\n' * (poll // 10 + 1))
        monitor.listeners[0]([sample])
    assert [step for _, step in clock.step_times] == [1, 2, 3, 4, 5]  # every step seen at its poll
    assert [len(trace.x) for trace in widget.data] == [1]  # drawn once, at the first poll, within the hour


def test_static_image_is_a_png_of_the_figure_for_saved_copies():
    import plotly.graph_objects as go

    from moekit.lessons import static_image

    image = static_image(go.Figure(go.Bar(x=["rank 0"], y=[3])), width=320, height=200)
    if isinstance(image, go.Figure) and os.environ.get("MOEKIT_SKIP_BROWSER") == "1":
        pytest.skip("MOEKIT_SKIP_BROWSER=1: no Chromium for kaleido here (make browser-deps installs it)")
    assert image.data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(image.data[16:20], "big") == 320  # the PNG's width, from its IHDR chunk


def test_a_solutions_answer_is_shown_folded_under_a_summary(capsys):
    from moekit.lessons import Answer, answer

    with answer():
        print("r=8 saves 0.25 GiB <of> 40")
    assert capsys.readouterr().out.strip() == "r=8 saves 0.25 GiB <of> 40"  # the text repr, as a terminal shows it
    html = Answer("a < b")._repr_html_()
    assert html == "<details><summary>Show the answer</summary><pre>a &lt; b</pre></details>"
