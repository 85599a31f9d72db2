"""The live memory monitor: GPUs through NVML (a stand-in here), processes and the host through psutil."""

import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from moekit.cli import main
from moekit.monitor import (
    GpuSource,
    MemoryMonitor,
    MemorySample,
    MonitorError,
    ProcessSource,
    format_line,
    open_source,
)
from moekit.viz import live_monitor_figure

GiB = 2**30
MiB = 2**20


class FakeNvml:
    """The few pynvml calls the monitor makes, for two 40 GiB GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, used_bytes=(30 * GiB, 10 * GiB), fail_init=False):
        self.used_bytes = list(used_bytes)
        self.fail_init = fail_init
        self.shut_down = False

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.used_bytes)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used_bytes[handle], total=40 * GiB, free=40 * GiB - self.used_bytes[handle])

    def nvmlShutdown(self):
        self.shut_down = True


def _wait_until(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_gpu_source_reads_every_gpu_used_and_total():
    nvml = FakeNvml()
    source = GpuSource(nvml)
    assert source.read() == [("GPU 0", 30 * GiB, 40 * GiB, "gpu"), ("GPU 1", 10 * GiB, 40 * GiB, "gpu")]
    source.close()
    assert nvml.shut_down


def test_gpu_source_without_a_driver_says_what_to_watch_instead():
    with pytest.raises(MonitorError, match="watch processes or the host"):
        GpuSource(FakeNvml(fail_init=True))


def test_auto_source_falls_back_to_processes_or_host_without_gpus():
    pytest.importorskip("pynvml")
    if _nvml_sees_a_gpu():
        pytest.skip("this machine has GPUs")
    assert isinstance(open_source("auto"), ProcessSource)
    assert open_source("auto", fallback="host").read()[0][0] == "host"


def _nvml_sees_a_gpu() -> bool:
    try:
        GpuSource().close()
        return True
    except MonitorError:
        return False


def test_format_line_shows_used_total_percent_and_peak():
    samples = [MemorySample(12.5, "GPU 0", 30 * GiB, 40 * GiB, "gpu"), MemorySample(12.5, "GPU 1", 512 * MiB, 40 * GiB, "gpu")]
    line = format_line(samples, {"GPU 0": 33 * GiB, "GPU 1": 512 * MiB})
    assert line == "12.5s | GPU 0 30.0 GiB/40.0 GiB 75% (peak 33.0 GiB) | GPU 1 512 MiB/40.0 GiB 1% (peak 512 MiB)"
    assert format_line([MemorySample(1.0, "pid 7 (python)", 300 * MiB, 64 * GiB, "process")]) == "1.0s | pid 7 (python) 300 MiB"


def test_monitor_samples_every_gpu_and_keeps_peaks():
    nvml = FakeNvml()
    with MemoryMonitor(interval_s=0.01, source=GpuSource(nvml)) as monitor:
        _wait_until(lambda: len(monitor.samples) >= 4)
        nvml.used_bytes[1] = 35 * GiB
        _wait_until(lambda: monitor.peak_bytes()["GPU 1"] == 35 * GiB)
        nvml.used_bytes[1] = 5 * GiB
        _wait_until(lambda: monitor.latest[1].used_bytes == 5 * GiB)
    assert monitor.peak_bytes() == {"GPU 0": 30 * GiB, "GPU 1": 35 * GiB}
    assert {sample.label for sample in monitor.samples} == {"GPU 0", "GPU 1"}
    assert "GPU 1 5.0 GiB/40.0 GiB 12% (peak 35.0 GiB)" in monitor.format_line()
    assert nvml.shut_down


GROW_ON_REQUEST = """
import sys
print("ready", flush=True)
sys.stdin.readline()
block = b"x" * (96 * 2**20)  # 96 MiB of fresh, touched pages
print("grown", flush=True)
sys.stdin.readline()
"""


def test_monitor_sees_a_process_grow_its_resident_memory():
    # A fresh child, not this test process: pytest's own allocator may hand back pages that are already resident.
    child = subprocess.Popen([sys.executable, "-c", GROW_ON_REQUEST], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with MemoryMonitor(interval_s=0.01, pids=[child.pid], source="process") as monitor:
            _wait_until(lambda: bool(monitor.latest))
            label, start_bytes = monitor.latest[0].label, monitor.latest[0].used_bytes
            child.stdin.write("grow\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "grown"
            _wait_until(lambda: monitor.peak_bytes()[label] >= start_bytes + 90 * MiB)
        assert label.startswith(f"pid {child.pid} (")
        assert all(sample.kind == "process" for sample in monitor.samples)
    finally:
        child.kill()
        child.wait()


def test_monitor_watches_this_process_by_default():
    with MemoryMonitor(interval_s=0.01, source="process") as monitor:
        _wait_until(lambda: bool(monitor.latest))
    assert monitor.latest[0].label.startswith(f"pid {os.getpid()} (")
    assert monitor.latest[0].used_bytes > 10 * MiB  # a Python interpreter with pytest loaded


def test_process_source_finds_a_child_rank_started_later():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; block = bytearray(80 * 2**20); print('ready', flush=True); time.sleep(60)"],
        env=dict(os.environ, RANK="3"),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        readings = {label: used for label, used, _total, _kind in ProcessSource().read()}
        assert readings[f"rank 3 (pid {child.pid})"] >= 80 * MiB
        assert any(label.startswith(f"pid {os.getpid()} (") for label in readings)
    finally:
        child.kill()
        child.wait()


def test_a_source_that_fails_mid_run_stops_polling_and_says_why():
    nvml = FakeNvml()
    with pytest.warns(RuntimeWarning, match="polling stopped"):
        with MemoryMonitor(interval_s=0.01, source=GpuSource(nvml)) as monitor:
            nvml.used_bytes = []  # reading GPU 0 now raises IndexError
            _wait_until(lambda: monitor.error is not None)
    assert isinstance(monitor.error, IndexError) and len(monitor.samples) >= 2


def test_monitor_stops_within_a_second_even_with_a_long_interval():
    monitor = MemoryMonitor(interval_s=30.0, source="host").start()
    began = time.monotonic()
    monitor.stop()
    assert time.monotonic() - began < 1.0
    assert not monitor.running
    assert not any(thread.name == "moekit-memory-monitor" for thread in threading.enumerate())


def test_monitor_refuses_a_bad_interval_or_pid():
    with pytest.raises(MonitorError, match="interval_s must be positive"):
        MemoryMonitor(interval_s=0)
    with pytest.raises(MonitorError, match="no process with pid"):
        MemoryMonitor(pids=[2**22 + 12345], source="process").start()


def test_live_figure_follows_the_samples():
    pytest.importorskip("anywidget")
    nvml = FakeNvml()
    with MemoryMonitor(interval_s=0.01, source=GpuSource(nvml)) as monitor:
        widget = live_monitor_figure(monitor)
        _wait_until(lambda: len(widget.data[0].x) >= 3)
        nvml.used_bytes[0] = 39 * GiB
        _wait_until(lambda: widget.data[0].y[-1] == 39.0)
    assert [trace.name for trace in widget.data] == ["GPU 0", "GPU 1"]
    assert monitor.error is None


def test_cli_monitor_prints_one_line_per_poll(capsys):
    assert main(["monitor", "--count", "3", "--interval", "0.01", "--pid", str(os.getpid())]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(f"pid {os.getpid()}" in line for line in lines)


def test_cli_monitor_without_gpus_or_pids_shows_the_host(capsys):
    if _nvml_sees_a_gpu():
        pytest.skip("this machine has GPUs")
    assert main(["monitor", "--count", "1", "--interval", "0.01"]) == 0
    assert capsys.readouterr().out.startswith("0.0s | host ")


def test_cli_monitor_refuses_a_bad_count(capsys):
    assert main(["monitor", "--count", "0"]) == 2
    assert "--count must be a positive number" in capsys.readouterr().err
