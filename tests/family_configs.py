"""Scaled-down configs of every MoE family moekit supports: the real architecture (same modules,
same attention kind, dense first layers, shared experts, sinks) at hidden 128 and 2-3 layers, so a
full fake-tensor simulation and a plain transformers step take a second or two."""

import json
from pathlib import Path

_COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
               intermediate_size=256, max_position_embeddings=4096, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, pad_token_id=None)
_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1,
            n_shared_experts=1, first_k_dense_replace=1, moe_intermediate_size=64,
            num_key_value_heads=4)

FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(model_type="mixtral", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "qwen3_moe": dict(model_type="qwen3_moe", num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=64, head_dim=32),
    "olmoe": dict(model_type="olmoe", num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(model_type="deepseek_v2", num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                        q_lora_rank=None, **_MLA),
    "deepseek_v3": dict(model_type="deepseek_v3", num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                        q_lora_rank=64, **_MLA),
    "gpt_oss": dict(model_type="gpt_oss", num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=32, sliding_window=128, layer_types=["sliding_attention", "full_attention"]),
    "glm4_moe": dict(model_type="glm4_moe", num_hidden_layers=3, n_routed_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, head_dim=32,
                     n_group=1, topk_group=1, use_qk_norm=True),
    "phimoe": dict(model_type="phimoe", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(model_type="granitemoe", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    "hunyuan_v1_moe": dict(model_type="hunyuan_v1_moe", num_hidden_layers=2, num_experts=4, moe_topk=2, head_dim=32),
    "llama4_text": dict(model_type="llama4_text", num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1,
                        intermediate_size_mlp=256, head_dim=32),
}


def write_family_config(family: str, folder: Path) -> str:
    """Write the family's scaled-down config.json into folder and return the folder (a --model value)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**_COMMON, **FAMILY_CONFIGS[family]}))
    return str(folder)
