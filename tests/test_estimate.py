"""The analytic memory model: exact model states, activation terms, the article's verdict, bad input."""

import json

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from moekit.cli import main
from moekit.estimate import (
    estimate,
    layer_bytes_per_token,
    model_facts,
    num_trainable_params,
    zero3_kept_gathered_params,
    zero3_layers_with_experts_gathered,
)
from moekit.models import parameter_census
from moekit.training_setup import LoraSpec, TrainingSetup
from moekit.zero_knobs import deepspeed_defaults

P_MIXTRAL = 46_702_792_704
LORA_MIXTRAL = 223_346_688  # r=16 on q/k/v/o and both fused expert tensors


def full(**changes) -> TrainingSetup:
    return TrainingSetup(method="full", **changes)


def test_the_articles_baseline_does_not_fit_and_says_why():
    baseline = TrainingSetup(seq_len=12288, precision="fp16", zero_stage=2, gpu_memory_gb=40)
    result = estimate(baseline)
    assert result.fits is False and result.headroom_bytes < 0
    # ZeRO-2 keeps every 16-bit weight on every GPU: 87 GiB before a single activation.
    assert result.per_gpu["weights"] == 2 * (P_MIXTRAL + LORA_MIXTRAL)
    assert result.per_gpu["weights"] > baseline.gpu_memory_bytes
    assert result.largest_category() == "activations"


def test_full_zero2_model_states_equal_the_zero_papers_16_bytes_per_param():
    setup = full(zero_stage=2)
    states = estimate(setup).per_gpu
    n = setup.world_size
    assert states["weights"] == 2 * P_MIXTRAL
    assert states["gradients"] == 2 * (P_MIXTRAL // n)
    assert states["optimizer_states"] == 12 * (P_MIXTRAL // n)


def test_zero2_states_plus_step_gradient_equal_deepspeeds_own_estimator():
    setup = full(zero_stage=2, activation_checkpointing=False, seq_len=16)
    result = estimate(setup)
    _, ds_gpu_bytes = estimate_zero2_model_states_mem_needs(P_MIXTRAL, num_gpus_per_node=8, cpu_offload=False)
    fp32_grad_partition = 4 * (P_MIXTRAL // 8)
    assert result.model_state_bytes + fp32_grad_partition == ds_gpu_bytes


def test_zero3_partitions_weights_and_offload_moves_states_to_the_host():
    z3 = estimate(full(zero_stage=3)).per_gpu
    assert z3["weights"] == 2 * (P_MIXTRAL // 8)
    _, ds_gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        P_MIXTRAL, 0, num_gpus_per_node=8, cpu_offload=False, cpu_offload_params=False
    )
    # DeepSpeed's ZeRO-3 estimator (18P/N) leaves out the 16-bit gradient partition that moekit keeps.
    fp32_grad_partition = 4 * (P_MIXTRAL // 8)
    assert z3["weights"] + z3["optimizer_states"] + fp32_grad_partition == ds_gpu_bytes
    assert z3["gradients"] == 2 * (P_MIXTRAL // 8)
    off = estimate(full(zero_stage=3, offload="optimizer+params"))
    assert off.per_gpu["weights"] == off.per_gpu["optimizer_states"] == off.per_gpu["gradients"] == 0
    assert off.per_host["optimizer_states"] == 8 * 12 * (P_MIXTRAL // 8)
    assert off.per_host["weights"] == 8 * 2 * (P_MIXTRAL // 8)


def test_lora_freezes_the_base_no_gradients_or_optimizer_state_for_it():
    lora = estimate(TrainingSetup(zero_stage=0, gpus_per_node=1)).per_gpu
    assert num_trainable_params(TrainingSetup()) == LORA_MIXTRAL
    assert lora["gradients"] == 2 * LORA_MIXTRAL
    assert lora["optimizer_states"] == 12 * LORA_MIXTRAL


def test_fp32_keeps_a_master_copy_in_every_zero_optimizer_but_not_without_zero():
    stage1 = estimate(full(precision="fp32", zero_stage=1)).per_gpu
    assert stage1["weights"] == 4 * P_MIXTRAL
    assert stage1["optimizer_states"] == 12 * (P_MIXTRAL // 8)  # single_partition_of_fp32_groups clones it
    # stage 3 clones too: its no-copy branch compares torch.device("cpu") with "cpu", which is False (measured on
    # the real engine: an fp32 clone of the partition, issue 14)
    assert torch.zeros(1).device != "cpu"
    stage3 = estimate(full(precision="fp32", zero_stage=3)).per_gpu
    assert stage3["optimizer_states"] == 12 * (P_MIXTRAL // 8)
    stage0 = estimate(full(precision="fp32", zero_stage=0)).per_gpu
    assert stage0["optimizer_states"] == 8 * P_MIXTRAL  # m and v only: the plain optimizer steps the weights


def test_qlora_quantizes_only_the_linear_layers():
    qlora = estimate(TrainingSetup(method="qlora")).per_gpu["weights"]
    lora = estimate(TrainingSetup(method="lora")).per_gpu["weights"]
    attention_params = 32 * 41_943_040  # the only nn.Linear weights transformers 5 can quantize in Mixtral
    assert lora - qlora == pytest.approx(attention_params * (2 - 0.515869), rel=1e-5)


@pytest.mark.parametrize(
    "model, method, expected",
    [  # MemTracker on fake tensors, bytes saved per token by one middle layer (see docs/memory_model.md)
        ("mixtral-8x7b", "full", 348_412),
        ("mistral-7b", "full", 200_840),
        ("small", "full", 16_028),
        ("olmoe-1b-7b", "full", 205_408),
        ("qwen1.5-moe-a2.7b", "full", 176_578),
    ],
)
def test_layer_activation_terms_match_memtracker(model, method, expected):
    assert layer_bytes_per_token(TrainingSetup(model=model, method=method)) == pytest.approx(expected, abs=60)


def test_moe_activations_scale_with_top_k_not_with_experts():
    facts = model_facts("mixtral-8x7b")
    full_ft = TrainingSetup(method="full")
    # the routed experts' share: k copies of (4h + 8f + 4) bytes
    expert_share = facts.experts_per_token * (4 * facts.hidden + 8 * facts.expert_ffn + 4)
    assert expert_share / layer_bytes_per_token(full_ft) == pytest.approx(0.7524, abs=1e-3)


def test_checkpointing_keeps_one_hidden_state_per_layer():
    plain = estimate(TrainingSetup(seq_len=4096))
    ckpt = estimate(TrainingSetup(seq_len=4096, activation_checkpointing=True))
    assert ckpt.per_gpu["activations"] < plain.per_gpu["activations"] / 20
    assert ckpt.per_gpu["temporaries"] > plain.per_gpu["temporaries"]  # one layer recomputed in backward


def test_activations_grow_linearly_with_tokens_under_sdpa_and_quadratically_under_eager():
    def acts(seq, attn):
        return estimate(full(seq_len=seq, attn_implementation=attn)).per_gpu["activations"]

    assert acts(8192, "sdpa") == pytest.approx(2 * acts(4096, "sdpa"), rel=1e-3)
    assert acts(8192, "eager") - acts(8192, "sdpa") == pytest.approx(4 * (acts(4096, "eager") - acts(4096, "sdpa")), rel=0.05)


def test_lora_on_fused_experts_keeps_a_merged_copy_of_every_layers_experts():
    with_experts = estimate(TrainingSetup(seq_len=1024)).per_gpu["activations"]
    attention_only = estimate(TrainingSetup(seq_len=1024, lora=LoraSpec(targets=("attention",)))).per_gpu["activations"]
    merged = 32 * 2 * 1_409_286_144
    assert with_experts - attention_only > merged


def test_estimate_cli_json_has_the_documented_keys(capsys):
    assert main(["estimate", "--seq", "12288", "--precision", "fp16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"per_gpu", "per_host", "gpu_memory_bytes", "fits", "headroom_bytes"}
    assert data["fits"] is False
    categories_sum = sum(v for k, v in data["per_gpu"].items() if k != "total")
    # the peak: the ZeRO-2 buckets arrive after the fp32 log-softmax is freed, so it is below the plain sum
    assert data["per_gpu"]["weights"] < data["per_gpu"]["total"] < categories_sum


def test_estimate_cli_rejects_bad_setups_in_one_line(capsys):
    assert main(["estimate", "--zero", "2", "--offload", "optimizer+params"]) == 2
    assert "offloading parameters needs ZeRO-3" in capsys.readouterr().err


def test_nvme_offload_moves_the_offloaded_states_from_host_ram_to_disk():
    on_cpu = TrainingSetup(zero_stage=3, offload="optimizer+params")
    on_nvme = on_cpu.replace(offload_device="nvme", nvme_path="/local/nvme")
    cpu_breakdown, nvme_breakdown = estimate(on_cpu), estimate(on_nvme)
    assert nvme_breakdown.per_gpu == cpu_breakdown.per_gpu
    assert set(cpu_breakdown.per_host) == {"optimizer_states", "gradients", "weights"} and nvme_breakdown.per_host == {}
    on_disk_gib = sum(cpu_breakdown.per_host.values()) / 2**30
    assert nvme_breakdown.notes["nvme"].startswith(f"{on_disk_gib:.1f} GiB per node (gradients, optimizer_states, weights) on NVMe")
    assert "/local/nvme" in nvme_breakdown.table() and nvme_breakdown.as_dict()["notes"] == nvme_breakdown.notes


def test_zero3_keeps_gathered_what_it_reuses_within_a_billion_parameters_of_trace():
    mixtral = TrainingSetup(model="mixtral-8x7b", method="full", zero_stage=3)
    # lm_head (131,072,000), the final norm (4,096) and the last layer's MoE block (experts 1,409,286,144 +
    # router 32,768); its attention's backward is 2 x 1.54e9 parameters of trace away
    assert zero3_kept_gathered_params(mixtral) == 131_072_000 + 4_096 + 1_409_286_144 + 32_768
    assert zero3_layers_with_experts_gathered(mixtral) == 1
    small = TrainingSetup(model="small", method="full", zero_stage=3)
    assert zero3_kept_gathered_params(small) == parameter_census("small").num_params  # the whole model


def test_zero3_transients_follow_deepspeeds_own_buffers():
    """Measured on the real engine (2 CPU ranks, small preset, 256 tokens): the peak is the end of forward, where the
    prefetch's flat all-gather buffer sits beside the gathered copies (1170.4 MiB on both ranks); the step holds the
    reduce bucket but no gathered weights (1138.0 MiB)."""
    mib = 2**20
    setup = TrainingSetup(model="small", method="full", zero_stage=3, gpus_per_node=2, seq_len=256)
    b = estimate(setup)
    num_params = model_facts("small").num_params
    assert b.per_gpu["temporaries"] == 2 * num_params  # the prefetch's flat buffer: the whole small model
    allocated = b.total_bytes - b.per_gpu["overhead"]
    assert allocated / mib == pytest.approx(1170.4, rel=0.003)
    # the step: 16-bit partition, fp32 master and moments, gradient partition, fp32 gradient, one reduce bucket
    owned = -(-num_params // 2)
    bucket = deepspeed_defaults()["reduce_bucket_size"]
    step = 2 * owned + 12 * owned + 2 * owned + (4 + 2) * owned + 2 * bucket
    assert step / mib == pytest.approx(1138.0, abs=0.5) and step < allocated
    # under optimizer offload ZeRO-3's 16-bit gradient partitions live on the host beside the fp32 ones
    off = estimate(full(zero_stage=3, offload="optimizer"))
    assert off.per_host["gradients"] == 8 * (4 + 2) * (P_MIXTRAL // 8)
    assert estimate(full(zero_stage=2, offload="optimizer")).per_host["gradients"] == 8 * 4 * (P_MIXTRAL // 8)
