"""The planner: what fits, the ranking's cost model, the ladder, and impossible constraints."""

import json

import pytest

from moekit.cli import main
from moekit.errors import MoekitError
from moekit.estimate import estimate
from moekit.plan import Constraints, constraints_from_setup, ladder, plan, step_time
from moekit.training_setup import TrainingSetup

ARTICLE = TrainingSetup(seq_len=12288, precision="fp16", grad_accum=25)


def test_the_articles_ladder_starts_out_of_memory_and_ends_in_a_fit():
    rungs = ladder(ARTICLE, min_seq_len=11000)
    assert rungs[0].change == "baseline" and not rungs[0].fits
    assert rungs[-1].fits and all(not r.fits for r in rungs[:-1])
    for before, after in zip(rungs, rungs[1:]):
        assert after.saved_bytes == before.breakdown.total_bytes - after.breakdown.total_bytes
        assert after.breakdown.total_bytes == estimate(after.setup).total_bytes
    names = [r.change for r in rungs]
    assert names.index("zero3") < names.index("checkpointing")
    assert "mixed_precision" not in names  # already fp16: a rung that changes nothing is skipped


def test_the_ladder_follows_a_user_order():
    rungs = ladder(ARTICLE, order=["checkpointing", "zero3"])
    assert [r.change for r in rungs] == ["baseline", "checkpointing", "zero3"]
    assert rungs[-1].fits and not rungs[1].fits  # checkpointing alone leaves 87 GiB of ZeRO-2 weights


def test_unknown_mitigation_lists_the_known_ones():
    with pytest.raises(MoekitError, match="choose from lora, lower_rank"):
        ladder(ARTICLE, order=["more_gpus"])


def test_every_setup_plan_returns_fits_by_estimate():
    result = plan(constraints_from_setup(ARTICLE, min_seq_len=11000))
    assert result.num_fit > 0 and result.fits
    for candidate in result.fits:
        assert estimate(candidate.setup).fits
        assert candidate.setup.global_batch == ARTICLE.global_batch
    assert result.best.setup.seq_len == 12288  # the longest sequence that fits comes first
    times = [c.time.total_s for c in result.fits if c.setup.seq_len == 12288]
    assert times == sorted(times)


def test_cost_model_on_hand_checked_pairs():
    base = TrainingSetup(zero_stage=2, seq_len=4096)
    assert step_time(base.replace(activation_checkpointing=True)).compute_s == pytest.approx(
        step_time(base).compute_s * 6 / 4  # LoRA: forward 2 + backward 2, recomputation adds 2
    )
    assert step_time(base.replace(zero_stage=3)).communication_s > 10 * step_time(base).communication_s
    assert step_time(base.replace(offload="optimizer")).offload_s > 0 == step_time(base).offload_s
    assert step_time(base.replace(method="full")).compute_s == pytest.approx(step_time(base).compute_s * 6 / 4)
    # the same tokens in smaller micro-batches run less efficiently
    small = base.replace(seq_len=512, micro_batch=1, grad_accum=8)
    large = base.replace(seq_len=512, micro_batch=8, grad_accum=1)
    assert step_time(small).compute_s > step_time(large).compute_s


def test_impossible_constraints_say_how_far_the_closest_misses():
    result = plan(Constraints(gpus_per_node=1, gpu_memory_gb=24, methods=("full",), offloads=("none",)))
    assert result.fits == [] and result.best is None
    assert result.closest.breakdown.headroom_bytes < 0
    miss_gib = -result.closest.breakdown.headroom_bytes / 2**30
    assert f"needs {miss_gib:.1f} GiB more per GPU" in result.verdict()


def test_host_ram_is_checked_for_offload():
    roomy = plan(Constraints(gpus_per_node=1, gpu_memory_gb=80, methods=("full",)))
    assert any(c.setup.offload != "none" for c in roomy.fits)
    tight = plan(Constraints(gpus_per_node=1, gpu_memory_gb=80, methods=("full",), host_memory_gb=256))
    assert tight.fits == []


def test_plan_cli_json(capsys):
    assert main(["plan", "--seq", "12288", "--precision", "fp16", "--grad-accum", "25", "--json", "--top", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["fits"]) == 3 and all(c["fits"] for c in data["fits"])
    assert data["ladder"][0]["change"] == "baseline" and data["ladder"][0]["fits"] is False
    assert data["ladder"][-1]["fits"] is True
    assert set(data["ladder"][1]) >= {"change", "per_gpu", "fits"}
