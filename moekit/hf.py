"""moekit inside a Hugging Face ``Trainer`` (or TRL's ``SFTTrainer``): ``MemoryCallback``.

Most MoE fine-tunes run the Hugging Face Trainer with a DeepSpeed JSON. The callback looks at that
run as it is:

- ``on_train_begin``: reads the ``TrainingSetup`` the run really uses (``setup_from_trainer``: the
  model's config, its LoRA adapters, per-device batch, accumulation, precision, gradient
  checkpointing, the DeepSpeed config after transformers resolved its "auto" values, the world
  size, and the sequence length from TRL's ``max_length`` or an argument), estimates it, and warns
  when it does not fit, or, with ``stop_if_not_fit=True``, stops before the first step with the
  planner's advice;
- every optimizer step: reads memory (CUDA allocated and reserved, or the process's resident memory
  on the CPU; the maximum over the ranks) and puts it into the Trainer's logs, with the estimate beside
  it once;
- after the first optimizer step and at every save: the training guard (``moekit.guard``): the
  adapters that should move did move;
- ``on_train_end``: prints the predicted and the measured peak.

The callback gets no optimizer from the Trainer (transformers passes the one it had at construction,
None). ``watch(trainer)`` adds the callback with a reference to the trainer, so the guard can read
DeepSpeed's fp32 masters without ZeRO and skip fp16 steps that overflowed; it also puts the callback
first, so the memory fields reach the progress printer and the reporting integrations too.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from moekit.breakdown import Breakdown
from moekit.ds_read import precision_of, zero_fields_of
from moekit.errors import MoekitError
from moekit.training_setup import LoraSpec, TrainingSetup
from moekit.units import GiB


class HfSetupError(MoekitError):
    """A Trainer run moekit cannot describe or that does not fit; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Reading a Trainer run into a TrainingSetup
# --------------------------------------------------------------------------------------------


def model_name_for(config) -> str:
    """What ``TrainingSetup.model`` needs: a preset name, a local folder, or a config.json moekit writes.

    A config that is neither a preset nor a local folder is written, once per content, under the temp
    folder (every rank writes the same bytes, atomically).
    """
    from moekit.models import list_presets

    name = str(getattr(config, "name_or_path", "") or "")
    if name in list_presets() or (name and (Path(name) / "config.json").is_file()):
        return name
    text = config.to_json_string(use_diff=False)
    folder = Path(tempfile.gettempdir()) / "moekit-configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(text.encode()).hexdigest()[:16]}.json"
    if not path.is_file():
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, path)
    return str(path)


def lora_spec_of(model: torch.nn.Module) -> LoraSpec | None:
    """The LoRA spec of a peft model, read from its adapters (None without LoRA).

    Targets are the adapted modules' and parameters' names as peft placed them, so a regex or
    ``all-linear`` in the LoraConfig resolves exactly as peft did. A per-module rank
    (``rank_pattern``) counts at the largest rank: an over-estimate rather than an under-estimate.
    """
    from peft.tuners.lora import LoraLayer

    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    config = next(iter(peft_config.values()))
    targets: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            parameter = getattr(module, "parameter_name", None)
            owner = path.replace(".base_layer", "").rpartition(".")[2]  # nested wrappers of one module
            targets.add(f"{owner}.{parameter}" if parameter else owner)
    if not targets:
        return None
    r = max([config.r, *(config.rank_pattern or {}).values()])
    alpha = max([config.lora_alpha, *(config.alpha_pattern or {}).values()])
    return LoraSpec(r=r, alpha=alpha, dropout=config.lora_dropout, targets=tuple(sorted(targets)))


def resolved_ds_config(args) -> dict | None:
    """The DeepSpeed config as transformers resolved it ("auto" filled from the arguments and the model)."""
    hf_config = getattr(args, "hf_deepspeed_config", None)
    return hf_config.config if hf_config is not None else None


def _precision(args, ds: dict | None) -> str:
    if ds is not None:
        return precision_of(ds)
    # Without DeepSpeed the Trainer keeps fp32 weights and autocasts: fp32 counts those weights right
    # and over-counts the activations (an over-estimate rather than an under-estimate).
    return "fp32"


def device_memory_gb(args) -> float:
    """The memory one rank has: its GPU's, or on the CPU the host's RAM shared by the ranks of this node."""
    import psutil

    device = torch.device(args.device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / GiB
    return psutil.virtual_memory().total / GiB / local_world_size(args)


def local_world_size(args) -> int:
    """Ranks on this node: LOCAL_SIZE (the deepspeed launcher) or LOCAL_WORLD_SIZE (torchrun), else all of them.

    LOCAL_SIZE first: on CPU ranks accelerate rewrites LOCAL_WORLD_SIZE, to 1 when the launcher did not set it.
    """
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or args.world_size)


def setup_from_trainer(
    model: torch.nn.Module,
    args,
    *,
    seq_len: int | None = None,
    gpu_memory_gb: float | None = None,
    model_name: str | None = None,
) -> TrainingSetup:
    """The ``TrainingSetup`` a Trainer run uses, read from the model, its adapters and the arguments.

    Call it once the Trainer has prepared DeepSpeed (``on_train_begin``): the config's "auto" values
    are resolved by then. seq_len: the tokens per sequence; TRL's ``max_length`` when not given.
    """
    import psutil

    seq_len = seq_len or getattr(args, "max_length", None)
    if not seq_len:
        raise HfSetupError(
            "moekit needs the sequence length: pass MemoryCallback(seq_len=...) (TRL's SFTConfig gives max_length)."
        )
    ds = resolved_ds_config(args)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = lora_spec_of(model)
    quantized = bool(getattr(base, "is_loaded_in_4bit", False))
    method = "full" if spec is None else ("qlora" if quantized else "lora")
    micro_batch = int((ds or {}).get("train_micro_batch_size_per_gpu", args.per_device_train_batch_size))
    grad_accum = int((ds or {}).get("gradient_accumulation_steps", args.gradient_accumulation_steps))
    local = local_world_size(args)
    config = base.config
    setup = TrainingSetup(
        model=model_name or model_name_for(config),
        method=method,
        lora=spec or LoraSpec(),
        precision=_precision(args, ds),
        **zero_fields_of(ds or {}),
        gpus_per_node=local,
        num_nodes=max(1, args.world_size // local),
        gpu_memory_gb=gpu_memory_gb or device_memory_gb(args),
        host_memory_gb=psutil.virtual_memory().total / GiB,
        seq_len=int(seq_len),
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        activation_checkpointing=bool(args.gradient_checkpointing or getattr(base, "is_gradient_checkpointing", False)),
        packing=bool(getattr(args, "packing", True)),
        attn_implementation=getattr(config, "_attn_implementation", None) or "sdpa",
    )
    # Under ZeRO-3 the adapters keep the dtype peft gave them: read it (16-bit when autocast_adapter_dtype=False)
    return setup.replace(autocast_adapter_dtype=False) if setup.zero_stage == 3 and not adapters_upcast(model) else setup


def adapters_upcast(model: torch.nn.Module) -> bool:
    """Whether any LoRA adapter is fp32 (peft's ``autocast_adapter_dtype``, its default), read from the adapters;
    True without adapters. Under ZeRO-3's zero.Init DeepSpeed leaves them so (``moekit.traps.adapter_precision``)."""
    dtypes = {param.dtype for name, param in model.named_parameters() if ".lora_" in name}
    return not dtypes or torch.float32 in dtypes


def estimate_for_device(setup: TrainingSetup, device: torch.device) -> Breakdown:
    """``estimate(setup)``; on the CPU without the CUDA context and allocator reserve a CPU rank does not have."""
    from moekit.estimate import estimate

    breakdown = estimate(setup)
    if device.type == "cuda":
        return breakdown
    from moekit.lessons import without_overhead

    return without_overhead(breakdown)


def advice(setup: TrainingSetup) -> str:
    """The planner's advice for a setup that does not fit: the ladder's changes until it fits, and the best plan."""
    from moekit.plan import constraints_from_setup, ladder, plan

    rungs = ladder(setup)
    changes = [rung.description for rung in rungs[1:]]
    ladder_text = (
        f"the ladder fits after: {'; then '.join(changes)}" if rungs[-1].fits
        else "no rung of the ladder fits"
    )
    return f"{ladder_text}. Planner: {plan(constraints_from_setup(setup), top=1).verdict()}"


# --------------------------------------------------------------------------------------------
# Memory per step
# --------------------------------------------------------------------------------------------


def memory_reading(device: torch.device) -> dict[str, int]:
    """This rank's memory now: CUDA allocated and reserved (and their peaks since the last reading), or RSS."""
    if device.type == "cuda":
        reading = {
            "memory_allocated_bytes": torch.cuda.memory_allocated(device),
            "memory_reserved_bytes": torch.cuda.memory_reserved(device),
            "memory_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "memory_peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
        torch.cuda.reset_peak_memory_stats(device)
        return reading
    import psutil

    return {"memory_rss_bytes": psutil.Process().memory_info().rss}


def max_over_ranks(values: dict[str, int], device: torch.device) -> dict[str, int]:
    """Each value's maximum over the ranks (every rank must call it; a no-op without a process group)."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return {key: int(v) for key, v in zip(values, tensor.cpu().tolist())}


#: Readings a log reports at their maximum since the previous log (the others: the latest value).
MAX_SINCE_LOG = ("memory_peak_allocated_bytes", "memory_peak_reserved_bytes", "memory_rss_bytes")


def peak_key(device: torch.device) -> str:
    """The reading compared with the estimate: reserved memory's peak on CUDA, resident memory on the CPU."""
    return "memory_peak_reserved_bytes" if device.type == "cuda" else "memory_rss_bytes"


# --------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------


@dataclass
class GuardVerdict:
    """One guard check as the callback reports it."""

    step: int
    moved: list[str]
    stuck: list[str]


@dataclass
class MemoryCallbackReport:
    """What the callback saw: the setup, the estimate, memory per step, guard verdicts, the peaks."""

    setup: TrainingSetup | None = None
    estimate: Breakdown | None = None
    baseline: dict[str, int] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    guard: list[GuardVerdict] = field(default_factory=list)
    peak_bytes: int = 0
    peak_kind: str = ""

    def comparison(self) -> str:
        """The final line: predicted vs measured peak per rank."""
        predicted = self.estimate.total_bytes if self.estimate is not None else 0
        text = (
            f"moekit: predicted peak {predicted / GiB:.3f} GiB per rank, measured {self.peak_kind} peak "
            f"{self.peak_bytes / GiB:.3f} GiB"
        )
        if self.peak_kind == "memory_rss_bytes" and self.baseline:
            grown = self.peak_bytes - self.baseline.get("memory_rss_bytes", 0)
            text += (
                f" (resident memory counts the Python/torch runtime and what was built before training, and not the "
                f"untouched pages of torch.empty buffers, docs/hf.md: "
                f"{self.baseline['memory_rss_bytes'] / GiB:.3f} GiB at train begin, +{grown / GiB:.3f} GiB during training)"
            )
        return text


class MemoryCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that estimates, watches memory and guards the adapters of a Trainer run.

    seq_len: tokens per sequence (default: TRL's ``max_length``). gpu_memory_gb: memory per rank to
    judge the fit against (default: the GPU's, or on the CPU the host RAM over the local ranks).
    stop_if_not_fit: raise ``HfSetupError`` with the planner's advice in ``on_train_begin`` instead of
    warning. guard: run the training guard after the first step and at saves. check_frozen: the guard
    also checks that frozen weights did not change.
    """

    def __init__(
        self,
        *,
        seq_len: int | None = None,
        gpu_memory_gb: float | None = None,
        stop_if_not_fit: bool = False,
        guard: bool = True,
        check_frozen: bool = False,
        model_name: str | None = None,
        trainer=None,
    ) -> None:
        self.seq_len, self.gpu_memory_gb, self.model_name = seq_len, gpu_memory_gb, model_name
        self.stop_if_not_fit, self.use_guard, self.check_frozen = stop_if_not_fit, guard, check_frozen
        self.trainer = trainer
        self.report = MemoryCallbackReport()
        self._guard = None
        self._stepped_since_check = False
        self._pending: dict[str, int] = {}
        self._estimate_logged = False
        self._device = torch.device("cpu")

    # -- helpers ---------------------------------------------------------------------------------
    def _optimizer(self):
        return getattr(self.trainer, "optimizer", None) if self.trainer is not None else None

    def _say(self, state, text: str) -> None:
        if state.is_world_process_zero:
            print(text, file=sys.stderr, flush=True)

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        release_shm_if_distributed()
        self._device = torch.device(args.device)
        setup = setup_from_trainer(model, args, seq_len=self.seq_len, gpu_memory_gb=self.gpu_memory_gb,
                                   model_name=self.model_name)
        breakdown = estimate_for_device(setup, self._device)
        self.report.setup, self.report.estimate = setup, breakdown
        self.report.baseline = max_over_ranks(memory_reading(self._device), self._device)
        self._say(state, f"moekit: {setup.describe()}\n{breakdown.table()}")
        if not breakdown.fits:
            message = (
                f"this run needs {breakdown.total_bytes / GiB:.2f} GiB per rank, more than the "
                f"{setup.gpu_memory_gb:.4g} GB it has (largest: {breakdown.largest_category()}); {advice(setup)}"
            )
            if self.stop_if_not_fit:
                raise HfSetupError(f"stopped before the first step: {message}")
            warnings.warn(f"moekit: {message}", stacklevel=2)
        if self.use_guard and setup.precision == "fp16" and self._optimizer() is None:
            warnings.warn("moekit: the training guard is off: under fp16 it must see the optimizer to skip the steps "
                          "that overflowed; add the callback with moekit.hf.watch(trainer).", stacklevel=2)
        elif self.use_guard:
            from moekit.guard import TrainingGuard, check_lora_coverage, lora_components, param_groups

            groups = param_groups(model, setup)
            check_lora_coverage(groups, lora_components(setup))
            optimizer = self._optimizer()
            self._guard = TrainingGuard(model, groups, self.check_frozen, getattr(optimizer, "optimizer", optimizer))

    def on_step_end(self, args, state, control, **kwargs):
        reading = max_over_ranks(memory_reading(self._device), self._device)
        self.report.steps.append({"step": state.global_step, **reading})
        key = peak_key(self._device)
        if reading.get(key, 0) >= self.report.peak_bytes:
            self.report.peak_bytes, self.report.peak_kind = reading[key], key
        # Between two logs (logging_steps > 1) a log shows the latest reading, peaks and RSS at their maximum.
        self._pending = {k: max(v, self._pending.get(k, 0)) if k in MAX_SINCE_LOG else v for k, v in reading.items()}
        skipped = bool(getattr(self._optimizer(), "step_was_skipped", False))  # fp16 overflow: nothing moved
        self._stepped_since_check = self._stepped_since_check or not skipped
        if self._guard is not None and self._stepped_since_check and not self.report.guard:
            self._check(state)

    def on_save(self, args, state, control, **kwargs):
        if self._guard is not None and self._stepped_since_check:
            self._check(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self._pending:
            return
        extra = dict(self._pending)
        if not self._estimate_logged and self.report.estimate is not None:
            extra["moekit_estimate_bytes"] = self.report.estimate.total_bytes
            self._estimate_logged = True
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer appended a copy of logs before calling us
        self._pending = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._say(state, self.report.comparison())

    def _check(self, state) -> None:
        check = self._guard.check(state.global_step)  # raises TrainingGuardError naming what did not move
        self._stepped_since_check = False
        verdict = GuardVerdict(state.global_step, [g for g, m in check.moved.items() if m], check.stuck)
        self.report.guard.append(verdict)
        self._say(state, f"moekit guard at step {verdict.step}: moved {', '.join(verdict.moved)}")


def watch(trainer, **options) -> MemoryCallback:
    """Add a ``MemoryCallback`` to a trainer, first in line, with a reference to the trainer (see the module doc)."""
    callback = MemoryCallback(trainer=trainer, **options)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def release_shm_if_distributed() -> None:
    """Unlink DeepSpeed's CPU all-reduce workspace once every rank mapped it (``moekit.train``'s cleanup)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or "deepspeed" not in sys.modules:
        return
    from moekit.distributed import release_shm_allreduce_buffer

    release_shm_allreduce_buffer()


def read_trainer_logs(output_dir: str | Path) -> list[dict]:
    """``log_history`` of the newest checkpoint's trainer_state.json under output_dir."""
    states = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not states:
        raise HfSetupError(f"no checkpoint-*/trainer_state.json under {output_dir}; save at least once (save_strategy).")
    return json.loads(states[-1].read_text())["log_history"]


# --------------------------------------------------------------------------------------------
# A small real run for lessons and tests: a preset model, LoRA, moekit's bundled text
# --------------------------------------------------------------------------------------------


def example_tokenizer():
    """moekit's byte tokenizer as a ``PreTrainedTokenizerFast`` (what TRL wants as processing_class); offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from moekit.data import ByteTokenizer

    byte = ByteTokenizer()
    vocab = {"<pad>": byte.pad_token_id, "<s>": byte.bos_token_id, "</s>": byte.eos_token_id}
    vocab.update({f"<0x{b:02X}>": byte.offset + b for b in range(256)})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def example_dataset(seq_len: int, vocab_size: int):
    """moekit's bundled text packed into rows of seq_len tokens, as a ``datasets.Dataset`` (input_ids, labels)."""
    from datasets import Dataset

    from moekit.data import load_documents, tokenize, tokenizer_for

    data = tokenize(load_documents(None), tokenizer_for(vocab_size), seq_len, packing=True)
    rows = [row.tolist() for row in data.rows]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})


def example_trainer(setup: TrainingSetup, output_dir: str | Path, *, trl: bool = False, callbacks=(), seed: int = 0,
                    **arguments):
    """A real ``Trainer`` (or TRL ``SFTTrainer``) on a preset model with the setup's LoRA, micro-batch and accumulation.

    arguments: more ``TrainingArguments`` (``max_steps``, ``deepspeed``, ``use_cpu``, ...). The model gets
    seeded random weights; the data is moekit's bundled text packed to ``setup.seq_len``.
    """
    from transformers import Trainer, TrainingArguments

    from moekit.build import prepare_model
    from moekit.models import build_model

    model = prepare_model(build_model(setup.model, "cpu", seed=seed, attn_implementation=setup.attn_implementation), setup)
    dataset = example_dataset(setup.seq_len, model.config.vocab_size)
    common = dict(output_dir=str(output_dir), per_device_train_batch_size=setup.micro_batch,
                  gradient_accumulation_steps=setup.grad_accum, bf16=setup.precision == "bf16",
                  fp16=setup.precision == "fp16", learning_rate=1e-2 if setup.uses_lora else 1e-3, weight_decay=0.0,
                  logging_steps=1, report_to="none", seed=seed, disable_tqdm=True)
    common.update(arguments)
    if trl:
        from trl import SFTConfig, SFTTrainer

        sft_args = SFTConfig(max_length=setup.seq_len, packing=False,
                             **common)
        return SFTTrainer(model=model, args=sft_args, train_dataset=dataset, processing_class=example_tokenizer(),
                          callbacks=list(callbacks))
    return Trainer(model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=list(callbacks))


__all__ = ["MemoryCallback", "MemoryCallbackReport", "HfSetupError", "setup_from_trainer", "watch", "lora_spec_of",
           "memory_reading", "read_trainer_logs", "example_trainer", "example_dataset",
           "example_tokenizer"]
