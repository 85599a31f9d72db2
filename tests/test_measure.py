"""measure: a real training step on the CPU, by category and phase, agreeing with the simulation."""

import json

import pytest

from moekit.breakdown import CATEGORIES
from moekit.cli import main
from moekit.profile import MeasureError, measure, measure_step, step_bytes_here
from moekit.simulate import simulate
from moekit.step import PHASES
from moekit.training_setup import LoraSpec, TrainingSetup

TINY = TrainingSetup(model="tiny", seq_len=128, gpus_per_node=2, zero_stage=2)
SMALL = TrainingSetup(model="small", seq_len=256, gpus_per_node=2, zero_stage=0)

SETUPS = {
    "tiny lora zero2": TINY,
    "tiny full ckpt zero0": TINY.replace(method="full", activation_checkpointing=True, zero_stage=0),
    "tiny lora ckpt zero3": TINY.replace(activation_checkpointing=True, zero_stage=3),
    "tiny full fp32 zero1": TINY.replace(method="full", precision="fp32", zero_stage=1),
    "small lora zero0": SMALL,
    "small lora-attention ckpt zero2": SMALL.replace(lora=LoraSpec(targets=("attention",)), activation_checkpointing=True, zero_stage=2),
    "small full zero1 eager": SMALL.replace(method="full", zero_stage=1, attn_implementation="eager"),
}


def within(measured: int, simulated: int, tolerance: float) -> bool:
    return abs(measured - simulated) <= tolerance * max(measured, simulated, 1)


@pytest.mark.parametrize("name", list(SETUPS))
def test_measure_agrees_with_simulate_within_two_percent_per_category(name):
    setup = SETUPS[name]
    measured = measure(setup, device="cpu")
    simulated = simulate(setup, progress=False)
    for category in CATEGORIES:
        assert within(measured.per_gpu[category], simulated.per_gpu[category], 0.02), category
    assert within(measured.total_bytes, simulated.total_bytes, 0.02)
    assert measured.per_gpu["activations"] > 0 and measured.per_gpu["weights"] > 0


def test_measure_reports_phases_and_bytes_saved_for_backward():
    result = measure_step(SMALL, device="cpu")
    assert set(result.phases) == set(PHASES)
    phases = result.phases
    activations = result.breakdown.per_gpu["activations"]
    assert phases["model"]["activations"] == 0
    assert phases["forward"]["activations"] == activations > 0
    assert phases["optimizer_step"]["activations"] == 0  # freed by backward and the step
    assert sum(phases["peak"].values()) == result.breakdown.total_bytes
    # Without checkpointing, nearly everything alive after forward was saved for backward (the rest:
    # the logits and loss the caller holds).
    assert 0.8 * activations < result.saved_for_backward_bytes <= activations
    assert result.breakdown.notes["saved_for_backward_bytes"] == str(result.saved_for_backward_bytes)
    assert result.cuda == {} and result.device == "cpu"


def test_measure_refuses_a_setup_this_machine_cannot_hold():
    mixtral = TrainingSetup(model="mixtral-8x7b", seq_len=4096)
    assert step_bytes_here(mixtral) > 2 * 46_702_792_704  # the 16-bit weights alone, on every ZeRO-2 rank
    assert step_bytes_here(mixtral, num_layers=2) < step_bytes_here(mixtral) / 10
    with pytest.raises(MeasureError, match="needs roughly .* GiB .* simulate"):
        measure(mixtral, device="cpu")


def test_measure_refuses_offload_on_the_cpu():
    with pytest.raises(MeasureError, match="nothing to offload"):
        measure(TINY.replace(offload="optimizer"), device="cpu")


def test_snapshot_needs_cuda():
    with pytest.raises(MeasureError, match="CUDA"):
        measure_step(TINY, device="cpu", snapshot_path="/tmp/never.pickle")


def test_cli_measure_json(capsys):
    assert main(["measure", "--model", "tiny", "--seq", "64", "--gpus", "2", "--device", "cpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == "measure"
    assert data["saved_for_backward_bytes"] > 0
    assert data["phases"]["forward"]["activations"] == data["per_gpu"]["activations"]


def test_cli_measure_refusal_is_one_line(capsys):
    assert main(["measure", "--model", "mixtral-8x7b", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs roughly" in err
