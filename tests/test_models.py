"""Presets, model building and the exact parameter census."""

import json

import pytest
import torch

from moekit.models import (
    ModelError,
    build_model,
    census_of_module,
    list_presets,
    load_config,
    load_pretrained,
    moe_shape,
    parameter_census,
    per_layer_census,
)


def test_presets_include_the_families_the_lessons_use():
    presets = set(list_presets())
    assert {"mixtral-8x7b", "mixtral-8x22b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "mistral-7b", "tiny", "small"} <= presets


@pytest.mark.parametrize("name", list_presets())
def test_census_equals_the_models_own_parameter_count(name):
    census = parameter_census(name)
    model = build_model(name, "meta")
    assert census.num_params == model.num_parameters()
    assert census.num_trainable_params == census.num_params  # a fresh model trains everything


def test_mixtral_8x7b_census_is_exact():
    census = parameter_census("mixtral-8x7b")
    assert census.num_params == 46_702_792_704
    assert census.num_params_by_component["embeddings"] == 131_072_000
    assert census.num_params_by_component["lm_head"] == 131_072_000
    layer = per_layer_census("mixtral-8x7b")
    assert layer == {"attention": 41_943_040, "router": 32_768, "experts": 1_409_286_144, "norms": 8_192}
    assert census.num_params_by_component["experts"] == 32 * 1_409_286_144
    # 12.9B active: everything but the experts, plus 2 of 8 experts per layer.
    assert census.num_active_params == 46_702_792_704 - 32 * 1_409_286_144 * 6 // 8
    assert census.num_experts == 8 and census.experts_per_token == 2


def test_published_sizes_of_the_other_presets():
    assert round(parameter_census("mixtral-8x22b").num_params / 1e9, 1) == 140.6
    assert round(parameter_census("mixtral-8x22b").num_active_params / 1e9, 1) == 39.2
    assert round(parameter_census("olmoe-1b-7b").num_active_params / 1e9, 2) == 1.28
    assert round(parameter_census("qwen1.5-moe-a2.7b").num_active_params / 1e9, 2) == 2.69
    mistral = parameter_census("mistral-7b")
    assert mistral.num_active_params == mistral.num_params == 7_241_732_096
    assert "experts" not in mistral.num_params_by_component


def test_small_presets_are_cpu_sized():
    assert 100_000 < parameter_census("tiny").num_params < 1_000_000
    assert 10_000_000 < parameter_census("small").num_params < 100_000_000


def test_bytes_by_dtype_follow_the_build_dtype():
    config = load_config("tiny")
    model = build_model(config, "meta", dtype=torch.bfloat16)
    census = census_of_module(model, config)
    assert census.bytes_by_dtype == {"bfloat16": 2 * census.num_params}


def test_cpu_build_is_seeded():
    a = build_model("tiny", "cpu", seed=3)
    b = build_model("tiny", "cpu", seed=3)
    c = build_model("tiny", "cpu", seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.experts.gate_up_proj for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_fake_build_of_full_mixtral_allocates_nothing():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model("mixtral-8x7b", "fake", dtype=torch.bfloat16, num_layers=1)
    weight = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(weight, FakeTensor) and weight.shape == (8, 28672, 4096)
    assert weight.dtype == torch.bfloat16


def test_moe_shape_reads_each_family():
    assert moe_shape(load_config("mixtral-8x7b")).num_experts == 8
    qwen = moe_shape(load_config("qwen1.5-moe-a2.7b"))
    assert (qwen.num_experts, qwen.experts_per_token, qwen.expert_intermediate_size) == (60, 4, 1408)
    assert qwen.shared_expert_intermediate_size == 5632
    assert moe_shape(load_config("mistral-7b")).num_experts == 0


def test_local_weights_round_trip(tmp_path):
    model = build_model("tiny", "cpu", seed=7)
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert load_config(tmp_path).hidden_size == 64
    assert parameter_census(tmp_path).num_params == parameter_census("tiny").num_params


def test_config_json_path_is_accepted(tmp_path):
    model = build_model("tiny", "meta")
    model.config.save_pretrained(tmp_path)
    assert parameter_census(tmp_path / "config.json").num_params == 287_552


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ModelError, match="Known presets: .*mixtral-8x7b.*tiny"):
        load_config("mixtral-9x9b")


def test_folder_without_config_says_so(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        load_config(tmp_path)


def test_unsupported_architecture_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ModelError, match="'bert' model, which is not a causal language model.*mixtral"):
        load_config(tmp_path)
