"""Lesson 01's derivation table: the saved tensors behind the bytes per token per layer, one row per tensor."""

from moekit.estimate import layer_bytes_per_token, layer_terms
from moekit.training_setup import TrainingSetup

ARTICLE = TrainingSetup(seq_len=12288, precision="fp16")  # Mixtral 8x7B, LoRA r=16 on attention + experts


def _rows(setup: TrainingSetup) -> dict[str, int]:
    return {term.tensor: term.bytes_per_token for term in layer_terms(setup)}


def test_the_articles_layer_saves_323964_bytes_per_token_mostly_in_its_two_routed_experts():
    rows = _rows(ARTICLE)
    assert sum(rows.values()) == layer_bytes_per_token(ARTICLE) == 323_964  # 79 x hidden
    h, ffn, top_k = 4096, 14336, 2
    # per routed expert (frozen base, LoRA on the fused tensors): its input and gate/up/SiLU outputs, 16-bit
    assert rows["routed experts x top-k=2"] == top_k * (2 * 2 * h + 4 * 2 * ffn + 4)
    assert rows["input_layernorm input, upcast"] == 4 * h  # RMSNorm's fp32 copy, even in a 16-bit run
    assert rows["LoRA A outputs x 4"] == 2 * 16 * 4  # q, k, v, o: r values each, 16-bit
    assert "input_layernorm normalized output" not in rows  # a frozen norm weight needs no gradient


def test_a_full_fine_tune_adds_the_rows_its_trained_weights_need():
    full = _rows(ARTICLE.replace(method="full"))
    added = set(full) - set(_rows(ARTICLE))
    assert added == {"input_layernorm normalized output", "post_attention_layernorm normalized output", "router input"}
    assert "LoRA A outputs x 4" not in full
