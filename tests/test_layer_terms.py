"""Lesson 01's derivation table: the saved tensors behind the bytes per token per layer, one row per tensor."""

from moekit.estimate import layer_bytes_per_token, layer_terms
from moekit.training_setup import TrainingSetup

ARTICLE = TrainingSetup(seq_len=12288, precision="fp16")  # Mixtral 8x7B, LoRA r=16 on attention + experts
HIDDEN, FFN, TOP_K = 4096, 14336, 2


def _rows(setup: TrainingSetup) -> dict[str, int]:
    return {term.tensor: term.bytes_per_token for term in layer_terms(setup)}


def test_the_articles_layer_saves_323964_bytes_per_token_mostly_in_its_two_routed_experts():
    rows = _rows(ARTICLE)
    assert sum(rows.values()) == layer_bytes_per_token(ARTICLE) == 323_964  # 79 x hidden
    # per routed expert (frozen base, LoRA on the fused tensors): its input and gate/up/SiLU outputs, 16-bit,
    # plus its routing index, weight and sort bookkeeping (28 bytes)
    assert rows["routed experts x top-k=2"] == TOP_K * (2 * 2 * HIDDEN + 4 * 2 * FFN + 28)
    assert rows["routed experts x top-k=2"] > 0.8 * sum(rows.values())
    # a frozen RMSNorm keeps an fp32 copy of its input and 1/rms, even in a 16-bit run
    assert rows["input_layernorm"] == rows["post_attention_layernorm"] == 4 * HIDDEN + 4
    assert rows["LoRA A outputs x 4"] == 2 * 16 * 4  # q, k, v, o: r values each, 16-bit


def test_a_full_fine_tune_adds_the_router_input_and_the_norms_normalized_outputs():
    lora, full = _rows(ARTICLE), _rows(ARTICLE.replace(method="full"))
    assert set(full) - set(lora) == {"router input"} and "LoRA A outputs x 4" not in full
    assert full["router input"] == 2 * HIDDEN
    # a trained norm weight needs the normalized output for its gradient: 2 more bytes per hidden value
    assert full["input_layernorm"] - lora["input_layernorm"] == 2 * HIDDEN
