"""The estimate against the real DeepSpeed engine: 2 CPU ranks (gloo) under the allocator, a representative slice.

Each case is one real run of ``measure_engine`` (two torchrun ranks of moekit's training build path, a few
tens of seconds); the module-scoped fixture runs each once and the tests read them. The full grid (ZeRO 0-3
x full/LoRA x bf16/fp32 x accumulation x checkpointing x offload) is ``benchmarks/engine_accuracy.py``,
its table in docs/accuracy.md. Tolerance from issue 14: the real peak within 3% of the estimate on every rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.estimate import estimate, num_trainable_params
from moekit.measure_engine import (
    PHASES,
    UNRECORDED_FREE,
    EngineMeasureError,
    Timeline,
    _add_unrecorded_frees,
    _last_use_of_collective_inputs,
    measure_engine,
)
from moekit.training_setup import TrainingSetup

TOLERANCE = 0.03


def small(**changes) -> TrainingSetup:
    base = dict(model="small", method="full", precision="bf16", zero_stage=2, gpus_per_node=2, seq_len=2048)
    return TrainingSetup(**{**base, **changes})


#: Each case once caught a real difference between the estimate and DeepSpeed (issue 14's table).
CASES = {
    # ZeRO-1 holds its reduce buckets from the first micro-batch to the accumulation boundary (was +7%).
    "zero1 accum 2": small(zero_stage=1, grad_accum=2, seq_len=1024),
    # fp32 ZeRO-0: the output's logits are freed before backward (was -9%).
    "fp32 zero0": small(zero_stage=0, precision="fp32"),
    # LoRA with checkpointing and optimizer offload: host states share the CPU allocator.
    "lora zero2 offload ckpt": small(method="lora", offload="optimizer", activation_checkpointing=True, seq_len=4096),
    # ZeRO-3 LoRA: fp32 adapters under zero.Init and DeepSpeed's linear saving frozen inputs (was +3.6%; with a
    # 2**24 bucket +10%, but gloo's unrecorded frees then weigh up to 4%: benchmarks/engine_accuracy.py has it).
    "lora zero3 accum 2 offload": small(method="lora", zero_stage=3, grad_accum=2, offload="optimizer"),
    # ... and with peft's upcast turned off (autocast_adapter_dtype=False), on tiny (a short run)
    "lora zero3 adapters not upcast": small(model="tiny", method="lora", zero_stage=3, seq_len=512,
                                            autocast_adapter_dtype=False),
}


@pytest.fixture(scope="module")
def measured():
    return {name: measure_engine(setup, progress=False) for name, setup in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_the_real_engines_peak_is_within_3_percent_of_the_estimate_on_every_rank(measured, name):
    result = measured[name]
    assert len(result.ranks) == 2
    for rank in result.ranks:
        assert abs(result.error(rank.rank)) <= TOLERANCE, result.table()


def test_each_rank_reports_its_phase_peaks_and_holds_the_estimated_weights(measured):
    result = measured["zero1 accum 2"]
    expected_weights = estimate(result.setup).per_gpu["weights"]
    for rank in result.ranks:
        assert set(PHASES) <= set(rank.phase_peak_bytes)
        # backward holds activations, gradients and the buckets; the optimizer step has freed the activations
        assert rank.phase_peak_bytes["backward"] > rank.phase_peak_bytes["optimizer_step"]
        assert rank.breakdown.per_gpu["weights"] == pytest.approx(expected_weights, rel=1e-3)
        assert rank.breakdown.total_bytes == rank.step_peak_bytes
    table = result.table()
    assert "rank 1" in table and "estimate" in table and "real / estimate - 1" in table


@pytest.mark.parametrize(("name", "adapter_bytes"), [("lora zero3 accum 2 offload", 4),
                                                      ("lora zero3 adapters not upcast", 2)])
def test_zero3_lora_adapters_are_fp32_unless_peft_is_told_not_to_upcast(measured, name, adapter_bytes):
    result = measured[name]
    setup = result.setup
    weights = estimate(setup).per_gpu["weights"]
    # the same 16-bit base partitions as a full fine-tune's, plus this rank's half of the adapters
    assert weights - estimate(setup.replace(method="full")).per_gpu["weights"] == (
        adapter_bytes * math.ceil(num_trainable_params(setup) / 2))
    for rank in result.ranks:  # what DeepSpeed's partitions hold on each rank
        assert rank.breakdown.per_gpu["weights"] == pytest.approx(weights, rel=2e-3)


def test_offloaded_states_are_compared_with_this_ranks_share_of_the_host(measured):
    result = measured["lora zero2 offload ckpt"]
    est = result.estimate
    assert est.per_host  # fp32 master, moments and fp32 gradients moved to the host
    on_device = est.total_bytes - est.per_gpu["overhead"]
    assert result.estimate_bytes == on_device + sum(est.per_host.values()) // 2


def test_no_deepspeed_shared_memory_is_left_behind(measured):
    for result in measured.values():
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{result.master_port}_*"))


def test_a_failing_rank_is_named_with_its_stderr_tail(tmp_path):
    # QLoRA needs bitsandbytes on a CUDA GPU: every rank stops while building the model.
    setup = small(model="tiny", method="qlora", seq_len=64)
    with pytest.raises(EngineMeasureError) as error:
        measure_engine(setup, progress=False, work_dir=tmp_path)
    message = str(error.value)
    assert "rank(s) 0, 1" in message
    assert "--- rank 1 stderr" in message and "Traceback" in message


def test_timeline_sums_allocation_events_in_time_order_and_peaks_per_phase():
    times = [10, 20, 30, 40, 50, 60]
    sizes = [100, 50, -100, 300, -300, -50]
    live, total = [], 0
    for size in sizes:
        total += size
        live.append(total)
    events = [(t, s, i, "op") for i, (t, s) in enumerate(zip(times, sizes, strict=True))]
    ranges = [("forward", 15, 35), ("backward", 35, 55), ("optimizer_step", 55, 65)]
    timeline = Timeline(times, live, ranges, events)
    assert timeline.phase_peaks() == {"build": 100, "forward": 150, "backward": 350, "optimizer_step": 50}
    assert timeline.live_at(45) == 350 and timeline.live_at(5) == 0


def test_frees_the_profiler_missed_are_put_back_at_reuse_or_when_the_collective_returns():
    # gloo frees its reduce-scatter clone on its worker thread: the profiler sees the allocation, never the free
    events = [
        (10, 100, 1, "moekit:backward > c10d::_reduce_scatter_base_ > aten::clone"),  # free never recorded
        (20, 50, 2, "aten::empty"),  # freed on another thread: its address comes back at 40
        (30, 70, 3, "aten::empty"),
        (35, -70, 3, "aten::empty"),  # a recorded free: nothing added
        (30, 5, 4, "aten::empty"),
        (40, 60, 2, "aten::empty"),
    ]
    fixed = _add_unrecorded_frees(events, {(10, 1): 15})
    added = [event for event in fixed if event[3].startswith(UNRECORDED_FREE)]
    assert [(t, size, ptr) for t, size, ptr, _ in added] == [(15, -100, 1), (40, -50, 2)]
    assert fixed.index(added[1]) < fixed.index((40, 60, 2, "aten::empty"))  # freed before its address is reused
    assert sum(size for _, size, _, _ in fixed) == 65  # only what is really live at the end: blocks 2' and 4
    assert [t for t, *_ in fixed] == sorted(t for t, *_ in fixed)


def test_a_block_handed_to_a_collective_is_freed_after_its_last_use_unless_built_before_the_steps():
    # ZeRO-0 flattens the gradients and all-reduces the flat copy; gloo's work may hold the last reference
    events = [
        (5, 80, 9, "aten::empty"),  # a bucket DeepSpeed builds before the first forward: stays live
        (10, 100, 1, "moekit:backward > aten::cat"),  # the flat gradients: free never recorded
        (50, 30, 2, "aten::empty"),
        (55, -30, 2, "aten::empty"),  # a recorded free: nothing added
    ]
    uses = [(1, 20, False), (1, 30, True), (1, 40, False), (9, 30, True), (2, 52, True)]  # (address, op end, c10d)
    handed = _last_use_of_collective_inputs(events, uses, since_ns=8)
    assert handed == {(10, 1): 40, (50, 2): 52}  # the last op that read it: the copy back after the all-reduce
    added = [e for e in _add_unrecorded_frees(events, handed) if e[3].startswith(UNRECORDED_FREE)]
    assert [(t, size, ptr) for t, size, ptr, _ in added] == [(40, -100, 1)]


def test_cli_measure_engine_deepspeed_prints_each_rank_beside_the_estimate(capsys):
    argv = ["measure", "--engine", "deepspeed", "--model", "tiny", "--method", "lora", "--zero", "2", "--gpus", "2",
            "--seq", "512", "--micro-batch", "2", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert [rank["rank"] for rank in data["ranks"]] == [0, 1]
    assert all(abs(error) <= TOLERANCE for error in data["errors"]), data["errors"]
    assert data["estimate"]["per_gpu"]["total"] > data["estimate_compared_bytes"]  # overhead left out


def test_cli_refuses_harness_only_flags_with_the_real_engine(capsys):
    assert main(["measure", "--engine", "deepspeed", "--model", "tiny", "--layers", "1"]) != 0
    assert "--engine harness" in capsys.readouterr().err
