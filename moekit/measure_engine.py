"""``measure_engine(setup)``: the real DeepSpeed engine's memory, rank by rank, beside the estimate.

``moekit.profile.measure`` runs moekit's own step harness (``moekit.step``), which allocates what a
DeepSpeed rank would; this module runs DeepSpeed itself. It starts N ranks with torchrun (CPU
processes with gloo here, GPUs where present); every rank builds, prepares and initializes the model
exactly as ``moekit.train`` does (its functions, not a copy), then runs a few optimizer steps on
random tokens of exactly ``micro_batch x seq_len`` with the loop ``moekit.train`` runs
(``loss = engine(**batch).loss``, ``engine.backward(loss)``, ``engine.step()``), each call inside a
``record_function`` range naming its phase.

How bytes are read:

- CPU: ``torch.profiler.profile(profile_memory=True)`` is started before the model is built, so it
  sees every allocation and free of the c10 CPU allocator (DeepSpeed's flat buffers and buckets
  included). The allocation events of the profiler's event tree, summed in time order, give the
  live bytes at every moment; a phase's peak is the largest live figure inside its range. Offloaded
  states live in the same allocator, so a rank's figure is compared with ``per_gpu`` plus this
  rank's share of ``per_host``.
- CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``, reset between phases.

The categories of each rank's ``Breakdown`` come from the engine and the phases: ``weights`` = the
storages of the module's parameters (ZeRO-3: their partitions), ``optimizer_states`` = everything
else live after ``deepspeed.initialize`` (fp32 partitions, moments, DeepSpeed's flat buffers),
``activations`` = what the last forward added, ``gradients`` = what the last optimizer step's
backward passes left, ``temporaries`` = the rest of the peak. The estimate's ``overhead`` (CUDA context,
allocator reserve) is left out of the comparison: a CPU has none.
"""

from __future__ import annotations

import bisect
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moekit.breakdown import CATEGORIES, Breakdown
from moekit.errors import MoekitError
from moekit.training_setup import TrainingSetup
from moekit.units import MiB

#: The phases of one micro-step, in order; each is a ``record_function`` range named ``moekit:<phase>``.
PHASES = ("forward", "backward", "optimizer_step")
#: Phases outside the steps: building the model and ``deepspeed.initialize``.
BUILD_PHASE = "build"
_RANGE_PREFIX = "moekit:"
#: Lines of a failed rank's stderr shown in the error.
STDERR_TAIL_LINES = 25


class EngineMeasureError(MoekitError):
    """A real-engine measurement that could not run or whose ranks failed; the message says which and why."""


@dataclass
class RankMeasurement:
    """One rank's figures: the peak live bytes of each phase (over all steps), and its Breakdown."""

    rank: int
    phase_peak_bytes: dict[str, int]
    breakdown: Breakdown
    #: CUDA only: per phase, the allocator's max allocated and max reserved bytes.
    cuda: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def step_peak_bytes(self) -> int:
        """The peak over the training steps (forward, backward, optimizer step), building excluded."""
        return max(self.phase_peak_bytes[phase] for phase in PHASES)


@dataclass
class EngineMeasurement:
    """Every rank's measurement of one setup, the estimate, and what the estimate is compared with."""

    setup: TrainingSetup
    device: str
    steps: int
    ranks: list[RankMeasurement]
    estimate: Breakdown
    master_port: int  # the ranks' rendezvous port (it names DeepSpeed's CPU shared-memory files)

    @property
    def estimate_bytes(self) -> int:
        """What one rank should hold at its peak: ``per_gpu`` (without overhead) plus its share of ``per_host``
        on the CPU, where offloaded states share the allocator; ``per_gpu`` alone on a GPU."""
        return compared_estimate_bytes(self.estimate, self.setup, self.device)

    def error(self, rank: int = 0) -> float:
        """The real peak over the estimate, minus 1 (negative: the estimate is above the real peak)."""
        return self.ranks[rank].step_peak_bytes / self.estimate_bytes - 1

    @property
    def worst_error(self) -> float:
        return max((self.error(r.rank) for r in self.ranks), key=abs)

    def table(self) -> str:
        """Each rank's peak per phase and its categories, with the estimate beside them (MiB)."""
        unit, name = MiB, "MiB"
        ranks = [f"rank {r.rank}" for r in self.ranks]
        rows = [f"{self.setup.describe()}: the real DeepSpeed engine on {len(self.ranks)} {self.device} ranks, "
                f"{self.steps} optimizer steps", f"{name:<20}" + "".join(f"{r:>12}" for r in ranks) + f"{'estimate':>12}"]
        for category in CATEGORIES:
            if category == "overhead":
                continue
            cells = "".join(f"{r.breakdown.per_gpu[category] / unit:>12.1f}" for r in self.ranks)
            rows.append(f"{category:<20}{cells}{self.estimate.per_gpu[category] / unit:>12.1f}")
        for phase in (BUILD_PHASE, *PHASES):
            cells = "".join(f"{r.phase_peak_bytes[phase] / unit:>12.1f}" for r in self.ranks)
            rows.append(f"{'peak ' + phase:<20}{cells}{'':>12}")
        if self.device == "cpu" and self.estimate.per_host:
            share = sum(self.estimate.per_host.values()) / self.setup.gpus_per_node
            rows.append(f"{'host share (est.)':<20}{'':>{12 * len(self.ranks)}}{share / unit:>12.1f}")
        cells = "".join(f"{r.step_peak_bytes / unit:>12.1f}" for r in self.ranks)
        rows.append(f"{'peak of the steps':<20}{cells}{self.estimate_bytes / unit:>12.1f}")
        cells = "".join(f"{self.error(r.rank):>+12.1%}" for r in self.ranks)
        rows.append(f"{'real / estimate - 1':<20}{cells}")
        return "\n".join(rows)


def compared_estimate_bytes(estimate: Breakdown, setup: TrainingSetup, device: str) -> int:
    """The estimate's peak without overhead, plus on the CPU this rank's share of the host's offloaded states."""
    on_device = estimate.total_bytes - estimate.per_gpu["overhead"]
    if device != "cpu":
        return on_device
    return on_device + sum(estimate.per_host.values()) // setup.gpus_per_node


# --------------------------------------------------------------------------------------------
# The parent: start the ranks, show progress, collect their figures
# --------------------------------------------------------------------------------------------


def measure_engine(
    setup: TrainingSetup,
    *,
    steps: int = 2,
    seed: int = 0,
    progress: bool = True,
    timeout_s: float = 900,
    work_dir: str | Path | None = None,
) -> EngineMeasurement:
    """Run ``steps`` optimizer steps of the real DeepSpeed engine on ``setup.gpus_per_node`` ranks of this
    machine (CPU processes when torch sees no GPU) and return each rank's memory with the estimate.

    work_dir keeps each rank's figures and stderr (default: a temporary folder, removed afterwards).
    """
    import tempfile

    from moekit.estimate import estimate

    if steps <= 0:
        raise EngineMeasureError(f"steps must be positive, got {steps}.")
    if setup.num_nodes != 1:
        raise EngineMeasureError(f"measure_engine runs the ranks of one machine; got num_nodes={setup.num_nodes}: use 1.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.device_count() < setup.gpus_per_node:
        raise EngineMeasureError(f"{setup.gpus_per_node} ranks asked but torch sees {torch.cuda.device_count()} GPUs; "
                                 f"use --gpus {torch.cuda.device_count()}.")
    from moekit.train import check_precision_supported

    check_precision_supported(setup.precision)
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="moekit-engine-") as tmp:
            return _measure_in(setup, Path(tmp), steps, seed, progress, timeout_s, device, estimate(setup))
    return _measure_in(setup, Path(work_dir), steps, seed, progress, timeout_s, device, estimate(setup))


def _measure_in(setup: TrainingSetup, folder: Path, steps: int, seed: int, progress: bool, timeout_s: float,
                device: str, estimated: Breakdown) -> EngineMeasurement:
    from moekit.checkpoints import save_setup
    from moekit.distributed import NEW_PROCESS_GROUP, free_port, launch_env

    folder.mkdir(parents=True, exist_ok=True)
    setup_path = save_setup(setup, folder / "setup.json")
    port = free_port()
    num_ranks = setup.gpus_per_node
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(num_ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "moekit.measure_engine",
            "--setup-json", str(setup_path), "--out-dir", str(folder), "--steps", str(steps), "--seed", str(seed)]
    env = launch_env()  # this Python's bin first: the same ninja (and so the same cached C++ ops) as training
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    launcher_log = folder / "launcher.log"
    try:
        with launcher_log.open("w") as log:
            # a process group of its own (so a timeout kills every rank), in this session: a session of its own
            # would also be a scheduling group of its own under Linux's autogroup, escaping the caller's nice
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, **NEW_PROCESS_GROUP)
            try:
                returncode = _wait_with_progress(process, folder, setup, steps, progress, timeout_s)
            finally:
                _stop(process)
    finally:
        _remove_shm_buffers(port)
    ranks = [_read_rank(folder, rank, setup) for rank in range(num_ranks)]
    failed = [rank for rank, result in enumerate(ranks) if result is None]
    if failed or returncode != 0:
        raise EngineMeasureError(_failure_message(folder, failed or list(range(num_ranks)), returncode, launcher_log))
    return EngineMeasurement(setup, device, steps, ranks, estimated, port)


def _wait_with_progress(process: subprocess.Popen, folder: Path, setup: TrainingSetup, steps: int, progress: bool,
                        timeout_s: float) -> int:
    """Wait for the ranks, with a bar over rank 0's micro-steps (plus the build); kill them at the timeout."""
    from tqdm.auto import tqdm

    total = 1 + steps * setup.grad_accum
    bar = tqdm(total=total, desc=f"engine {setup.model} ZeRO-{setup.zero_stage}", unit="stage", disable=not progress)
    began = time.monotonic()
    try:
        while process.poll() is None:
            if time.monotonic() - began > timeout_s:
                raise EngineMeasureError(f"the ranks ran past {timeout_s:.0f} s and were stopped; try fewer --steps "
                                         f"or a smaller --seq (rank stderr in {folder}).")
            done = _progress_of(folder)
            if done > bar.n:
                bar.update(done - bar.n)
            time.sleep(0.5)
        bar.update(max(0, _progress_of(folder) - bar.n))
    finally:
        bar.close()
    return process.returncode


def _stop(process: subprocess.Popen) -> None:
    """Kill the launcher and its ranks (their own process group) if they still run: timeout or interrupt."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _progress_of(folder: Path) -> int:
    path = folder / "progress.rank0"
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce workspaces of this run (a rank that died before unlinking its own)."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def _failure_message(folder: Path, failed: list[int], returncode: int, launcher_log: Path) -> str:
    parts = [f"the real-engine measurement failed (launcher exit code {returncode}); rank(s) {', '.join(map(str, failed))} "
             "wrote no figures."]
    for rank in failed:
        stderr = folder / f"rank{rank}.stderr"
        tail = stderr.read_text(errors="replace").splitlines()[-STDERR_TAIL_LINES:] if stderr.is_file() else []
        parts.append(f"--- rank {rank} stderr (last {len(tail)} lines) ---\n" + "\n".join(tail))
    if launcher_log.is_file():
        tail = launcher_log.read_text(errors="replace").splitlines()[-10:]
        parts.append("--- launcher ---\n" + "\n".join(tail))
    return "\n".join(parts)


def _read_rank(folder: Path, rank: int, setup: TrainingSetup) -> RankMeasurement | None:
    path = folder / f"rank{rank}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    breakdown = Breakdown(source="measure_engine", per_gpu=data["per_gpu"], total_bytes=data["total_bytes"],
                          gpu_memory_bytes=setup.gpu_memory_bytes, notes={"rank": str(rank), "device": data["device"]})
    return RankMeasurement(rank, data["phase_peak_bytes"], breakdown, data.get("cuda", {}))


# --------------------------------------------------------------------------------------------
# Reading the allocator
# --------------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """Live allocator bytes over time (from allocation events) and the ranges of each phase."""

    times_ns: list[int]
    live_bytes: list[int]
    ranges: list[tuple[str, int, int]]  # (phase, start ns, end ns)
    #: (time ns, bytes (< 0 for a free), address, the ops that allocated it, innermost last)
    events: list[tuple[int, int, int, str]] = field(default_factory=list)

    def largest_live_at(self, time_ns: int, count: int = 40) -> list[tuple[int, str]]:
        """The largest allocations live at time_ns, with the ops that made them: what a peak is made of."""
        live: dict[int, tuple[int, str]] = {}
        for event_time, size, address, ops in self.events:
            if event_time > time_ns:
                break
            if size > 0:
                live[address] = (size, ops)
            else:
                live.pop(address, None)
        return sorted(live.values(), reverse=True)[:count]

    def kept_between(self, start_ns: int, end_ns: int, count: int = 15) -> list[tuple[int, str]]:
        """Bytes allocated in [start_ns, end_ns] and still live at end_ns, summed by the ops that made them."""
        made: dict[int, tuple[int, str]] = {}
        for event_time, size, address, ops in self.events:
            if event_time > end_ns:
                break
            if event_time < start_ns:
                continue
            if size > 0:
                made[address] = (size, ops)
            else:
                made.pop(address, None)
        by_ops: dict[str, list[int]] = {}
        for size, ops in made.values():
            by_ops.setdefault(ops, []).append(size)
        return sorted(((sum(sizes), f"{ops} ({len(sizes)} x {max(sizes)} B at most)") for ops, sizes in by_ops.items()),
                      reverse=True)[:count]

    def peak_time(self, phases: tuple[str, ...] = PHASES) -> int:
        """When the live bytes were highest inside the given phases' ranges."""
        best, when = -1, 0
        for phase, start, end in self.ranges:
            if phase not in phases:
                continue
            first = bisect.bisect_left(self.times_ns, start)
            last = bisect.bisect_right(self.times_ns, end)
            for index in range(first, last):
                if self.live_bytes[index] > best:
                    best, when = self.live_bytes[index], self.times_ns[index]
        return when

    def live_at(self, time_ns: int) -> int:
        """Live bytes just after the last event at or before time_ns."""
        index = bisect.bisect_right(self.times_ns, time_ns) - 1
        return self.live_bytes[index] if index >= 0 else 0

    def peak_between(self, start_ns: int, end_ns: int) -> int:
        first = bisect.bisect_left(self.times_ns, start_ns)
        last = bisect.bisect_right(self.times_ns, end_ns)
        inside = self.live_bytes[first:last]
        return max([self.live_at(start_ns), *inside])

    def phase_peaks(self) -> dict[str, int]:
        """The peak of each phase over all of its ranges; ``build`` is everything before the first forward."""
        peaks = dict.fromkeys((BUILD_PHASE, *PHASES), 0)
        for phase, start, end in self.ranges:
            peaks[phase] = max(peaks[phase], self.peak_between(start, end))
        first_forward = min(start for phase, start, _ in self.ranges if phase == "forward")
        peaks[BUILD_PHASE] = self.peak_between(self.times_ns[0] if self.times_ns else 0, first_forward)
        return peaks

    def last(self, phase: str) -> tuple[int, int]:
        return [(start, end) for name, start, end in self.ranges if name == phase][-1]


def timeline_from_profiler(prof: torch.profiler.profile, device_type: str = "cpu") -> Timeline:
    """Allocation events (``alloc_size`` < 0 for frees) summed in time order, and the ``moekit:`` ranges.

    Frees the profiler did not see are added (``_add_unrecorded_frees``): without them a block freed on another
    thread would count as live until the end of the run.
    """
    events: list[tuple[int, int, int, str]] = []
    ranges: list[tuple[str, int, int]] = []
    collective_ends: dict[tuple[int, int], int] = {}
    uses: list[tuple[int, int, bool]] = []  # (storage address, op end ns, whether the op is a c10d collective)
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.extra_fields
        kind = type(fields).__name__
        if kind == "_ExtraFields_Allocation":
            if fields.device.type == device_type:
                events.append((node.start_time_ns, fields.alloc_size, fields.ptr, _op_chain(node)))
                end = _collective_end(node)
                if end is not None and fields.alloc_size > 0:
                    collective_ends[(node.start_time_ns, fields.ptr)] = end
        else:
            if kind == "_ExtraFields_TorchOp":
                collective = node.name.startswith("c10d::")
                uses += [(ptr, node.end_time_ns, collective) for ptr in _input_storages(fields.inputs)]
            if node.name.startswith(_RANGE_PREFIX):
                ranges.append((node.name.removeprefix(_RANGE_PREFIX), node.start_time_ns, node.end_time_ns))
        stack.extend(node.children)
    first_forward = min((start for name, start, _ in ranges if name == "forward"), default=0)
    handed = _last_use_of_collective_inputs(events, uses, since_ns=first_forward)
    events = _add_unrecorded_frees(events, {**handed, **collective_ends})
    times, live, total = [], [], 0
    for time_ns, size, _, _ in events:
        total += size
        times.append(time_ns)
        live.append(total)
    ranges.sort(key=lambda r: r[1])
    return Timeline(times, live, ranges, events)


#: The ops label of a free the profiler did not record, followed by the ops that made the block.
UNRECORDED_FREE = "free not recorded"


def _input_storages(inputs) -> Iterator[int]:
    """The storage addresses of an op's input tensors (tensor lists included)."""
    for item in inputs:
        if isinstance(item, list):
            yield from _input_storages(item)
        elif type(item).__name__ == "_TensorMetadata" and item.storage_data_ptr:
            yield item.storage_data_ptr


def _last_use_of_collective_inputs(events: list[tuple[int, int, int, str]], uses: list[tuple[int, int, bool]],
                                   since_ns: int = 0) -> dict[tuple[int, int], int]:
    """(made ns, address) -> when the last op that read it ended, for every block made from since_ns on (the
    training steps: DeepSpeed's persistent partitions and buckets come before) and handed to a c10d collective."""
    made_at: dict[int, list[int]] = {}
    for time_ns, size, ptr, _ in sorted(events):
        if size > 0:
            made_at.setdefault(ptr, []).append(time_ns)
    last_use: dict[tuple[int, int], int] = {}
    to_collective: set[tuple[int, int]] = set()
    for ptr, end_ns, collective in uses:
        times = made_at.get(ptr)
        index = bisect.bisect_right(times, end_ns) - 1 if times else -1
        if index < 0:
            continue
        block = (times[index], ptr)
        last_use[block] = max(last_use.get(block, 0), end_ns)
        if collective and block[0] >= since_ns:
            to_collective.add(block)
    return {block: last_use[block] for block in to_collective}


def _collective_end(node) -> int | None:
    """When the c10d collective that made this allocation returned (None outside collectives)."""
    parent = node.parent
    while parent is not None:
        if parent.name.startswith("c10d::"):
            return parent.end_time_ns
        parent = parent.parent
    return None


def _add_unrecorded_frees(events: list[tuple[int, int, int, str]],
                          collective_ends: dict[tuple[int, int], int]) -> list[tuple[int, int, int, str]]:
    """Events in time order (frees first at one instant), with the frees the profiler missed put back.

    The profiler records an allocation's free only on a thread it follows. Gloo frees some blocks on its worker
    thread: ``reduce_scatter_tensor`` clones its input (``c10d::_reduce_scatter_base_ > aten::clone``, the whole
    reduce bucket: 33.5 MiB on the ``small`` preset in bf16) and drops the clone there, and inputs handed to a
    collective can end there too. Summed naively such a block stays live to the end of the run, so a rank's peak
    carried whichever of these happened to land on gloo's thread (up to 90 MiB, varying from run to run and rank
    to rank). Two rules, both keeping the figure an upper bound of the live bytes:

    - a block made inside a c10d collective whose free is missing is freed when the collective returns (the
      caller then waits on the work, which allocates nothing on this thread);
    - a block made during the steps and handed to a collective (DeepSpeed's flattened gradients under ZeRO-0,
      which gloo's work keeps alive) is freed when the last op that read it ends: the last reference is then
      gloo's, dropped on its thread as the collective completes; a rank under load once kept 33.5 MiB of them
      on ``small`` through the optimizer step (+8% on one rank). Partitions and buckets DeepSpeed builds before
      the first forward stay as they are;
    - any other block is freed at the latest when the allocator hands its address out again.

    Blocks of neither kind stay live to the end (a few MiB made while DeepSpeed builds its partitions).
    """
    events = sorted(events, key=lambda event: (event[0], event[1] > 0))
    live: dict[int, tuple[int, int, str]] = {}
    added: list[tuple[int, int, int, str]] = []
    for time_ns, size, ptr, ops in events:
        if size > 0:
            if ptr in live:
                made, made_size, made_ops = live[ptr]
                when = min(time_ns, collective_ends.get((made, ptr), time_ns))
                added.append((when, -made_size, ptr, f"{UNRECORDED_FREE}: {made_ops}"))
            live[ptr] = (time_ns, size, ops)
        else:
            live.pop(ptr, None)
    for ptr, (made, made_size, made_ops) in live.items():
        if (made, ptr) in collective_ends:
            added.append((collective_ends[(made, ptr)], -made_size, ptr, f"{UNRECORDED_FREE}: {made_ops}"))
    return sorted(events + added, key=lambda event: (event[0], event[1] > 0))


def _op_chain(node, depth: int = 4) -> str:
    """The names of the ops around an allocation, outermost first (``moekit:backward > aten::mm > ...``)."""
    names = []
    parent = node.parent
    while parent is not None and len(names) < depth:
        names.append(parent.name)
        parent = parent.parent
    return " > ".join(reversed(names))


# --------------------------------------------------------------------------------------------
# One rank: python -m moekit.measure_engine (started by torchrun)
# --------------------------------------------------------------------------------------------


def _random_batch(setup: TrainingSetup, vocab: int, seed: int, device) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (setup.micro_batch, setup.seq_len), generator=generator)
    return {"input_ids": ids.to(device), "labels": ids.to(device)}


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind tensors (flat buffers counted once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _parameter_bytes(module: torch.nn.Module) -> int:
    """The module's weights as this rank holds them (ZeRO-3: each parameter's partition, ``ds_tensor``)."""
    return _storage_bytes(getattr(p, "ds_tensor", p) for p in module.parameters())


class _Recorder:
    """Phase ranges and peaks: the profiler's allocation events on the CPU, torch.cuda's peaks on a GPU."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.cuda: dict[str, dict[str, int]] = {}
        self.profiler = None
        self.marks: dict[str, int] = {}

    @contextmanager
    def running(self) -> Iterator[None]:
        if self.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        # record_shapes: each op's input tensors, to see which blocks were handed to a collective
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
            yield
        self.profiler = prof

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        from torch.profiler import record_function

        if self.device_type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with record_function(_RANGE_PREFIX + name):
            yield
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            figures = self.cuda.setdefault(name, {"max_allocated": 0, "max_reserved": 0})
            figures["max_allocated"] = max(figures["max_allocated"], torch.cuda.max_memory_allocated())
            figures["max_reserved"] = max(figures["max_reserved"], torch.cuda.max_memory_reserved())
            self.marks[f"end {name}"] = torch.cuda.memory_allocated()

    def mark(self, name: str) -> None:
        """Current bytes on a GPU; on the CPU an empty range read from the timeline afterwards."""
        if self.device_type == "cuda":
            torch.cuda.synchronize()
            self.marks[name] = torch.cuda.memory_allocated()
            if name == "initialized":  # the peak of building and deepspeed.initialize
                self.cuda[BUILD_PHASE] = {"max_allocated": torch.cuda.max_memory_allocated(),
                                          "max_reserved": torch.cuda.max_memory_reserved()}
            return
        from torch.profiler import record_function

        with record_function(_RANGE_PREFIX + "mark:" + name):
            pass


def _rank_figures(recorder: _Recorder, weights_bytes: int) -> dict:
    """Phase peaks and categories of this rank, from the timeline (CPU) or the allocator's marks (CUDA)."""
    largest: list[tuple[int, str]] = []
    kept_by_forward: list[tuple[int, str]] = []
    if recorder.device_type == "cuda":
        peaks = {name: figures["max_allocated"] for name, figures in recorder.cuda.items()}
        marks = recorder.marks
    else:
        timeline = timeline_from_profiler(recorder.profiler)
        marks = {name.removeprefix("mark:"): timeline.live_at(start) for name, start, _ in timeline.ranges
                 if name.startswith("mark:")}
        timeline.ranges = [r for r in timeline.ranges if not r[0].startswith("mark:")]
        peaks = timeline.phase_peaks()
        largest = timeline.largest_live_at(timeline.peak_time())
        kept_by_forward = timeline.kept_between(*timeline.last("forward"))
        for phase in PHASES:
            marks[f"end {phase}"] = timeline.live_at(timeline.last(phase)[1])
    peaks.setdefault(BUILD_PHASE, marks.get("initialized", 0))
    total = max(peaks[p] for p in PHASES)
    per_gpu = {
        "weights": weights_bytes,
        "optimizer_states": max(0, marks["before last step"] - weights_bytes),
        "activations": max(0, marks["end forward"] - marks["before last forward"]),
        "gradients": max(0, marks["end backward"] - marks["before last step"]),
    }
    per_gpu["temporaries"] = max(0, total - sum(per_gpu.values()))
    return {"phase_peak_bytes": peaks, "per_gpu": per_gpu, "total_bytes": total, "device": recorder.device_type,
            "cuda": recorder.cuda, "largest_live_at_peak": largest,
            "kept_by_last_forward": kept_by_forward}


def run_rank(setup: TrainingSetup, out_dir: Path, steps: int, seed: int) -> None:
    """This rank: build and initialize like ``moekit.train``, run the steps under the recorder, write the figures."""
    from moekit.build import build_base_model, peft_config_for, prepare_model, zero3_build_context
    from moekit.distributed import close_process_group, init_distributed
    from moekit.run_options import DEFAULT_LR
    from moekit.train import _initialize, setup_for_world, training_config

    rank, world_size = init_distributed()
    run_setup = setup_for_world(setup, world_size)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":  # before the recorder resets this rank's peaks (DeepSpeed sets it again, the same)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    recorder = _Recorder(device_type)
    progress = out_dir / f"progress.rank{rank}"
    zero_init = run_setup.zero_stage == 3
    config = training_config(run_setup, DEFAULT_LR[run_setup.method])
    lora_config = peft_config_for(run_setup) if zero_init and run_setup.uses_lora else None
    with recorder.running():
        with zero3_build_context(config, zero_init):
            model = prepare_model(build_base_model(run_setup, None, seed), run_setup, lora_config)
            engine = _initialize(model, config)
        recorder.mark("initialized")
        progress.write_text("1")
        weights_bytes = _parameter_bytes(engine.module)
        vocab = engine.module.config.vocab_size
        done = 1
        for step in range(steps):
            for micro_step in range(run_setup.grad_accum):
                batch = _random_batch(run_setup, vocab, seed + 1000 * step + 10 * micro_step + rank, engine.device)
                if micro_step == 0 and step == steps - 1:
                    recorder.mark("before last step")
                if micro_step == run_setup.grad_accum - 1 and step == steps - 1:
                    recorder.mark("before last forward")
                with recorder.phase("forward"):
                    loss = engine(**batch).loss  # the output (and its logits) is dropped here, as moekit.train does
                with recorder.phase("backward"):
                    engine.backward(loss)
                del loss
                with recorder.phase("optimizer_step"):
                    engine.step()
                done += 1
                progress.write_text(str(done))
    figures = _rank_figures(recorder, weights_bytes)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(figures, indent=1) + "\n")
    close_process_group()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moekit.measure_engine", description="One rank of measure_engine.")
    parser.add_argument("--setup-json", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    rank = int(os.environ.get("RANK", "0"))
    stderr = open(out_dir / f"rank{rank}.stderr", "w")  # noqa: SIM115 (fd 2 points at it until exit)
    os.dup2(stderr.fileno(), 2)
    sys.stderr = stderr
    from moekit.checkpoints import load_setup

    run_rank(load_setup(args.setup_json), out_dir, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    from moekit.distributed import exit_now

    exit_now(main())
