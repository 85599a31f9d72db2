"""A plan handed to where users train: Hugging Face ``TrainingArguments`` + DeepSpeed JSON + ``LoraConfig``,
and an accelerate config for ``accelerate launch``.

``export_hf(setup, folder)`` writes

- ``training_args.json``: ``TrainingArguments(**json.load(f))`` loads it as it is (per-device batch,
  accumulation, bf16/fp16, gradient checkpointing, learning rate, and ``deepspeed`` = the absolute path
  of the DeepSpeed config beside it);
- ``sft_config.json``: the same plus TRL's ``max_length`` (the setup's sequence length) and ``packing``,
  for ``trl.SFTConfig(**json.load(f))``;
- ``ds_config.json``: ``moekit.zero.ds_config(setup)`` with the values the Trainer owns set to "auto"
  (batch sizes, accumulation, clipping, precision, the optimizer's parameters), so transformers fills
  them from the arguments and the two files cannot disagree; DeepSpeed's AdamW is named, as offload needs;
- ``adapter_config.json`` (LoRA): ``moekit.lora.peft_config`` saved by peft, read back with
  ``LoraConfig.from_pretrained(folder)``;
- ``setup.json``: the moekit setup itself.

``export_accelerate(setup, path)`` writes accelerate's own ``ClusterConfig`` as YAML (DeepSpeed, the
processes and machines, mixed precision) and the DeepSpeed config beside it; ``accelerate_argv``
gives the ``accelerate launch`` line.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.training_setup import TrainingSetup

#: The DeepSpeed keys a Hugging Face Trainer fills from its TrainingArguments when they say "auto".
TRAINER_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def hf_ds_config(setup: TrainingSetup) -> dict:
    """The DeepSpeed config for a Trainer run of this setup: moekit's, with the Trainer-owned values "auto"."""
    from moekit.zero import ds_config

    config = ds_config(setup)
    for key in TRAINER_OWNED_KEYS:
        config[key] = "auto"
    config["fp16"]["enabled"] = "auto"
    config["bf16"]["enabled"] = "auto"
    config["optimizer"] = {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}
    return config


def training_arguments(setup: TrainingSetup, *, output_dir: str = "runs/hf", deepspeed: str | None = None,
                       learning_rate: float | None = None) -> dict:
    """Keyword arguments of ``transformers.TrainingArguments`` for this setup (JSON-ready)."""
    from moekit.run_options import DEFAULT_LR
    from moekit.zero import GRADIENT_CLIPPING

    arguments = {
        "output_dir": output_dir,
        "per_device_train_batch_size": setup.micro_batch,
        "gradient_accumulation_steps": setup.grad_accum,
        "bf16": setup.precision == "bf16",
        "fp16": setup.precision == "fp16",
        "gradient_checkpointing": setup.activation_checkpointing,
        "learning_rate": learning_rate if learning_rate is not None else DEFAULT_LR[setup.method],
        # 0: a decoupled decay moves every weight, which would hide an adapter without gradients from the guard.
        "weight_decay": 0.0,
        "max_grad_norm": GRADIENT_CLIPPING,
        "logging_steps": 1,
    }
    if setup.activation_checkpointing:
        arguments["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if deepspeed is not None:
        arguments["deepspeed"] = deepspeed
    return arguments


def export_hf(setup: TrainingSetup, folder: str | Path, *, learning_rate: float | None = None) -> dict[str, Path]:
    """Write training_args.json, sft_config.json, ds_config.json, setup.json and (LoRA) adapter_config.json."""
    from moekit.checkpoints import save_setup

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    files = {name: folder / f"{name}.json" for name in ("training_args", "sft_config", "ds_config", "setup")}
    files["ds_config"].write_text(json.dumps(hf_ds_config(setup), indent=2) + "\n")
    arguments = training_arguments(setup, output_dir=str(folder / "output"), deepspeed=str(files["ds_config"]),
                                   learning_rate=learning_rate)
    files["training_args"].write_text(json.dumps(arguments, indent=2) + "\n")
    sft = {**arguments, "max_length": setup.seq_len, "packing": setup.packing}
    files["sft_config"].write_text(json.dumps(sft, indent=2) + "\n")
    save_setup(setup, files["setup"])
    if setup.uses_lora:
        from moekit.lora import peft_config

        peft_config(setup.lora, setup.model).save_pretrained(str(folder))
        files["lora"] = folder / "adapter_config.json"
    return files


def accelerate_config(setup: TrainingSetup, ds_config_path: str | Path, *, main_process_ip: str | None = None,
                      main_process_port: int | None = None):
    """accelerate's ``ClusterConfig`` for this setup: DeepSpeed with the given config file, one process per GPU."""
    from accelerate.commands.config.config_args import ClusterConfig

    multi_node = setup.num_nodes > 1
    return ClusterConfig(
        compute_environment="LOCAL_MACHINE",
        distributed_type="DEEPSPEED",
        mixed_precision=ACCELERATE_PRECISION[setup.precision],
        use_cpu=False,
        debug=False,
        num_processes=setup.world_size,
        num_machines=setup.num_nodes,
        machine_rank=0,
        main_process_ip=main_process_ip if multi_node else None,
        main_process_port=main_process_port if multi_node else None,
        same_network=True,
        deepspeed_config={"deepspeed_config_file": str(Path(ds_config_path).resolve()),
                          "zero3_init_flag": setup.zero_stage == 3},
    )


def export_accelerate(setup: TrainingSetup, path: str | Path, **options) -> dict[str, Path]:
    """Write the accelerate YAML at path and its DeepSpeed config beside it (``<stem>.ds_config.json``)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds_path = path.with_name(f"{path.stem}.ds_config.json")
    ds_path.write_text(json.dumps(hf_ds_config(setup), indent=2) + "\n")
    accelerate_config(setup, ds_path, **options).to_yaml_file(str(path))
    return {"accelerate": path, "ds_config": ds_path}


def accelerate_argv(config_path: str | Path, script: list[str], *, machine_rank: int | None = None) -> list[str]:
    """``accelerate launch --config_file ... <script>`` as arguments (with --machine_rank on one node of several)."""
    argv = ["accelerate", "launch", "--config_file", str(config_path)]
    if machine_rank is not None:
        argv += ["--machine_rank", str(machine_rank)]
    return argv + list(script)


__all__ = ["hf_ds_config", "training_arguments", "export_hf", "accelerate_config", "export_accelerate", "accelerate_argv"]
