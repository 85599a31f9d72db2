"""A memory cap for teaching: run one real training step under a budget that stands for a GPU.

    setup = TrainingSetup(model="small", method="full", seq_len=4096, gpus_per_node=1, zero_stage=0)
    print(run_capped(setup, 900 * MiB))    # out of memory: this step needs at least 9xx MiB but the budget is 900 MiB (...)
    print(run_capped(setup.replace(activation_checkpointing=True), 900 * MiB))   # passed: peak ~800 MiB of a 900 MiB budget

The step (``moekit.step.run_step``, the harness ``measure`` and ``simulate`` share: build the
model, forward, backward, optimizer step, one DeepSpeed rank's states) runs in a fresh
subprocess, so the learner's notebook never runs out of memory itself, and the subprocess is
charged only for what the step allocates, not for Python, torch and transformers. Keep it to a
setup this machine can hold for real (a small preset, or ``num_layers``); a lesson with one GPU
uses ``gpus_per_node=1, zero_stage=0`` (ZeRO-1/2 reduce buckets alone are 2 GB in bf16).

How the budget is enforced:

- CUDA: ``torch.cuda.set_per_process_memory_fraction((baseline + budget) / GPU memory)``, the
  baseline being what the allocator holds after a warm-up step (about nothing). The caching allocator
  itself refuses to reserve more and raises ``torch.OutOfMemoryError``, exactly as a smaller GPU
  would. The peak is ``torch.cuda.max_memory_reserved()`` (what the cap governs).
- CPU: a watchdog on the step's resident memory. Before the step, the subprocess resets the
  kernel's resident high-water mark (``/proc/self/clear_refs``, Linux) and records its resident
  memory (the baseline: interpreter, libraries, a warm-up step's kernels). The kernel then tracks
  the exact peak (``VmHWM``); a thread reads it every few milliseconds and ends the process as
  soon as the peak above the baseline passes the budget, and the step's end checks it once more,
  so a short spike between two reads still fails the step. The subprocess runs with glibc's
  ``MALLOC_PERTURB_`` set, which writes every allocation when it is made: memory a step reserves
  but never writes (``torch.empty`` buffers such as DeepSpeed's reduce buckets) costs RAM as it
  costs GPU memory, instead of being free until touched. The result counts what a GPU would:
  every byte held, including the allocator's free-but-kept memory, and it is exact, so the same
  step passes or fails the same way every time (peaks repeat within about 2%).
  The watchdog is the default because its verdict is exact and repeatable; it is not an error
  from PyTorch. ``cpu_cap="rlimit"`` shows the real one: the child limits its data segment
  (``RLIMIT_DATA``, Linux >= 4.7: every private writable mapping, touched or not) to what it holds
  now plus the budget, the kernel refuses the allocation that breaks it, and c10's CPU allocator
  raises "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes", which
  ``CappedResult.allocator_error`` keeps word for word (lesson 01 prints it beside the shape of
  CUDA's ``OutOfMemoryError``, ``CUDA_OOM_MESSAGE_SHAPE``). It counts mapped, not resident, bytes
  (malloc's arenas, thread stacks), so it fails a little earlier than the watchdog; ``RLIMIT_AS``
  would count all virtual address space and fail far earlier still.
  Off Linux (no resettable high-water mark) the watchdog polls psutil's resident memory instead,
  which can miss a spike shorter than its interval: the verdict is then approximate.

Measured on a 2-core CPU (``small`` preset, full fine-tuning, bf16, 4096 tokens, one GPU, no ZeRO):
peak about 1,000 MiB above the baseline without activation checkpointing, about 800 MiB with it,
about 860 MiB with LoRA instead; so a 900 MiB budget shows the OOM, and checkpointing passing with
room to spare (LoRA passes too, narrowly).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moekit.breakdown import Breakdown
from moekit.errors import MoekitError
from moekit.training_setup import TrainingSetup
from moekit.units import GiB, KiB, MiB

Device = Literal["auto", "cpu", "cuda"]
CpuCap = Literal["watchdog", "rlimit"]

#: Seconds between two reads of the resident high-water mark in the CPU watchdog.
WATCHDOG_INTERVAL_S = 0.005


class MemcapError(MoekitError):
    """A capped run that could not be made (bad budget, crash, timeout); says what to change."""


class OutOfMemoryBudget(MoekitError):
    """The capped step needed more memory than its budget (raised by ``CappedResult.raise_if_failed``)."""


@dataclass
class CappedResult:
    """What one capped step did: passed or not, under which budget, with which peak."""

    passed: bool
    budget_bytes: int
    #: The step's peak above the baseline: resident memory (CPU) or reserved by the allocator (CUDA).
    #: When the step failed, the peak when it was stopped: the step needed at least this much.
    peak_bytes: int
    device: str  # "cpu" or "cuda"
    setup: TrainingSetup
    num_layers: int | None
    baseline_bytes: int  # what the process held before the step, not charged to the budget
    elapsed_s: float
    breakdown: Breakdown | None = None  # the step's measured breakdown, when it passed
    detail: str = ""  # how it was stopped (torch's own error on CUDA)
    #: PyTorch's own out-of-memory message, word for word, when its allocator refused (CUDA, or cpu_cap="rlimit").
    allocator_error: str | None = None

    @property
    def error(self) -> str | None:
        """The out-of-memory message a learner sees, or None when the step passed."""
        if self.passed:
            return None
        return (
            f"out of memory: this step needs at least {self.peak_bytes / MiB:,.0f} MiB but the budget is "
            f"{self.budget_bytes / MiB:,.0f} MiB ({self.setup.describe().split(' on ')[0]}"  # the budget is the card
            f"{f', {self.num_layers} layers' if self.num_layers else ''}; {self.detail})"
        )

    def raise_if_failed(self) -> CappedResult:
        """Raise ``OutOfMemoryBudget`` with the learner's message when the step did not fit."""
        if not self.passed:
            raise OutOfMemoryBudget(self.error)
        return self

    def summary(self) -> str:
        if not self.passed:
            return self.error or ""
        return (
            f"passed: peak {self.peak_bytes / MiB:,.0f} MiB of a {self.budget_bytes / MiB:,.0f} MiB budget "
            f"({100 * self.peak_bytes / self.budget_bytes:.0f}%) on {self.device} in {self.elapsed_s:.1f} s"
        )

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------
# The parent side: start the subprocess and read its verdict
# --------------------------------------------------------------------------------------------


def run_capped(
    setup: TrainingSetup,
    budget_bytes: int,
    *,
    num_layers: int | None = None,
    device: Device = "auto",
    timeout_s: float = 600.0,
    check: bool = False,
    cpu_cap: CpuCap = "watchdog",
) -> CappedResult:
    """Run one real training step of ``setup`` in a subprocess under ``budget_bytes`` of memory.

    device: ``cuda`` caps the first GPU, ``cpu`` caps the step's resident memory (GPUs hidden),
      ``auto`` picks CUDA when torch sees a GPU.
    num_layers: truncate the model to this many decoder layers (full width).
    check: raise ``OutOfMemoryBudget`` instead of returning a failed result.
    cpu_cap: on the CPU, ``watchdog`` (exact resident peak, the default) or ``rlimit``: the kernel
      refuses the step's data segment past the budget (``RLIMIT_DATA``), so PyTorch's own allocator
      raises its real "can't allocate memory" error, kept in ``CappedResult.allocator_error``.
    A step that cannot run at all (a crash, a timeout, a setup this machine cannot hold) raises
    ``MemcapError``: that is not the budget's verdict.
    """
    if not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise MemcapError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}; e.g. 700 * 2**20 for 700 MiB.")
    if device not in ("auto", "cpu", "cuda"):
        raise MemcapError(f"device must be auto, cpu or cuda, got '{device}'.")
    if cpu_cap not in ("watchdog", "rlimit"):
        raise MemcapError(f"cpu_cap must be watchdog or rlimit, got '{cpu_cap}'.")
    request = {"setup": setup.as_dict(), "budget_bytes": budget_bytes, "num_layers": num_layers, "device": device,
               "cpu_cap": cpu_cap}
    with tempfile.TemporaryDirectory(prefix="moekit-memcap-") as folder:
        request_path, result_path = Path(folder) / "request.json", Path(folder) / "result.json"
        request_path.write_text(json.dumps(request))
        began = time.monotonic()
        completed = _run_child(request_path, result_path, device, timeout_s)
        elapsed_s = time.monotonic() - began
        if not result_path.is_file():
            raise MemcapError(_crash_message(completed))
        outcome = json.loads(result_path.read_text())
    if "error" in outcome:
        raise MemcapError(outcome["error"])
    result = CappedResult(
        passed=outcome["passed"],
        budget_bytes=budget_bytes,
        peak_bytes=outcome["peak_bytes"],
        device=outcome["device"],
        setup=setup,
        num_layers=num_layers,
        baseline_bytes=outcome["baseline_bytes"],
        elapsed_s=elapsed_s,
        breakdown=_breakdown_from_dict(outcome["breakdown"]) if outcome.get("breakdown") else None,
        detail=outcome.get("detail", ""),
        allocator_error=outcome.get("allocator_error"),
    )
    return result.raise_if_failed() if check else result


def _run_child(request_path: Path, result_path: Path, device: Device, timeout_s: float) -> subprocess.CompletedProcess:
    # MALLOC_PERTURB_: glibc writes every allocation when it is made, so untouched buffers are charged too.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MALLOC_PERTURB_="165")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "moekit.memcap", str(request_path), str(result_path)]
    try:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise MemcapError(
            f"the capped step did not finish in {timeout_s:g} s; use a shorter seq_len, fewer layers, or a larger timeout_s."
        ) from err


def _crash_message(completed: subprocess.CompletedProcess) -> str:
    tail = "\n".join((completed.stderr or "").strip().splitlines()[-15:])
    return f"the capped step's process ended (exit code {completed.returncode}) without a verdict:\n{tail}"


def _breakdown_from_dict(data: dict) -> Breakdown:
    per_gpu = {k: v for k, v in data["per_gpu"].items() if k != "total"}
    return Breakdown(
        source=data["source"],
        per_gpu=per_gpu,
        per_host=data.get("per_host", {}),
        total_bytes=data["per_gpu"].get("total"),
        gpu_memory_bytes=data.get("gpu_memory_bytes"),
    )


# --------------------------------------------------------------------------------------------
# The child side: measure the baseline, cap, run the step, write the verdict
# --------------------------------------------------------------------------------------------


class _Verdict:
    """Writes the result file exactly once, whichever of the step and the watchdog gets there first."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._written = False

    def write(self, outcome: dict) -> bool:
        with self._lock:
            if self._written:
                return False
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(outcome))
            tmp.replace(self._path)
            self._written = True
            return True


class _ResidentPeak:
    """The process's resident-memory peak since this object was made: the kernel's exact VmHWM on Linux."""

    def __init__(self) -> None:
        self._exact = _reset_high_water_mark()
        self.baseline_bytes = _proc_status_bytes("VmRSS") if self._exact else _psutil_rss()
        self._max_seen = self.baseline_bytes

    def peak_bytes(self) -> int:
        """Peak resident bytes above the baseline so far."""
        if self._exact:
            return max(0, _proc_status_bytes("VmHWM") - self.baseline_bytes)
        self._max_seen = max(self._max_seen, _psutil_rss())
        return self._max_seen - self.baseline_bytes


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmHWM") > 0
    except OSError:
        return False


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def _psutil_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Watchdog:
    """Stops the process as soon as the resident peak passes the budget (CPU)."""

    def __init__(self, peak: _ResidentPeak, budget_bytes: int, verdict: _Verdict, describe) -> None:
        self._peak, self._budget_bytes, self._verdict, self._describe = peak, budget_bytes, verdict, describe
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moekit-memcap-watchdog", daemon=True)

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            peak_bytes = self._peak.peak_bytes()
            if peak_bytes > self._budget_bytes and self._verdict.write(self._describe(peak_bytes)):
                os._exit(0)  # like a GPU out of memory: the step ends here, mid-operation


#: The part of the step that runs after each phase boundary the step harness reports.
_NEXT_PART = {"model": "forward", "forward": "backward", "backward": "the optimizer step", "optimizer_step": "the end of the step"}


class _Phase:
    """Which part of the step is running, from the step harness's phase callbacks."""

    def __init__(self) -> None:
        self.current = "model building"

    def __call__(self, finished: str) -> None:
        self.current = _NEXT_PART.get(finished, self.current)


def _run_step(setup: TrainingSetup, num_layers: int | None, device: str, phase: _Phase | None = None) -> Breakdown:
    from moekit.step import run_step

    return run_step(setup, device=device, num_layers=num_layers, on_phase=phase).breakdown


def _warm_up(device: str) -> None:
    """One tiny step before the baseline, so thread pools and kernels are not charged to the budget."""
    _run_step(TrainingSetup(model="tiny", method="full", seq_len=32, gpus_per_node=1, zero_stage=0), None, device)


def _cpu_failure(peak: _ResidentPeak, phase: _Phase):
    def describe(peak_bytes: int) -> dict:
        return {
            "passed": False,
            "peak_bytes": peak_bytes,
            "baseline_bytes": peak.baseline_bytes,
            "device": "cpu",
            "detail": f"stopped during {phase.current}, when the step's resident memory passed the budget",
        }

    return describe


def _child_cpu(setup: TrainingSetup, num_layers: int | None, budget_bytes: int, verdict: _Verdict) -> None:
    import gc

    import psutil

    available_bytes = psutil.virtual_memory().available
    if budget_bytes > available_bytes:
        verdict.write(
            {
                "error": f"the budget ({budget_bytes / MiB:,.0f} MiB) is more than this machine's available RAM "
                f"({available_bytes / MiB:,.0f} MiB): a capped step runs for real; use a smaller budget and setup."
            }
        )
        return
    _warm_up("cpu")
    gc.collect()
    peak = _ResidentPeak()
    phase = _Phase()
    describe = _cpu_failure(peak, phase)
    with _Watchdog(peak, budget_bytes, verdict, describe):
        breakdown = _run_step(setup, num_layers, "cpu", phase)
    _passed_or_not(peak, budget_bytes, breakdown, verdict, describe)


def _passed_or_not(peak: _ResidentPeak, budget_bytes: int, breakdown: Breakdown, verdict: _Verdict, describe) -> None:
    peak_bytes = peak.peak_bytes()
    if peak_bytes > budget_bytes:
        verdict.write(describe(peak_bytes))
        return
    verdict.write(
        {
            "passed": True,
            "peak_bytes": peak_bytes,
            "baseline_bytes": peak.baseline_bytes,
            "device": "cpu",
            "breakdown": breakdown.as_dict(),
        }
    )


#: What PyTorch's CPU allocator says when the kernel refuses memory (c10/core/impl/alloc_cpu.cpp).
_CPU_ALLOCATOR_REFUSED = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")


def _child_cpu_rlimit(setup: TrainingSetup, num_layers: int | None, budget_bytes: int, verdict: _Verdict) -> None:
    """The step under ``RLIMIT_DATA`` = the data segment now + the budget: PyTorch's allocator raises itself.

    RLIMIT_DATA (Linux >= 4.7) counts every private writable mapping, so each tensor's ``malloc``/``mmap``
    past the limit fails and c10's CPU allocator raises "can't allocate memory: you tried to allocate N
    bytes" -- a real error from the allocator, at the allocation that broke the budget, as on a GPU.
    """
    import gc
    import resource

    _warm_up("cpu")
    gc.collect()
    baseline_data_bytes = _proc_status_bytes("VmData")
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    peak = _ResidentPeak()
    phase = _Phase()
    resource.setrlimit(resource.RLIMIT_DATA, (baseline_data_bytes + budget_bytes, hard))
    try:
        breakdown = _run_step(setup, num_layers, "cpu", phase)
    except (RuntimeError, MemoryError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        refused = _CPU_ALLOCATOR_REFUSED.search(message)
        if not refused and not isinstance(err, MemoryError):
            raise
        held_bytes = _proc_status_bytes("VmData") - baseline_data_bytes
        resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
        verdict.write(
            {
                "passed": False,
                "peak_bytes": max(held_bytes + (int(refused.group(1)) if refused else 0), budget_bytes + 1),
                "baseline_bytes": peak.baseline_bytes,
                "device": "cpu",
                "detail": f"stopped during {phase.current}; torch: {message}",
                "allocator_error": f"{type(err).__name__}: {message}",
            }
        )
        return
    resource.setrlimit(resource.RLIMIT_DATA, (hard, hard))
    _passed_or_not(peak, budget_bytes, breakdown, verdict, _cpu_failure(peak, phase))


#: The shape of the message CUDA's caching allocator raises (c10/cuda/CUDACachingAllocator.cpp), with the
#: numbers left as placeholders: what a learner sees on a GPU, beside the CPU allocator's real error.
CUDA_OOM_MESSAGE_SHAPE = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate <request> GiB. GPU 0 has a total capacity of "
    "<capacity> GiB of which <free> GiB is free. Including non-PyTorch memory, this process has <in use> GiB "
    "memory in use. Of the allocated memory <allocated> GiB is allocated by PyTorch, and <reserved> GiB is "
    "reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation."
)

_TRIED_TO_ALLOCATE = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)\b")
_UNITS = {"GiB": GiB, "MiB": MiB, "KiB": KiB, "B": 1}


def requested_bytes(cuda_oom_message: str) -> int:
    """The allocation a CUDA out-of-memory error says failed ("Tried to allocate 2.00 GiB"), 0 if unsaid."""
    match = _TRIED_TO_ALLOCATE.search(cuda_oom_message)
    return int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0


def _child_cuda(setup: TrainingSetup, num_layers: int | None, budget_bytes: int, verdict: _Verdict) -> None:
    import torch

    _warm_up("cuda")
    torch.cuda.empty_cache()
    total_bytes = torch.cuda.get_device_properties(0).total_memory
    if budget_bytes > total_bytes:
        verdict.write({"error": f"the budget ({budget_bytes / MiB:,.0f} MiB) is more than this GPU has ({total_bytes / MiB:,.0f} MiB)."})
        return
    baseline_bytes = torch.cuda.memory_reserved()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (baseline_bytes + budget_bytes) / total_bytes), 0)
    torch.cuda.reset_peak_memory_stats()
    phase = _Phase()
    try:
        breakdown = _run_step(setup, num_layers, "cuda", phase)
    except torch.OutOfMemoryError as err:
        # What it held plus what it asked for; the allocator refused, so the need is above the budget even
        # when its block rounding (2 MiB / 20 MiB segments) makes this sum come out a little lower.
        needed = max(torch.cuda.max_memory_reserved(), torch.cuda.memory_reserved() + requested_bytes(str(err))) - baseline_bytes
        first_line = str(err).strip().splitlines()[0]
        verdict.write(
            {
                "passed": False,
                "peak_bytes": max(needed, budget_bytes + 1),
                "baseline_bytes": baseline_bytes,
                "device": "cuda",
                "detail": f"stopped during {phase.current}; torch: {first_line}",
                "allocator_error": f"torch.OutOfMemoryError: {first_line}",
            }
        )
        return
    verdict.write(
        {
            "passed": True,
            "peak_bytes": torch.cuda.max_memory_reserved() - baseline_bytes,
            "baseline_bytes": baseline_bytes,
            "device": "cuda",
            "breakdown": breakdown.as_dict(),
        }
    )


def _child_main(request_path: str, result_path: str) -> None:
    import torch

    request = json.loads(Path(request_path).read_text())
    verdict = _Verdict(Path(result_path))
    setup = TrainingSetup.from_dict(request["setup"])
    use_cuda = request["device"] == "cuda" or (request["device"] == "auto" and torch.cuda.is_available())
    if request["device"] == "cuda" and not torch.cuda.is_available():
        verdict.write({"error": "device='cuda' but torch sees no GPU here; use device='cpu' (or 'auto')."})
        return
    try:
        run = _child_cuda if use_cuda else _child_cpu_rlimit if request.get("cpu_cap") == "rlimit" else _child_cpu
        run(setup, request["num_layers"], request["budget_bytes"], verdict)
    except MoekitError as err:
        verdict.write({"error": str(err)})


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2])
