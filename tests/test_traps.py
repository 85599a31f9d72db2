"""The field traps (issue 16): loading, the router's loss, the logits wall, QLoRA's 16-bit experts, optimizers,
the allocator's reserve. Each trap's bytes are checked against transformers' code or exact arithmetic."""

from __future__ import annotations

import json

import pytest

from moekit.catalog import preset_dir
from moekit.cli import main
from moekit.estimate import (
    CUDA_CONTEXT_BYTES,
    EXPANDABLE_SEGMENTS_RESERVE_BYTES,
    estimate,
    model_facts,
    num_trainable_params,
)
from moekit.plan import ARTICLE_ORDER, first_advice, ladder, trap_rungs
from moekit.training_setup import SetupError, TrainingSetup
from moekit.traps import adapter_precision, router_loss_facts, simulate_router_aux_loss_bytes
from moekit.zero import ds_config


def test_router_aux_loss_of_qwen3_30b_a3b_at_8192_tokens_matches_transformers_on_fake_tensors_within_2_percent():
    setup = TrainingSetup(model="qwen3-30b-a3b", seq_len=8192, router_aux_loss=True)
    term = estimate(setup).per_gpu["activations"] - estimate(setup.replace(router_aux_loss=False)).per_gpu["activations"]
    simulated = simulate_router_aux_loss_bytes("qwen3-30b-a3b", 8192, "bf16")
    assert term == 48 * 8192 * 128 * 2  # one bf16 softmax of tokens x experts per MoE layer
    assert abs(term - simulated) / simulated < 0.02


def test_router_aux_loss_follows_the_models_config_unless_the_knob_says_otherwise(tmp_path):
    preset = json.loads((preset_dir() / "tiny.json").read_text())
    preset["output_router_logits"] = True
    (tmp_path / "config.json").write_text(json.dumps(preset))
    on_by_config = TrainingSetup(model=str(tmp_path), gpus_per_node=1)
    off_by_config = TrainingSetup(model="tiny", gpus_per_node=1)
    assert router_loss_facts(str(tmp_path)) == (True, True)
    assert "on (the model's config)" in estimate(on_by_config).notes["router_aux_loss"]
    assert "off (the model's config" in estimate(off_by_config).notes["router_aux_loss"]
    assert estimate(on_by_config.replace(router_aux_loss=False)).per_gpu["activations"] == \
        estimate(off_by_config).per_gpu["activations"]


def test_a_model_without_transformers_router_loss_counts_nothing_for_it():
    setup = TrainingSetup(model="deepseek-v3", zero_stage=3, gpus_per_node=8, num_nodes=8, router_aux_loss=True)
    assert router_loss_facts("deepseek-v3")[0] is False
    assert estimate(setup).per_gpu == estimate(setup.replace(router_aux_loss=False)).per_gpu
    assert "no load_balancing_loss_func" in estimate(setup).notes["router_aux_loss"]


def test_plain_from_pretrained_puts_the_whole_16bit_model_in_host_ram_once_per_rank_and_fits_says_so():
    setup = TrainingSetup(zero_stage=3, activation_checkpointing=True, host_memory_gb=512, load_path="from_pretrained")
    f = model_facts(setup.model)
    bf16_model = 2 * f.num_params + 2 * f.num_fp32_params  # 16-bit weights, fp32-kept ones at 4 bytes
    plain = estimate(setup)
    assert plain.load_host_bytes == 8 * bf16_model
    assert plain.load_gpu_bytes > bf16_model
    assert plain.fits is False and "to load the weights" in plain.verdict()
    zero_init = estimate(setup.replace(load_path="auto"))  # ZeRO-3 loads under zero.Init
    assert zero_init.load_gpu_bytes < plain.load_gpu_bytes / 4
    assert zero_init.fits is True
    assert zero_init.as_dict()["load"] == {"gpu_bytes": zero_init.load_gpu_bytes,
                                           "host_bytes_per_node": zero_init.load_host_bytes}


def test_gpt_oss_mxfp4_dequantized_on_load_does_not_fit_8x40gb_with_zero3_and_offload_though_the_step_does():
    setup = TrainingSetup(model="gpt-oss-20b", zero_stage=3, offload="optimizer+params", activation_checkpointing=True)
    breakdown = estimate(setup)
    assert breakdown.total_bytes < setup.gpu_memory_bytes < breakdown.load_gpu_bytes
    assert not breakdown.fits and "MXFP4" in breakdown.notes["load"]
    assert first_advice(breakdown).startswith("the step fits but loading the weights needs")
    assert estimate(setup.replace(gpu_memory_gb=80)).fits


def test_qlora_note_says_which_parameters_are_4bit_and_that_fused_experts_stay_16bit(capsys):
    breakdown = estimate(TrainingSetup(method="qlora"))
    note = breakdown.notes["qlora"]
    assert "bitsandbytes#1849" in note and "fused expert tensors" in note
    f = model_facts("mixtral-8x7b")
    num_experts = sum(layer.count("experts") for layer in f.layers)
    assert f"{num_experts / 1e9:.2f}B fused expert tensors" in note
    assert breakdown.load_gpu_bytes > breakdown.per_gpu["weights"]  # plus one 16-bit module being quantized
    assert main(["estimate", "--method", "qlora", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["notes"]["qlora"] == note and printed["load"]["gpu_bytes"] == breakdown.load_gpu_bytes


def test_fused_loss_removes_exactly_the_fp32_log_softmax_from_what_forward_keeps():
    setup = TrainingSetup(model="qwen3-30b-a3b", seq_len=8192, zero_stage=3, activation_checkpointing=True)
    hf, fused = estimate(setup), estimate(setup.replace(loss_impl="fused"))
    f = model_facts(setup.model)
    # Both keep one [hidden] tensor besides: hf the frozen lm_head's input (DeepSpeed's ZeRO-3 linear saves
    # it), fused the input gradient it computes in forward.
    assert hf.per_gpu["activations"] - fused.per_gpu["activations"] == 8192 * 4 * f.vocab
    zero2 = setup.replace(zero_stage=2)
    assert (estimate(zero2).per_gpu["activations"] - estimate(zero2.replace(loss_impl="fused")).per_gpu["activations"]
            == 8192 * (4 * f.vocab - 2 * f.hidden))
    chunked = estimate(setup.replace(loss_impl="chunked"))
    assert chunked.per_gpu["activations"] - fused.per_gpu["activations"] == 8192 * 4  # cut-cross-entropy's lse
    assert "ESTIMATE ONLY" in fused.notes["loss"] and "ESTIMATE ONLY" not in hf.notes["loss"]


def test_lora_adapters_stay_fp32_only_under_zero3_zero_init_and_the_plan_offers_to_keep_them_16bit():
    lora3 = TrainingSetup(model="mixtral-8x7b", method="lora", zero_stage=3, seq_len=4096, gpus_per_node=8)
    assert adapter_precision(lora3, "mixtral") == "fp32"
    for same in (lora3.replace(zero_stage=2), lora3.replace(load_path="from_pretrained"),
                 lora3.replace(autocast_adapter_dtype=False), lora3.replace(method="full")):
        assert adapter_precision(same, "mixtral") == "bf16"
    assert adapter_precision(lora3.replace(precision="fp32"), "mixtral") == "fp32"
    upcast, kept = estimate(lora3), estimate(lora3.replace(autocast_adapter_dtype=False))
    f = model_facts(lora3.model)
    # q, k, v and o_proj (input widths 4096 each) upcast their input to fp32 in all 32 layers; LoRA A's 16 outputs too
    copies = 4096 * 32 * (4 * 4 * 4096 + 2 * 4 * 16)
    lora_adapters = num_trainable_params(lora3)
    assert upcast.per_gpu["activations"] - kept.per_gpu["activations"] == copies + 32 * 2 * 8 * 16 * (
        2 * f.hidden + 3 * 14336)  # and the experts' baddbmm keeps 16-bit copies of A and B
    assert upcast.per_gpu["weights"] - kept.per_gpu["weights"] == 2 * -(-lora_adapters // 8)
    assert "8.00 GiB of activations" in upcast.notes["adapters"] and "adapters" not in kept.notes
    saved = {rung.change: rung.saved_bytes for rung in trap_rungs(lora3)}
    assert saved["adapters_not_upcast"] > 8 * 2**30
    assert "adapters_not_upcast" not in {rung.change for rung in trap_rungs(lora3.replace(zero_stage=2))}


def test_8bit_adamw_keeps_two_bytes_and_an_absmax_per_256_values_and_ds_config_accepts_the_client_optimizer():
    setup = TrainingSetup(model="tiny", gpus_per_node=1, zero_stage=1)
    owned = num_trainable_params(setup)
    saved = estimate(setup).per_gpu["optimizer_states"] - estimate(setup.replace(optimizer="adamw_8bit")).per_gpu[
        "optimizer_states"]
    assert saved == 8 * owned - int(2 * (1 + 4 / 256) * owned)
    assert ds_config(setup.replace(optimizer="adamw_8bit"))["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in ds_config(setup)
    with pytest.raises(SetupError, match="use optimizer='adamw' with offload"):
        setup.replace(offload="optimizer", optimizer="paged_adamw")


def test_expandable_segments_leave_the_cuda_context_and_page_rounding_as_overhead_and_the_output_explains_it():
    setup = TrainingSetup(zero_stage=3, activation_checkpointing=True)
    default, expandable = estimate(setup), estimate(setup.replace(expandable_segments=True))
    assert expandable.per_gpu["overhead"] == CUDA_CONTEXT_BYTES + EXPANDABLE_SEGMENTS_RESERVE_BYTES
    assert default.per_gpu["overhead"] > expandable.per_gpu["overhead"]
    assert "expandable_segments:True" in default.notes["overhead"] and "CUDA context" in default.notes["overhead"]


def test_plan_for_the_articles_run_names_the_field_trap_rungs_that_apply(capsys):
    rungs = ladder(TrainingSetup(), ARTICLE_ORDER)
    traps = {rung.change: rung for rung in trap_rungs(rungs[-1].setup)}
    assert {"fused_loss", "expandable_segments"} <= set(traps)
    assert "router_loss_off" not in traps  # Mixtral's config leaves the router's loss off
    assert all(rung.saved_bytes > 0 for rung in traps.values())
    assert main(["plan", "--json", "--top", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [rung["change"] for rung in printed["traps"]] == list(traps)

