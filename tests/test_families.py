"""Every MoE family moekit supports, checked on a scaled-down config of its real architecture.

A family counts as supported when (1) the estimate's activations are within 2% of the full fake-tensor
simulation and its weights are exact, at two sequence lengths, with and without checkpointing, full
and LoRA; and (2) the simulation's bytes per decoder layer equal those of a plain transformers
training step of that config under MemTracker (``loss = model(input_ids=..., labels=...).loss``,
no moekit code in the loop). The plain step is compared layer by layer (2 layers minus 1 layer), so
what each harness does with the logits outside the layers cancels out.
"""

import importlib
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from family_configs import FAMILY_CONFIGS, write_family_config
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType
from transformers import AutoConfig, AutoModelForCausalLM

from moekit.arch import arch_of
from moekit.estimate import estimate
from moekit.lora import LoraTargetError, resolve_targets
from moekit.models import build_model, load_config, parameter_census
from moekit.simulate import simulate
from moekit.training_setup import LoraSpec, TrainingSetup

SUPPORTED = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "glm4_moe"]
SEQ_LENS = (128, 512)
LORA = LoraSpec(targets=("attention", "experts"))


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda family: write_family_config(family, root / family)


def _setup(model: str, method: str, seq_len: int, ckpt: bool) -> TrainingSetup:
    return TrainingSetup(model=model, method=method, lora=LORA, seq_len=seq_len, zero_stage=0, gpus_per_node=1,
                         activation_checkpointing=ckpt)


@pytest.mark.parametrize("family", SUPPORTED)
def test_estimate_matches_the_simulation_for_each_family(family, family_dir):
    model = family_dir(family)
    for method, seq_len, ckpt in itertools.product(("full", "lora"), SEQ_LENS, (False, True)):
        setup = _setup(model, method, seq_len, ckpt)
        est, sim = estimate(setup), simulate(setup, progress=False)
        label = f"{family} {method} seq {seq_len} ckpt {ckpt}"
        assert est.per_gpu["weights"] == sim.per_gpu["weights"], label
        assert est.per_gpu["activations"] == pytest.approx(sim.per_gpu["activations"], rel=0.02), label


@pytest.mark.parametrize("family", SUPPORTED)
def test_estimate_matches_the_simulation_under_zero3_lora_for_each_family(family, family_dir):
    """ZeRO-3 changes what a LoRA step saves: DeepSpeed's linear keeps every frozen Linear's input, and the adapters
    stay fp32 under zero.Init, so each adapted Linear saves an fp32 copy of its input (moekit.traps)."""
    model = family_dir(family)
    for ckpt in (False, True):
        setup = _setup(model, "lora", 512, ckpt).replace(zero_stage=3, gpus_per_node=2)
        est, sim = estimate(setup), simulate(setup, progress=False)
        label = f"{family} ZeRO-3 LoRA ckpt {ckpt}"
        assert est.per_gpu["weights"] == sim.per_gpu["weights"], label
        assert est.per_gpu["activations"] == pytest.approx(sim.per_gpu["activations"], rel=0.02), label
        assert est.total_bytes - est.per_gpu["overhead"] == pytest.approx(sim.total_bytes, rel=0.01), label
    assert estimate(setup).per_gpu["activations"] > estimate(setup.replace(zero_stage=2)).per_gpu["activations"]


def _plain_step_activation_bytes(family: str, num_layers: int, seq_len: int) -> int:
    """MemTracker's Activation bytes after a plain transformers forward with labels (real CPU tensors)."""
    from family_configs import _COMMON

    data = {**_COMMON, **FAMILY_CONFIGS[family], "num_hidden_layers": num_layers}
    if "layer_types" in data:
        data["layer_types"] = data["layer_types"][:num_layers]
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    input_ids = torch.randint(0, config.vocab_size, (1, seq_len))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        after_forward = tracker.get_tracker_snapshot()
        loss.backward()
    return sum(device.get(_MemRefType.ACT, 0) for device in after_forward.values())


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_simulation_saves_what_a_plain_transformers_step_saves_per_layer(family, family_dir):
    model = family_dir(family)
    seq_len = 256
    num_dense = arch_of(load_config(model)).num_dense_layers  # compare MoE layers: skip the dense first ones
    one, two = num_dense + 1, num_dense + 2
    setup = _setup(model, "full", seq_len, False)
    sim = [simulate(setup, num_layers=n, progress=False).per_gpu["activations"] for n in (one, two)]
    plain = [_plain_step_activation_bytes(family, n, seq_len) for n in (one, two)]
    assert sim[1] - sim[0] == pytest.approx(plain[1] - plain[0], rel=0.01)


def test_every_family_config_builds_and_reads_its_architecture(family_dir):
    kinds = {family: arch_of(load_config(family_dir(family))) for family in FAMILY_CONFIGS}
    assert kinds["deepseek_v3"].attention == "mla" and kinds["deepseek_v3"].num_dense_layers == 1
    assert kinds["gpt_oss"].sinks and kinds["gpt_oss"].eager_only and kinds["gpt_oss"].experts_bias
    assert [layer.sliding_window for layer in kinds["gpt_oss"].layers] == [128, None]
    assert kinds["qwen3_moe"].qk_norm == "head" and kinds["olmoe"].qk_norm == "full"
    assert kinds["glm4_moe"].router_scoring == "sigmoid" and kinds["glm4_moe"].shared_ffn == 64
    assert kinds["qwen2_moe"].shared_gate and kinds["phimoe"].norm_kind == "layer"
    assert all(arch.is_moe for arch in kinds.values())


# Published sizes (model cards, rounded; REFERENCE.md). Where a card's active count leaves out the
# embedding (gpt-oss, DeepSeek-V2-Lite) or embedding and lm_head (GLM), the census is compared without them.
PUBLISHED = [
    ("qwen3-30b-a3b", 30.5, 3.3, ()),
    ("qwen3-235b-a22b", 235, 22, ()),
    ("deepseek-v2-lite", 15.7, 2.4, ("embeddings",)),
    ("deepseek-v3", 671, 37, ()),
    ("gpt-oss-20b", 21, 3.6, ("embeddings",)),
    ("gpt-oss-120b", 117, 5.1, ("embeddings",)),
    ("glm-4.5-air", 106, 12, ("embeddings", "lm_head")),
    ("phi-3.5-moe", 41.9, 6.6, ()),
]


@pytest.mark.parametrize(("preset", "total_b", "active_b", "left_out"), PUBLISHED)
def test_preset_totals_match_the_published_counts(preset, total_b, active_b, left_out):
    """Cards round (or truncate) to 2-3 digits: totals within 1%, active counts within 5%."""
    census = parameter_census(preset)
    assert census.num_params / 1e9 == pytest.approx(total_b, rel=0.01)
    if active_b is not None:
        active = census.num_active_params - sum(census.num_params_by_component[c] for c in left_out)
        assert active / 1e9 == pytest.approx(active_b, rel=0.05)


def test_deepseeks_shared_experts_and_dense_first_layers_are_counted_as_such():
    census = parameter_census("deepseek-v3")
    arch = arch_of(load_config("deepseek-v3"))
    assert arch.num_dense_layers == 3 and arch.num_moe_layers == 58
    # 58 MoE layers x one shared expert of width 2048; the 3 dense layers' MLPs (width 18432) are "mlp".
    assert census.num_params_by_component["shared_experts"] == 58 * 3 * 7168 * 2048
    assert census.num_params_by_component["mlp"] == 3 * 3 * 7168 * 18432


def test_an_unknown_moe_family_is_calibrated_by_a_cached_probe(family_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    setup = _setup(family_dir("phimoe"), "full", 256, False)
    first = estimate(setup)
    assert "2-layer fake-tensor probe" in first.notes["activations"]
    assert first.per_gpu["activations"] == simulate(setup, progress=False).per_gpu["activations"]
    assert len(list(tmp_path.glob("*.json"))) == 1

    simulate_module = importlib.import_module("moekit.simulate")  # moekit.simulate is the function

    def no_simulation(*args, **kwargs):
        raise AssertionError("the cached probe should be reused")

    monkeypatch.setattr(simulate_module, "simulate_step", no_simulation)
    assert estimate(setup).per_gpu["activations"] == first.per_gpu["activations"]


def test_analytic_families_carry_no_probe_note(family_dir):
    assert "activations" not in estimate(_setup(family_dir("qwen3_moe"), "full", 256, False)).notes


def test_moekit_models_lists_the_new_presets_and_the_families(capsys):
    from moekit.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352" in out and "qwen3-30b-a3b" in out and "gpt-oss-20b" in out
    assert "families with checked activation formulas: mixtral" in out and "2-layer fake-tensor probe" in out


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v3"])
def test_moekit_estimate_plans_the_new_presets(model, capsys):
    from moekit.cli import main

    assert main(["estimate", "--model", model, "--method", "lora", "--checkpointing", "--zero", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["per_gpu"]["activations"] > 0 and data["per_gpu"]["weights"] > 0


def test_moekit_estimate_takes_a_folder_with_a_family_config(family_dir, capsys):
    from moekit.cli import main

    assert main(["estimate", "--model", family_dir("deepseek_v3"), "--gpus", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_gpu"]["activations"] > 0


def test_a_config_that_is_not_a_causal_lm_gets_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = subprocess.run([sys.executable, "-m", "moekit", "estimate", "--model", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'t5' model, which is not a causal language model" in result.stderr


def test_per_layer_extrapolation_keeps_deepseeks_dense_first_layer_apart(tmp_path):
    from family_configs import _COMMON

    from moekit.simulate import simulate_per_layer

    folder = write_family_config("deepseek_v3", tmp_path / "deepseek")
    data = json.loads((Path(folder) / "config.json").read_text())
    (Path(folder) / "config.json").write_text(json.dumps({**_COMMON, **data, "num_hidden_layers": 4}))
    setup = _setup(folder, "full", 128, False)
    extrapolated = simulate_per_layer(setup, progress=False)
    assert extrapolated.per_gpu["activations"] == simulate(setup, progress=False).per_gpu["activations"]
    assert extrapolated.notes["method"].startswith("1 dense + 1 and 2 layers")


def test_the_probe_also_calibrates_checkpointed_runs(family_dir, tmp_path, monkeypatch):
    # GraniteMoE's scaled embeddings keep more than the layer inputs under checkpointing with LoRA:
    # the probe sees it (the analytic kept-inputs rule was 9% low here).
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    setup = _setup(family_dir("granitemoe"), "lora", 128, True)
    assert estimate(setup).per_gpu["activations"] == simulate(setup, progress=False).per_gpu["activations"]


def test_the_probe_keeps_zero3_for_lora(family_dir, tmp_path, monkeypatch):
    # ZeRO-3 changes what a LoRA layer saves (DeepSpeed's linear, fp32 adapters): a probe without ZeRO was 22% low.
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    setup = _setup(family_dir("granitemoe"), "lora", 128, False).replace(zero_stage=3, gpus_per_node=2)
    assert estimate(setup).per_gpu["activations"] == simulate(setup, progress=False).per_gpu["activations"]


def test_peft_puts_a_shared_expert_target_on_the_experts_so_moekit_refuses_it(family_dir):
    # peft's own behaviour (its transformers-4 name conversion): when this starts failing, peft has changed and
    # moekit.lora's refusal (peft_renamed_targets) can go.
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(family_dir("glm4_moe"), "cpu"),
                           LoraConfig(r=4, target_modules=["self_attn.q_proj", "mlp.shared_experts.gate_proj",
                                                           "mlp.shared_experts.up_proj"]))
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if ".lora_" in name}
    assert not any("shared_experts" in name for name in adapted)
    assert any(name.endswith("mlp.experts") for name in adapted)
    with pytest.raises(LoraTargetError, match="so shared_experts would get no adapter"):
        resolve_targets(LoraSpec(targets=("attention", "shared_experts")), family_dir("glm4_moe"))
