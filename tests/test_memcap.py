"""The teaching memory cap: a real step that breaks a budget, and the same step passing after a mitigation.

The step is the ``small`` preset, full fine-tuning on one GPU (no ZeRO), bf16, 4096 tokens. Its peak
above the subprocess's baseline, measured on this CPU: above 900 MiB without activation checkpointing,
about 765 MiB with it (LoRA instead: about 780 MiB); the estimate (allocated tensors, no CUDA context) says
878 / 635 / 686 MiB. An 850 MiB budget sits between them. (It was 900 MiB until the step, like real training
loops, freed the model's output, and with it 64 MiB of logits, before backward: issue 14.)
"""

import re

import pytest

from moekit.estimate import estimate
from moekit.lessons import without_overhead
from moekit.memcap import CappedResult, MemcapError, OutOfMemoryBudget, requested_bytes, run_capped
from moekit.plan import ladder
from moekit.training_setup import TrainingSetup

MiB = 2**20
BUDGET_BYTES = 850 * MiB
BASELINE = TrainingSetup(
    model="small", method="full", seq_len=4096, gpus_per_node=1, zero_stage=0, activation_checkpointing=False,
    gpu_memory_gb=BUDGET_BYTES / 2**30,  # the "card" is the budget
)


@pytest.fixture(scope="module")
def failed() -> CappedResult:
    return run_capped(BASELINE, BUDGET_BYTES, device="cpu", timeout_s=300)


def test_capped_step_fails_with_a_message_naming_budget_and_peak(failed):
    assert not failed.passed
    assert failed.peak_bytes > BUDGET_BYTES
    assert failed.error.startswith(
        f"out of memory: this step needs at least {failed.peak_bytes / MiB:,.0f} MiB but the budget is 850 MiB ("
    )
    assert "small full bf16" in failed.error and "resident memory passed the budget" in failed.error
    assert re.search(r"stopped during (forward|backward)", failed.error)
    assert failed.breakdown is None and failed.device == "cpu"


def test_failed_result_raises_for_the_learner(failed):
    with pytest.raises(OutOfMemoryBudget, match="out of memory: this step needs at least"):
        failed.raise_if_failed()


@pytest.fixture(scope="module")
def checkpointed() -> CappedResult:
    return run_capped(BASELINE.replace(activation_checkpointing=True), BUDGET_BYTES, device="cpu", timeout_s=300)


def test_checkpointing_makes_the_same_step_pass_under_the_same_cap(failed, checkpointed):
    mitigated = checkpointed
    assert mitigated.passed and mitigated.error is None
    assert BUDGET_BYTES // 2 < mitigated.peak_bytes <= BUDGET_BYTES
    assert mitigated.baseline_bytes > 100 * MiB  # Python, torch and transformers are not charged to the budget
    assert mitigated.summary().startswith(f"passed: peak {mitigated.peak_bytes / MiB:,.0f} MiB of a 850 MiB budget")
    measured = mitigated.breakdown
    assert measured.source == "measure" and measured.total_bytes <= mitigated.peak_bytes
    assert mitigated.raise_if_failed() is mitigated


def test_under_a_data_limit_pytorchs_own_cpu_allocator_raises_out_of_memory():
    refused = run_capped(BASELINE, BUDGET_BYTES, device="cpu", timeout_s=300, cpu_cap="rlimit")
    assert not refused.passed and refused.peak_bytes > BUDGET_BYTES
    assert refused.allocator_error.startswith("RuntimeError: [enforce fail at alloc_cpu.cpp")
    asked = int(re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", refused.allocator_error)[1])
    assert 0 < asked <= refused.peak_bytes  # the one tensor the kernel refused, at the moment the budget broke
    assert refused.allocator_error.split(": ", 1)[1] in refused.error


def test_a_budget_that_is_not_a_byte_count_is_refused():
    with pytest.raises(MemcapError, match="positive number of bytes"):
        run_capped(BASELINE, 0)
    with pytest.raises(MemcapError, match="positive number of bytes"):
        run_capped(BASELINE, 0.5)


def test_a_budget_beyond_this_machine_is_refused_before_running():
    with pytest.raises(MemcapError, match="more than this machine's available RAM"):
        run_capped(BASELINE, 2**50, device="cpu", timeout_s=120)


def test_cuda_without_a_gpu_says_to_use_the_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MemcapError, match="device='cuda' but torch sees no GPU"):
        run_capped(BASELINE, BUDGET_BYTES, device="cuda", timeout_s=120)


def test_requested_bytes_reads_torch_cuda_oom_messages():
    message = "CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.19 GiB"
    assert requested_bytes(message) == int(2.5 * 2**30)
    assert requested_bytes("Tried to allocate 20.00 MiB (GPU 0; 15.78 GiB total capacity)") == 20 * MiB
    assert requested_bytes("something else") == 0


@pytest.mark.parametrize("order", [("checkpointing",), ("lora",)])
def test_the_planners_ladder_on_a_toy_agrees_with_capped_steps(order, failed, checkpointed):
    """Each rung's verdict (the estimate without the CUDA context a CPU lacks) is what the capped step does."""
    rungs = ladder(BASELINE, order, estimator=lambda setup: without_overhead(estimate(setup)))
    assert [(rung.change, rung.fits) for rung in rungs] == [("baseline", False), (order[0], True)]
    assert not failed.passed and rungs[0].setup == failed.setup
    mitigated = checkpointed if order == ("checkpointing",) else run_capped(rungs[1].setup, BUDGET_BYTES, device="cpu", timeout_s=300)
    assert mitigated.setup == rungs[1].setup and mitigated.passed, mitigated.summary()
