"""Minimal reproduction: expert LoRA that never trains when a model is built inside a hand-opened zero.Init.

Run (CPU is enough; DeepSpeed uses its CPU accelerator and gloo):

    deepspeed --num_gpus 2 scripts/repro_zero_init_expert_lora.py

Only torch, transformers, peft and deepspeed are used (no moekit), so the script can be attached to an
upstream report. It builds a tiny Mixtral (fused experts: ``mlp.experts.gate_up_proj`` and
``mlp.experts.down_proj``) twice under ZeRO-3, puts peft LoRA on the attention projections
(``target_modules``) and on both fused expert tensors (``target_parameters``), trains a few steps,
and prints how far each group of adapter weights moved:

A. ``with deepspeed.zero.Init(...): AutoModelForCausalLM.from_config(config)``
   Parameters are partitioned into empty shards as each module is constructed. transformers 5
   initializes the weights afterwards in its own recursion (``PreTrainedModel.initialize_weights``
   -> ``smart_apply``), which does not go through ``nn.Module.apply``, the method DeepSpeed wraps to
   gather shards during initialization. ``_init_weights`` therefore writes into empty tensors, and
   every tensor that only ``_init_weights`` initializes keeps what ``torch.empty`` left there: the
   fused expert tensors and the router weight. (nn.Linear and nn.Embedding initialize themselves in
   their constructors, before partitioning, so attention looks fine.) With this script the expert
   tensors hold values around 1e-40; the experts' output is ~0, the gradient reaching the expert
   LoRA is ~1e-41, Adam's eps (1e-8) swamps it, and the expert adapters stay where they started
   while the attention adapters train. Nothing fails and nothing warns.

B. ``HfDeepSpeedConfig(ds_config)`` kept alive, then ``AutoModelForCausalLM.from_config(config)``
   transformers opens zero.Init itself and afterwards runs ``initialize_weights_zero3``, which
   gathers each module's shards before ``_init_weights``. Every adapter group trains.

Expected output (values vary, the pattern does not):

    A hand-opened zero.Init: expert weight std 1e-40 ...; moved: attention LoRA yes, expert LoRA gate_up_proj NO, ...
    B HfDeepSpeedConfig    : expert weight std 0.02 ...;  moved: attention LoRA yes, expert LoRA gate_up_proj yes, ...

peft and DeepSpeed behave as documented once the expert weights hold real values (B); the gap is that
``from_config`` inside a user-opened ``deepspeed.zero.Init`` neither initializes through gathered
shards nor warns. A related trap: importing ``torch._dynamo`` for the first time *inside* zero.Init
fails (DeepSpeed patches tensor constructors), so import peft / transformers' generation utilities
before opening the context, as this script does at the top.
"""

from __future__ import annotations

import argparse

import deepspeed
import peft  # noqa: F401  (imports torch._dynamo before zero.Init patches tensor constructors)
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

STEPS = 4


def tiny_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )


def ds_config(world_size: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world_size,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
    }


def build(how: str, config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    if how == "A":
        with deepspeed.zero.Init(config_dict_or_path=config):
            return AutoModelForCausalLM.from_config(tiny_config())
    registration = HfDeepSpeedConfig(config)  # transformers keeps a weak reference: hold it while building
    model = AutoModelForCausalLM.from_config(tiny_config())
    del registration
    return model


def group_of(name: str) -> str | None:
    if "lora_" not in name:
        return None
    if ".experts.base_layer." in name:
        return "expert LoRA gate_up_proj"  # peft nests one ParamWrapper per targeted parameter
    if ".experts." in name:
        return "expert LoRA down_proj"
    return "attention LoRA"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        if group_of(name):
            with deepspeed.zero.GatheredParameters([param]):
                out[name] = param.detach().float().clone()
    return out


def expert_weight_std(model: torch.nn.Module) -> float:
    param = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj"]
    with deepspeed.zero.GatheredParameters([param]):
        return float(param.detach().float().std())


def run(how: str, rank: int, world_size: int) -> str:
    config = ds_config(world_size)
    model = build(how, config)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, lora)
    deepspeed.utils.set_z3_leaf_modules(model, [MixtralSparseMoeBlock])
    std = expert_weight_std(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    before = snapshot(engine.module)
    generator = torch.Generator().manual_seed(1 + rank)
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(3, 512, (2, 32), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    after = snapshot(engine.module)
    moved: dict[str, float] = {}
    for name in before:
        group = group_of(name)
        moved[group] = max(moved.get(group, 0.0), float((after[name] - before[name]).abs().max()))
    label = "A hand-opened zero.Init" if how == "A" else "B HfDeepSpeedConfig    "
    verdicts = ", ".join(f"{g} {'yes' if d > 0 else 'NO'} ({d:.1e})" for g, d in sorted(moved.items()))
    return f"{label}: expert weight std {std:.1e}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; moved: {verdicts}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    parser.parse_args()
    deepspeed.init_distributed()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    lines = [run("A", rank, world_size), run("B", rank, world_size)]
    if rank == 0:
        print("\n".join(["", f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, peft {peft.__version__}", *lines]))


if __name__ == "__main__":
    main()
