"""Accuracy of moekit's estimate against its full-size simulation, with two public peers beside it.

For each setup it prints the estimate and the simulation per category and the error, and on the same
setups DeepSpeed's own model-state estimator and the ``accelerate estimate-memory`` rule, so the table
shows where each one goes wrong. The estimate's ``overhead`` (CUDA context, allocator reserve) does not
exist on fake tensors, so totals compare the allocated peak: estimate total minus overhead.

    python benchmarks/accuracy.py [--quick] [--markdown docs/accuracy.md]

Every setup is simulated in full (all layers, full width, on fake tensors: seconds each). Linear
extrapolation from 1 and 2 layers (``simulate_per_layer``) is not used here: ZeRO-3 steps its partition in
sub-groups of 1e9 elements, which a 2-layer model never reaches.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from accelerate.commands.estimate import estimate_training_usage
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from moekit.breakdown import Breakdown
from moekit.estimate import estimate, model_facts
from moekit.simulate import simulate
from moekit.training_setup import LoraSpec, TrainingSetup

GiB = 2**30
ATTN = LoraSpec(targets=("attention",))


def grid(quick: bool = False) -> list[TrainingSetup]:
    """At least 30 setups: presets, full/LoRA, bf16/fp32, 512-16384 tokens, micro-batch 1-4, ZeRO 0-3, offload."""
    small = [
        TrainingSetup(model="small", method=m, seq_len=s, micro_batch=b, zero_stage=z, gpus_per_node=2, activation_checkpointing=c)
        for m, s, b, z, c in [
            ("full", 512, 1, 0, False), ("full", 2048, 2, 1, False), ("full", 1024, 4, 2, True), ("full", 4096, 1, 3, False),
            ("lora", 512, 4, 0, False), ("lora", 2048, 1, 2, False), ("lora", 4096, 2, 2, True), ("lora", 8192, 1, 3, True),
        ]
    ]
    small += [
        TrainingSetup(model="small", method="full", precision="fp32", seq_len=1024, zero_stage=2, gpus_per_node=2),
        TrainingSetup(model="small", method="lora", precision="fp32", seq_len=1024, zero_stage=1, gpus_per_node=2),
        TrainingSetup(model="small", method="lora", seq_len=2048, zero_stage=2, offload="optimizer", gpus_per_node=2),
        TrainingSetup(model="small", method="full", seq_len=2048, zero_stage=3, offload="optimizer+params", gpus_per_node=2),
        TrainingSetup(model="small", method="lora", lora=ATTN, seq_len=1024, attn_implementation="eager", zero_stage=2, gpus_per_node=2),
        TrainingSetup(model="tiny", method="full", seq_len=512, micro_batch=4, zero_stage=0, gpus_per_node=1),
        TrainingSetup(model="tiny", method="lora", seq_len=2048, zero_stage=2, gpus_per_node=2, activation_checkpointing=True),
    ]
    large = [
        TrainingSetup(seq_len=4096, zero_stage=3),
        TrainingSetup(seq_len=12288, zero_stage=3, activation_checkpointing=True),
        TrainingSetup(seq_len=12288, zero_stage=2, precision="fp16"),
        TrainingSetup(seq_len=11000, zero_stage=3, offload="optimizer+params", activation_checkpointing=True),
        TrainingSetup(lora=ATTN, seq_len=16384, zero_stage=3, activation_checkpointing=True),
        TrainingSetup(lora=ATTN, seq_len=2048, micro_batch=4, zero_stage=2, offload="optimizer"),
        TrainingSetup(method="full", seq_len=4096, zero_stage=3, activation_checkpointing=True),
        TrainingSetup(method="full", seq_len=2048, micro_batch=2, zero_stage=3, offload="optimizer", num_nodes=2),
        TrainingSetup(model="mixtral-8x22b", lora=ATTN, seq_len=8192, zero_stage=3, activation_checkpointing=True),
        TrainingSetup(model="qwen1.5-moe-a2.7b", method="full", seq_len=4096, zero_stage=2),
        TrainingSetup(model="qwen1.5-moe-a2.7b", seq_len=8192, zero_stage=1, activation_checkpointing=True),
        TrainingSetup(model="olmoe-1b-7b", method="full", seq_len=4096, micro_batch=2, zero_stage=3),
        TrainingSetup(model="olmoe-1b-7b", seq_len=2048, zero_stage=0, gpus_per_node=1, attn_implementation="eager"),
        TrainingSetup(model="mistral-7b", method="full", seq_len=4096, zero_stage=3, activation_checkpointing=True),
        TrainingSetup(model="mistral-7b", lora=ATTN, seq_len=8192, zero_stage=2),
    ]
    return (small[:4] + large[:2]) if quick else small + large


def deepspeed_estimate_bytes(setup: TrainingSetup) -> int:
    """DeepSpeed's own per-GPU model-state estimate (it charges every parameter as trainable)."""
    facts = model_facts(setup.model)
    offload = setup.offload != "none"
    if setup.zero_stage == 3:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            facts.num_params, facts.largest_module_params, setup.gpus_per_node, setup.num_nodes,
            cpu_offload=offload, cpu_offload_params=setup.offload == "optimizer+params",
        )
        return gpu
    _, gpu = estimate_zero2_model_states_mem_needs(facts.num_params, setup.gpus_per_node, setup.num_nodes, cpu_offload=offload)
    return gpu


def accelerate_estimate_bytes(setup: TrainingSetup) -> int:
    """``accelerate estimate-memory``'s training figure: the largest of its model/grads/optimizer/step sizes."""
    facts = model_facts(setup.model)
    precision = "float32" if setup.precision == "fp32" else "bfloat16"
    sizes = estimate_training_usage(4 * facts.num_params, precision)
    return max(sizes.values())


@dataclass
class Row:
    setup: TrainingSetup
    estimate: Breakdown
    simulation: Breakdown
    seconds: float

    def error(self, category: str) -> float:
        est, sim = self.estimate.per_gpu[category], self.simulation.per_gpu[category]
        return 0.0 if est == sim else (est - sim) / max(sim, 1)

    @property
    def estimate_allocated(self) -> int:
        return self.estimate.total_bytes - self.estimate.per_gpu["overhead"]

    @property
    def total_error(self) -> float:
        return (self.estimate_allocated - self.simulation.total_bytes) / self.simulation.total_bytes

    @property
    def states_error(self) -> float:
        return (self.estimate.model_state_bytes - self.simulation.model_state_bytes) / max(self.simulation.model_state_bytes, 1)


def run(setups: list[TrainingSetup]) -> list[Row]:
    rows = []
    for index, setup in enumerate(setups, 1):
        start = time.perf_counter()
        simulation = simulate(setup, progress=False)
        rows.append(Row(setup, estimate(setup), simulation, time.perf_counter() - start))
        row = rows[-1]
        print(f"[{index}/{len(setups)}] {setup.describe()}: states {row.states_error:+.2%}, "
              f"activations {row.error('activations'):+.2%}, total {row.total_error:+.2%} ({row.seconds:.1f} s)", flush=True)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| setup | model states est / sim GiB | err | activations est / sim GiB | err | peak est / sim GiB | err "
        "| DeepSpeed est. GiB | accelerate GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.setup.describe()} | {r.estimate.model_state_bytes / GiB:.2f} / {r.simulation.model_state_bytes / GiB:.2f} "
            f"| {r.states_error:+.2%} | {r.estimate.per_gpu['activations'] / GiB:.2f} / {r.simulation.per_gpu['activations'] / GiB:.2f} "
            f"| {r.error('activations'):+.2%} | {r.estimate_allocated / GiB:.2f} / {r.simulation.total_bytes / GiB:.2f} "
            f"| {r.total_error:+.2%} | {deepspeed_estimate_bytes(r.setup) / GiB:.2f} | {accelerate_estimate_bytes(r.setup) / GiB:.2f} |"
        )
    worst = max(rows, key=lambda r: abs(r.total_error))
    lines.append("")
    lines.append(
        f"{len(rows)} setups. Largest errors: model states {max(abs(r.states_error) for r in rows):.2%}, "
        f"activations {max(abs(r.error('activations')) for r in rows):.2%}, "
        f"peak {abs(worst.total_error):.2%} ({worst.setup.describe()})."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of setups instead of the whole grid")
    parser.add_argument("--markdown", help="also write the table to this markdown file")
    args = parser.parse_args()
    rows = run(grid(args.quick))
    table = markdown(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
