"""LoRA on fused-expert MoE layouts: target resolution, peft configs, the exact census, QLoRA facts, CLI."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from moekit.cli import main
from moekit.errors import MoekitError
from moekit.lora import (
    LoraTargetError,
    QuantSpec,
    apply_lora,
    bitsandbytes_config,
    inventory_of_module,
    lora_census,
    num_quantized_params,
    num_unquantized_params,
    peft_config,
    peft_renamed_targets,
    qlora_spec,
    resolve_targets,
)
from moekit.models import build_model, parameter_census
from moekit.training_setup import LoraSpec, TrainingSetup

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _peft_counts(model_name: str, spec: LoraSpec) -> tuple[int, int]:
    return apply_lora(build_model(model_name, "meta"), spec).get_nb_trainable_parameters()


def _loss(model: torch.nn.Module) -> torch.Tensor:
    input_ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    return model(input_ids=input_ids, labels=input_ids).loss


# --- training on the CPU: exactly the adapters learn ---------------------------------------


@pytest.mark.parametrize("targets", ["attention,experts,router", "q_proj,v_proj,w1,w2,w3"])
def test_only_lora_params_get_gradients_on_tiny(targets):
    spec = LoraSpec(r=4, alpha=8, targets=targets)
    model = apply_lora(build_model("tiny", "cpu"), spec)
    # peft starts every lora_B at zero, so lora_A only sees a gradient after B has moved: take one step.
    _loss(model).backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.zero_grad()
    _loss(model).backward()

    params = dict(model.named_parameters())
    lora = {name for name in params if ".lora_A." in name or ".lora_B." in name}
    assert lora and {name for name, p in params.items() if p.requires_grad} == lora
    for name in lora:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    for name in params.keys() - lora:
        assert params[name].grad is None, name
    assert sum(params[name].numel() for name in lora) == lora_census("tiny", spec).num_trainable_params


# --- the census equals peft's own count ------------------------------------------------------


@pytest.mark.parametrize(
    "model_name, r, targets",
    [
        ("tiny", 4, "attention,experts"),
        ("tiny", 16, "all-linear,router"),
        ("tiny", 8, "q_proj,v_proj,w1,w2,w3"),
        ("tiny", 2, "lm_head,gate_up_proj,gate"),
        ("small", 16, "attention,experts"),
        ("small", 8, "router,down_proj"),
        ("qwen1.5-moe-a2.7b", 8, "all-linear"),
        ("qwen1.5-moe-a2.7b", 16, "shared_experts,router"),
        ("olmoe-1b-7b", 4, "attention,experts,router"),
        ("mistral-7b", 16, "all-linear"),
        ("mistral-7b", 8, "q_proj,gate_proj,up_proj,down_proj"),
    ],
)
def test_census_equals_peft_count(model_name, r, targets):
    spec = LoraSpec(r=r, alpha=2 * r, targets=targets)
    census = lora_census(model_name, spec)
    assert (census.num_trainable_params, census.num_total_params) == _peft_counts(model_name, spec)
    assert census.num_total_params == parameter_census(model_name).num_params + census.num_trainable_params


def test_full_mixtral_census_matches_reference_and_peft():
    spec = LoraSpec(r=16, alpha=32, targets=("attention", "experts"))
    census = lora_census("mixtral-8x7b", spec)
    assert census.num_trainable_params == 223_346_688
    assert census.num_total_params == 46_702_792_704 + 223_346_688
    assert round(100 * census.fraction, 3) == 0.476
    # per layer: q/o 16*(4096+4096), k/v 16*(4096+1024); experts 16*8*(28672+4096) and 16*8*(4096+14336)
    assert census.by_group == {"attention": 32 * 425_984, "experts": 32 * (4_194_304 + 2_359_296)}
    assert (census.num_trainable_params, census.num_total_params) == _peft_counts("mixtral-8x7b", spec)


def test_census_as_dict_has_the_documented_keys():
    data = lora_census("tiny", LoraSpec(r=4)).as_dict()
    assert {"num_trainable_params", "num_total_params", "by_group"} <= data.keys()
    assert sum(data["by_group"].values()) == data["num_trainable_params"]


def test_census_accepts_a_built_model_and_a_config():
    spec = LoraSpec(r=4, targets="attention")
    from_model = lora_census(build_model("small", "meta"), spec)
    assert from_model.num_trainable_params == lora_census("small", spec).num_trainable_params == 4 * 4 * 2 * (
        (256 + 256) + (256 + 128)
    )


def partition_like_zero3(model: torch.nn.Module) -> torch.nn.Module:
    """What deepspeed.zero.Init leaves on a rank: empty local tensors, the real shape in ds_shape / ds_numel."""
    for param in model.parameters():
        param.ds_shape, param.ds_numel = param.shape, param.numel()
        param.data = torch.empty(0, dtype=param.dtype)
    return model


def test_inventory_reads_zero3_partitioned_weights_by_their_full_shape():
    whole = inventory_of_module(build_model("tiny", "cpu"))
    partitioned = inventory_of_module(partition_like_zero3(build_model("tiny", "cpu")))
    assert partitioned == whole
    assert partitioned.num_params == parameter_census("tiny").num_params == 287_552
    assert any(shape.name.endswith("gate_up_proj") for shape in partitioned.shapes)


def test_census_equals_peft_when_layers_differ():
    # Qwen2-MoE with a dense MLP in layer 1: groups count only the layers that have them.
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
    )  # fmt: skip
    spec = LoraSpec(r=4, targets="all-linear,router")
    census = lora_census(config, spec)
    assert census.by_group["experts"] == 2 * 4 * 4 * ((64 + 64) + (64 + 32))
    assert census.by_group["mlp"] == 4 * ((64 + 96) * 3)
    assert (census.num_trainable_params, census.num_total_params) == apply_lora(
        build_model(config, "meta"), spec
    ).get_nb_trainable_parameters()


# --- resolving targets ----------------------------------------------------------------------


def test_groups_split_into_modules_and_fused_parameters():
    resolved = resolve_targets(LoraSpec(targets="attention,experts,router"), "mixtral-8x7b")
    assert resolved.target_modules == ATTENTION
    assert resolved.target_parameters == (*EXPERTS, "mlp.gate.weight")
    assert resolved.groups == {"attention": ATTENTION, "experts": EXPERTS, "router": ("mlp.gate.weight",)}
    assert resolved.notes == []


def test_peft_config_carries_spec_and_targets():
    config = peft_config(LoraSpec(r=8, alpha=16, targets="attention,experts"), "tiny")
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 16, 0.0, "none")
    assert set(config.target_modules) == set(ATTENTION) and list(config.target_parameters) == list(EXPERTS)
    assert config.task_type == "CAUSAL_LM"


def test_shared_experts_and_all_linear_on_qwen2_moe():
    resolved = resolve_targets(LoraSpec(targets="shared_experts"), "qwen1.5-moe-a2.7b")
    assert resolved.target_modules == (
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
        "mlp.shared_expert_gate",
    )
    everything = resolve_targets(LoraSpec(targets="all-linear"), "qwen1.5-moe-a2.7b")
    assert "lm_head" not in everything.names and "mlp.gate.weight" not in everything.names
    assert everything.target_parameters == EXPERTS
    assert "router" in everything.notes[0]


def test_raw_names_work_on_a_dense_model():
    resolved = resolve_targets(LoraSpec(targets="q_proj,gate_proj,up_proj,down_proj"), "mistral-7b")
    assert resolved.target_modules == ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert resolved.target_parameters == ()


def test_article_names_translate_to_the_fused_experts():
    resolved = resolve_targets(LoraSpec(targets="q_proj,k_proj,v_proj,o_proj,w1,w2,w3"), "mixtral-8x7b")
    assert resolved.target_modules == ATTENTION and resolved.target_parameters == EXPERTS
    assert resolved.rank_multipliers == {"mlp.experts.gate_up_proj": 2}
    assert "w1+w3 -> mlp.experts.gate_up_proj" in resolved.notes[0] and "w2 -> mlp.experts.down_proj" in resolved.notes[1]
    config = peft_config(LoraSpec(r=16, alpha=32, targets="w1,w2,w3"), "mixtral-8x7b")
    assert config.rank_pattern == {r".*\.gate_up_proj": 32} and config.alpha_pattern == {r".*\.gate_up_proj": 64}


def test_article_names_count_what_peft_itself_converts():
    spec = LoraSpec(r=16, alpha=32, targets="q_proj,k_proj,v_proj,o_proj,w1,w2,w3")
    raw = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"])
    peft_count = get_peft_model(build_model("tiny", "meta"), raw).get_nb_trainable_parameters()
    census = lora_census("tiny", spec)
    assert (census.num_trainable_params, census.num_total_params) == peft_count
    assert lora_census("mixtral-8x7b", spec).num_trainable_params == 357_564_416


def test_w2_alone_translates_without_w1_w3():
    resolved = resolve_targets(LoraSpec(targets="w2"), "tiny")
    assert resolved.target_parameters == ("mlp.experts.down_proj",) and resolved.rank_multipliers == {}


# --- every error says what to change -----------------------------------------------------------


@pytest.mark.parametrize("have, missing", [("w1", "w3"), ("w3", "w1")])
def test_half_of_a_fused_pair_is_refused_with_both_fixes(have, missing):
    with pytest.raises(LoraTargetError) as err:
        resolve_targets(LoraSpec(targets=f"q_proj,{have},w2"), "mixtral-8x7b")
    message = str(err.value)
    assert f"'{have}' cannot be targeted without '{missing}'" in message
    assert "gate_up_proj" in message and f"add '{missing}'" in message and "'experts'" in message
    assert f"drop '{have}'" in message


def test_experts_on_a_dense_model_is_a_clear_error():
    with pytest.raises(LoraTargetError, match="dense model: it has no experts.*mlp.gate_proj, mlp.up_proj, mlp.down_proj"):
        resolve_targets(LoraSpec(targets="experts"), "mistral-7b")


def test_router_on_a_dense_model_is_refused():
    with pytest.raises(LoraTargetError, match="has no router"):
        resolve_targets(LoraSpec(targets="router"), "mistral-7b")


def test_shared_experts_on_mixtral_lists_the_groups_it_has():
    with pytest.raises(LoraTargetError, match="has no shared experts; groups it does have: attention, experts, router, all-linear"):
        resolve_targets(LoraSpec(targets="shared_experts"), "tiny")


def test_unknown_target_lists_modules_and_parameters():
    with pytest.raises(LoraTargetError) as err:
        resolve_targets(LoraSpec(targets="attention,qproj"), "tiny")
    message = str(err.value)
    assert "'qproj' is not in 'tiny'" in message
    assert "self_attn.q_proj" in message and "lm_head" in message
    assert "mlp.experts.gate_up_proj" in message and "mlp.gate.weight" in message


def test_article_names_on_a_dense_model_are_refused():
    with pytest.raises(LoraTargetError, match="transformers-4 Mixtral expert names.*no fused experts"):
        resolve_targets(LoraSpec(targets="w1,w3"), "mistral-7b")


def test_ambiguous_name_asks_for_the_full_name():
    with pytest.raises(LoraTargetError, match="'down_proj' is ambiguous.*mlp.shared_expert.down_proj.*mlp.experts.down_proj"):
        resolve_targets(LoraSpec(targets="down_proj"), "qwen1.5-moe-a2.7b")


def test_gate_up_proj_twice_at_two_ranks_is_refused():
    with pytest.raises(LoraTargetError, match="twice"):
        resolve_targets(LoraSpec(targets="experts,w1,w3"), "tiny")


def test_a_model_that_already_has_lora_is_refused():
    wrapped = apply_lora(build_model("tiny", "meta"), LoraSpec(r=2))
    with pytest.raises(LoraTargetError, match="already carries LoRA adapters"):
        lora_census(wrapped, LoraSpec(r=2))


def test_dropout_on_fused_experts_is_refused_before_peft():
    with pytest.raises(LoraTargetError, match="dropout 0.1 cannot be used with mlp.experts.gate_up_proj"):
        peft_config(LoraSpec(dropout=0.1, targets="attention,experts"), "tiny")
    assert peft_config(LoraSpec(dropout=0.1, targets="attention"), "tiny").lora_dropout == 0.1


# --- QLoRA ------------------------------------------------------------------------------------


def test_nf4_bytes_per_param_follows_bitsandbytes_blocks():
    assert QuantSpec().bytes_per_param == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert QuantSpec(double_quant=False).bytes_per_param == 0.5 + 4 / 64
    assert qlora_spec(TrainingSetup(method="qlora", precision="fp16")).compute_dtype == "float16"


def test_fused_experts_stay_16_bit_under_bitsandbytes():
    # Only nn.Linear (not lm_head) is quantized: on Mixtral that is the attention, 32 x 41,943,040.
    assert num_quantized_params("mixtral-8x7b") == 1_342_177_280
    assert num_unquantized_params("mixtral-8x7b") == 46_702_792_704 - 1_342_177_280
    # Dense Mistral: everything but embeddings, lm_head and norms.
    assert num_unquantized_params("mistral-7b") == 2 * 131_072_000 + 65 * 4096
    # Qwen2-MoE: attention and the shared expert's Linears (biases stay 16-bit).
    per_layer = 4 * 2048 * 2048 + 3 * 5632 * 2048 + 2048
    assert num_quantized_params("qwen1.5-moe-a2.7b") == 24 * per_layer


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_bitsandbytes_config_refuses_without_a_gpu():
    with pytest.raises(MoekitError, match="needs a CUDA GPU and the bitsandbytes package"):
        bitsandbytes_config(TrainingSetup(method="qlora"))


def test_bitsandbytes_config_is_only_for_qlora():
    with pytest.raises(MoekitError, match="method='qlora'"):
        bitsandbytes_config(TrainingSetup(method="lora"))


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_lora_json(capsys):
    assert main(["lora", "--model", "mixtral-8x7b", "--r", "16", "--targets", "attention,experts", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_trainable_params"] == 223_346_688
    assert data["num_total_params"] == 46_926_139_392
    assert data["by_group"] == {"attention": 13_631_488, "experts": 209_715_200}


def test_cli_lora_table_shows_groups_and_notes(capsys):
    assert main(["lora", "--model", "tiny", "--r", "4", "--targets", "attention,w1,w2,w3"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "experts" in out and "note: w1+w3 -> mlp.experts.gate_up_proj" in out
    assert "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']" in out


def test_cli_lora_article_targets_fail_in_one_line(capsys):
    assert main(["lora", "--targets", "q_proj,k_proj,v_proj,o_proj,w1,w2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit lora: error: 'w1' cannot be targeted without 'w3'") and err.count("\n") == 1


def test_targets_peft_would_move_to_the_experts_are_refused_naming_what_to_keep():
    # peft's transformers-4 conversion reads *.gate_proj/up_proj/down_proj as expert names on these families
    shared = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    assert peft_renamed_targets((*shared, "self_attn.q_proj"), "deepseek_v3") == shared
    assert peft_renamed_targets(("mlp.shared_expert.gate_proj",), "qwen2_moe") == ()  # no conversion there
    with pytest.raises(LoraTargetError, match=r"reads mlp.gate_proj on deepseek_v3 as an expert projection .* "
                       r"so mlp and shared_experts would get no adapter; .* targets=attention,experts\."):
        resolve_targets(LoraSpec(targets="all-linear"), "deepseek-v3")
    with pytest.raises(LoraTargetError, match=r"so shared_experts would get no adapter; .* targets=attention\."):
        resolve_targets(LoraSpec(targets="attention,shared_experts"), "glm-4.5-air")
    assert "shared_experts" in resolve_targets(LoraSpec(targets="all-linear"), "qwen1.5-moe-a2.7b").groups
    with pytest.raises(LoraTargetError, match="peft .* refuses these targets on glm4_moe: Cannot convert"):
        resolve_targets(LoraSpec(targets="mlp.shared_experts.gate_proj"), "glm-4.5-air")
