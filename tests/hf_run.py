"""One rank of a real Hugging Face Trainer (or TRL SFTTrainer) run with moekit's MemoryCallback (tests/test_hf.py).

python tests/hf_run.py trainer|sft OUTPUT_DIR; start it under `deepspeed --num_gpus 2`.
Rank 0 writes OUTPUT_DIR/report.json: the setup read from the run, the estimate, memory per step and guard verdicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from moekit.hf import MemoryCallback, example_trainer, watch
from moekit.training_setup import TrainingSetup
from moekit.zero import xtuner_preset

SETUP = TrainingSetup(model="tiny", method="lora", precision="bf16", zero_stage=2, gpus_per_node=2, seq_len=64,
                      micro_batch=2, grad_accum=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=("trainer", "sft"))
    parser.add_argument("output_dir")
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    ds_config = xtuner_preset("zero2")  # XTuner's preset: its batch sizes, clipping and precision are "auto"
    kwargs = dict(deepspeed=ds_config, use_cpu=True, max_steps=3, save_steps=2, save_strategy="steps")
    if args.kind == "sft":
        callback = MemoryCallback()  # what a user passes to SFTTrainer(callbacks=[...]); seq from max_length
        trainer = example_trainer(SETUP, args.output_dir, trl=True, callbacks=[callback], **kwargs)
    else:
        trainer = example_trainer(SETUP, args.output_dir, **kwargs)
        callback = watch(trainer, seq_len=SETUP.seq_len)
    try:
        trainer.train()
    finally:
        if trainer.args.process_index == 0:
            report = callback.report
            data = {"setup": report.setup.as_dict() if report.setup else None,
                    "estimate_bytes": report.estimate.total_bytes if report.estimate else None,
                    "baseline": report.baseline, "steps": report.steps, "peak_bytes": report.peak_bytes,
                    "guard": [dataclasses.asdict(v) for v in report.guard],
                    "num_trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
            (Path(args.output_dir) / "report.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
