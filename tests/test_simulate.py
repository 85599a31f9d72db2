"""simulate: a full-size training step on FakeTensors, arranged as one DeepSpeed rank holds it."""

import json
import math

import pytest

from moekit.cli import main
from moekit.lora import lora_census
from moekit.models import build_model, parameter_census
from moekit.simulate import layer_costs, simulate, simulate_per_layer, simulate_step
from moekit.step import StepError
from moekit.training_setup import LoraSpec, TrainingSetup
from moekit.zero_knobs import deepspeed_defaults

REDUCE_BUCKET_ELEMENTS = deepspeed_defaults()["reduce_bucket_size"]

MIXTRAL_PARAMS = 46_702_792_704
MIXTRAL_LORA_R16 = 223_346_688  # q/k/v/o + both fused expert tensors, every layer
STEP_COUNTER_BYTES = 4  # torch AdamW's fp32 "step" tensor, one per optimizer tensor

TINY = TrainingSetup(model="tiny", seq_len=64, gpus_per_node=3, zero_stage=0)


def flat_partition(num_trainable: int, world_size: int) -> int:
    """DeepSpeed ZeRO-1/2: the flat buffer padded to a multiple of 2 x world size, split evenly."""
    return 2 * math.ceil(num_trainable / (2 * world_size))


def tiny_lora_params() -> int:
    return lora_census("tiny", TINY.lora).num_trainable_params


# --------------------------------------------------------------------------------------------
# Full size: Mixtral 8x7B, the article's kind of run (one 32-layer step, about a minute)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral_zero2():
    setup = TrainingSetup(model="mixtral-8x7b", seq_len=4096, zero_stage=2, gpus_per_node=8)
    return setup, simulate_step(setup, progress=False)


def test_full_mixtral_weights_are_every_parameter_plus_adapters_in_bf16(mixtral_zero2):
    _, record = mixtral_zero2
    assert record.num_layers == 32
    assert record.num_trainable_params == MIXTRAL_LORA_R16
    assert record.breakdown.per_gpu["weights"] == 2 * (MIXTRAL_PARAMS + MIXTRAL_LORA_R16)


def test_full_mixtral_zero2_partitions_lora_states_exactly_per_rank(mixtral_zero2):
    _, record = mixtral_zero2
    owned = flat_partition(MIXTRAL_LORA_R16, 8)
    assert owned == 27_918_336
    assert record.breakdown.per_gpu["gradients"] == 2 * owned  # 16-bit gradient partition
    assert record.breakdown.per_gpu["optimizer_states"] == 12 * owned + STEP_COUNTER_BYTES  # fp32 master, m, v
    assert record.phases["optimizer_peak"]["temporaries"] >= 4 * owned  # the fp32 gradient of the partition


def test_full_mixtral_lora_on_fused_experts_saves_the_merged_expert_weights(mixtral_zero2):
    setup, record = mixtral_zero2
    costs = layer_costs(setup, progress=False)
    # The full 32-layer run is exactly outside + 32 x one layer.
    forward = costs.phases_at(32)["forward"]
    assert record.breakdown.per_gpu["activations"] == forward["activations"]
    # peft folds W + scale * B @ A into new 16-bit expert tensors every forward; autograd keeps them:
    # 2 bytes x 1,409,286,144 expert parameters per layer, on top of the per-token activations.
    merged_expert_bytes = 2 * 1_409_286_144
    per_layer = costs.per_layer["forward"]["activations"]
    plain = layer_costs(setup.replace(lora_targets=("attention",)), progress=False).per_layer["forward"]["activations"]
    assert per_layer - plain > merged_expert_bytes
    assert per_layer - plain < merged_expert_bytes + 4096 * 4096 * 20  # plus a few h per token


def test_per_layer_extrapolation_equals_the_full_run(mixtral_zero2):
    setup, record = mixtral_zero2
    extrapolated = simulate_per_layer(setup, progress=False)
    assert extrapolated.per_gpu == record.breakdown.per_gpu
    assert extrapolated.total_bytes == record.breakdown.total_bytes


# --------------------------------------------------------------------------------------------
# ZeRO stages and offload, exact per rank (tiny, fast)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stages_hold_deepspeed_states_for_lora(stage):
    n, trainable = 3, tiny_lora_params()
    owned = trainable if stage == 0 else flat_partition(trainable, n)
    breakdown = simulate(TINY.replace(zero_stage=stage), progress=False)
    assert breakdown.per_gpu["weights"] == 2 * (parameter_census("tiny").num_params + trainable)
    assert breakdown.per_gpu["optimizer_states"] == 12 * owned + STEP_COUNTER_BYTES
    assert breakdown.per_gpu["gradients"] == 2 * (trainable if stage < 2 else owned)


@pytest.mark.parametrize("stage", [1, 2])
def test_gradient_accumulation_holds_gradients_through_the_next_forward(stage):
    record = simulate_step(TINY.replace(zero_stage=stage, grad_accum=4), progress=False)
    trainable = tiny_lora_params()
    expected = 2 * (trainable if stage == 1 else flat_partition(trainable, 3))
    assert record.phases["model"]["gradients"] == record.phases["forward"]["gradients"] == expected
    # ZeRO-1 reduces only at the accumulation boundary, whose epilogue alone frees the two reduce buckets.
    held_buckets = 2 * 2 * REDUCE_BUCKET_ELEMENTS if stage == 1 else 0
    assert record.phases["forward"]["buffers"] == pytest.approx(held_buckets, abs=1024)  # + the model's rotary buffers


def test_zero3_partitions_every_parameter_and_gathers_one_unit_at_a_time():
    n = 3
    record = simulate_step(TINY.replace(zero_stage=3, method="full"), progress=False)
    census = parameter_census("tiny")
    per_param_partition = sum(math.ceil(p.numel() / n) for p in build_model("tiny", "meta").parameters())
    assert record.breakdown.per_gpu["weights"] == 2 * per_param_partition
    assert record.breakdown.per_gpu["gradients"] == 2 * per_param_partition
    assert record.breakdown.per_gpu["optimizer_states"] == 12 * per_param_partition + STEP_COUNTER_BYTES
    # DeepSpeed keeps a unit gathered after forward when its backward comes within stage3_max_reuse_distance
    # (1e9) parameters of trace: for a model this small, every unit (measured on the real engine: issue 14).
    gathered = int(record.notes["zero3_max_gathered_bytes"])
    assert gathered == 2 * census.num_params
    assert record.phases["forward"]["buffers"] - record.phases["model"]["buffers"] == 2 * census.num_params


def test_offload_moves_optimizer_states_and_gradients_to_the_host():
    n, trainable = 3, tiny_lora_params()
    owned = flat_partition(trainable, n)
    breakdown = simulate(TINY.replace(zero_stage=2, offload="optimizer"), progress=False)
    assert breakdown.per_gpu["optimizer_states"] == 0
    assert breakdown.per_gpu["gradients"] == 0
    assert breakdown.per_host == {"optimizer_states": 3 * 12 * owned, "gradients": 3 * 4 * owned}


def test_buckets_are_deepspeed_default_reduce_buckets():
    record = simulate_step(TINY.replace(zero_stage=2, method="full"), progress=False)
    assert record.phases["backward_peak"]["buffers"] >= 2 * 2 * REDUCE_BUCKET_ELEMENTS
    assert record.phases["optimizer_step"]["buffers"] < 2 * REDUCE_BUCKET_ELEMENTS  # freed after backward


@pytest.mark.parametrize("stage", [2, 3])
def test_a_smaller_reduce_bucket_flows_into_the_simulated_step_and_the_estimate_alike(stage):
    from moekit.estimate import estimate

    small = TINY.replace(zero_stage=stage, method="full", reduce_bucket_size=10_000_000)
    record = simulate_step(small, progress=False)
    buckets = (2 if stage == 2 else 1) * 2 * 10_000_000  # bf16 elements
    assert buckets <= record.phases["backward_peak"]["buffers"] < buckets + 2**20 + (stage == 3) * 2 * 10**6
    default = estimate(small.replace(reduce_bucket_size=None)).per_gpu["buffers"]
    shrunk = estimate(small).per_gpu["buffers"]
    assert default - shrunk == (2 if stage == 2 else 1) * 2 * (REDUCE_BUCKET_ELEMENTS - 10_000_000)


# --------------------------------------------------------------------------------------------
# Activations: checkpointing, precision, attention
# --------------------------------------------------------------------------------------------


def test_checkpointing_keeps_exactly_the_layer_inputs():
    setup = TINY.replace(activation_checkpointing=True, seq_len=128)
    costs = layer_costs(setup, progress=False)
    hidden = 64
    assert costs.per_layer["forward"]["activations"] == 2 * hidden * 128  # one bf16 hidden state per token


def test_eager_attention_adds_the_seq_squared_scores():
    sdpa = layer_costs(TINY.replace(seq_len=256), progress=False).per_layer["forward"]["activations"]
    eager = layer_costs(TINY.replace(seq_len=256, attn_implementation="eager"), progress=False).per_layer["forward"]["activations"]
    heads = 4
    assert eager - sdpa >= 4 * heads * 256 * 256  # at least the bf16 scores and probabilities


def test_fp32_simulates_fused_experts_at_twice_the_bf16_bytes():
    bf16 = simulate(TINY.replace(method="full"), progress=False)
    fp32 = simulate(TINY.replace(method="full", precision="fp32"), progress=False)
    assert fp32.per_gpu["weights"] == 4 * parameter_census("tiny").num_params
    assert fp32.per_gpu["weights"] == 2 * bf16.per_gpu["weights"]
    # fp32 stage 0: a plain AdamW on the parameters themselves, no master copy (one step counter per tensor)
    num_tensors = len(list(build_model("tiny", "meta").parameters()))
    assert fp32.per_gpu["optimizer_states"] == 8 * parameter_census("tiny").num_params + STEP_COUNTER_BYTES * num_tensors


def test_qlora_is_refused_with_a_reason():
    with pytest.raises(StepError, match="bitsandbytes"):
        simulate(TINY.replace(method="qlora"), progress=False)


def test_lora_spec_is_honoured():
    small_r = simulate(TINY.replace(lora=LoraSpec(r=4, alpha=8, targets=("attention",))), progress=False)
    big_r = simulate(TINY.replace(lora=LoraSpec(r=16, alpha=32, targets=("attention",))), progress=False)
    assert big_r.per_gpu["optimizer_states"] > small_r.per_gpu["optimizer_states"]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_simulate_json(capsys):
    assert main(["simulate", "--model", "tiny", "--seq", "64", "--gpus", "2", "--no-progress", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "simulate"
    assert data["per_gpu"]["weights"] > 0 and data["per_gpu"]["total"] >= data["per_gpu"]["activations"]


def test_cli_simulate_table_per_layer(capsys):
    assert main(["simulate", "--model", "tiny", "--seq", "64", "--per-layer", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "total (peak)" in out and "activations" in out
