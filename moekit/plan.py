"""The planner: which setups fit, ranked by a documented step-time model, and the mitigation ladder.

``plan(constraints)`` searches the knob space with ``estimate`` (microseconds per setup) and returns the
setups that fit, fastest first. ``ladder(baseline)`` applies one mitigation at a time, in the article's
order or yours, and shows what each rung saves until the run fits.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moekit.breakdown import Breakdown
from moekit.errors import MoekitError
from moekit.estimate import estimate, model_facts, num_trainable_params
from moekit.training_setup import METHODS, OFFLOADS, PRECISIONS, LoraSpec, SetupError, TrainingSetup
from moekit.traps import adapter_precision
from moekit.units import GiB, width
from moekit.zero_knobs import zero_knobs

# ---------------------------------------------------------------------------------------------
# A relative step-time model
# ---------------------------------------------------------------------------------------------

#: Assumptions of the cost model, A100-class; only ratios matter for the ranking.
GPU_FLOPS = 312e12 * 0.4  # dense bf16 peak x a typical 40% utilisation
FP32_SLOWDOWN = 2.0  # TF32 tensor cores run at half the bf16 rate
INTRA_NODE_BYTES_PER_S = 150e9  # NVLink all-gather / reduce-scatter bus bandwidth per GPU
INTER_NODE_BYTES_PER_S = 12.5e9  # 100 Gb/s InfiniBand / Ethernet per GPU
PCIE_BYTES_PER_S = 20e9  # host <-> GPU copies for offload
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeed's CPUAdam per rank (AVX, a few cores each)
#: GPU efficiency falls for small micro-batches: tokens / (tokens + this).
HALF_EFFICIENCY_TOKENS = 1024


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step, by part, under the assumptions above (a ranking aid, not a promise)."""

    compute_s: float
    communication_s: float
    offload_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.communication_s + self.offload_s


def step_time(setup: TrainingSetup) -> StepTime:
    """Relative step time: FLOPs of forward, backward and recomputation, ZeRO traffic, offload traffic.

    - compute: 2 x active params x tokens for forward; backward 4x for a full fine-tune, 2x (input
      gradients only) under LoRA; checkpointing adds one more forward. Divided by the ranks and by a
      micro-batch efficiency tokens / (tokens + 1024).
    - communication: ZeRO-3 all-gathers the 16-bit weights twice per micro-step (forward and backward) and
      reduce-scatters gradients; stages 0-2 all-reduce (or reduce-scatter) the trainable gradients once.
    - offload: gradients to the host and weights back over PCIe, and Adam on the CPU; parameter offload
      also streams the weight partitions over PCIe twice per micro-step.
    """
    f = model_facts(setup.model)
    active = f.num_params_outside_layers + f.num_layers * (
        f.num_params_per_layer - f.num_expert_params_per_layer * (1 - f.experts_per_token / max(f.num_experts, 1))
    )
    tokens = setup.micro_batch * setup.seq_len
    passes = 2 + (2 if setup.uses_lora else 4) + (2 if setup.activation_checkpointing else 0)
    efficiency = tokens / (tokens + HALF_EFFICIENCY_TOKENS)
    flops_per_micro_step = passes * active * tokens
    compute = setup.grad_accum * flops_per_micro_step / (GPU_FLOPS * efficiency)
    if setup.precision == "fp32":
        compute *= FP32_SLOWDOWN

    num_bytes = width(setup.precision)
    trainable = num_trainable_params(setup)
    bandwidth = INTRA_NODE_BYTES_PER_S if setup.num_nodes == 1 else INTER_NODE_BYTES_PER_S
    if setup.world_size == 1:
        communication = 0.0
    elif setup.zero_stage == 3:
        communication = setup.grad_accum * 3 * num_bytes * f.num_params / bandwidth
    else:
        communication = 2 * num_bytes * trainable / bandwidth

    offload = 0.0
    if setup.offload != "none":
        owned = trainable / setup.world_size
        offload += (4 + num_bytes) * owned / PCIE_BYTES_PER_S + owned / CPU_ADAM_PARAMS_PER_S
    if setup.offload == "optimizer+params":
        offload += setup.grad_accum * 2 * num_bytes * f.num_params / setup.world_size / PCIE_BYTES_PER_S
    return StepTime(compute, communication, offload)


# ---------------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------------

ZERO_AND_OFFLOAD = ((0, "none"), (1, "none"), (2, "none"), (1, "optimizer"), (2, "optimizer"), (3, "none"),
                    (3, "optimizer"), (3, "optimizer+params"))


@dataclass(frozen=True)
class Constraints:
    """What the user has and what they will accept; the planner searches everything else."""

    model: str = "mixtral-8x7b"
    gpus_per_node: int = 8
    num_nodes: int = 1
    gpu_memory_gb: float = 40.0
    host_memory_gb: float | None = None
    seq_len: int = 4096
    min_seq_len: int | None = None  # allow shorter sequences down to this length
    global_batch: int | None = None  # sequences per optimizer step to keep; default one per GPU
    methods: tuple[str, ...] = ("lora", "full")
    lora_ranks: tuple[int, ...] = (8, 16, 64)
    lora_targets: tuple[tuple[str, ...], ...] = (("attention", "experts"), ("attention",))
    precisions: tuple[str, ...] = ("bf16",)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)
    offloads: tuple[str, ...] = ("none", "optimizer", "optimizer+params")  # leave out what you will not allow
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        # The hardware and sequence fields obey the setup's own rules (one home for them).
        TrainingSetup(model=self.model, gpus_per_node=self.gpus_per_node, num_nodes=self.num_nodes,
                      gpu_memory_gb=self.gpu_memory_gb, host_memory_gb=self.host_memory_gb, seq_len=self.seq_len,
                      attn_implementation=self.attn_implementation)
        for name, allowed in (("methods", METHODS), ("precisions", PRECISIONS), ("offloads", OFFLOADS)):
            values = getattr(self, name)
            if isinstance(values, str) or not values or set(values) - set(allowed):
                raise SetupError(f"{name} must be a non-empty tuple from {', '.join(allowed)}; got {values!r}.")
        for name in ("lora_ranks", "micro_batches"):
            values = getattr(self, name)
            if (isinstance(values, (str, int)) or not values
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
                raise SetupError(f"{name} must be a non-empty tuple of positive whole numbers, e.g. (8, 16); got {values!r}.")
        if not self.lora_targets or isinstance(self.lora_targets, str):
            raise SetupError(f"lora_targets must be a tuple of target tuples, e.g. (('attention', 'experts'),); got "
                             f"{self.lora_targets!r}.")
        if self.global_batch is not None and (not isinstance(self.global_batch, int) or isinstance(self.global_batch, bool)
                                              or self.global_batch <= 0):
            raise SetupError(f"global_batch must be a positive whole number of sequences, got {self.global_batch!r}.")
        if self.min_seq_len is not None and (not isinstance(self.min_seq_len, int) or isinstance(self.min_seq_len, bool)):
            raise SetupError(f"min_seq_len must be a whole number of tokens, got {self.min_seq_len!r}.")
        if self.min_seq_len is not None and not 0 < self.min_seq_len <= self.seq_len:
            raise SetupError(f"min_seq_len={self.min_seq_len} must be between 1 and seq_len={self.seq_len}.")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def target_global_batch(self) -> int:
        return self.global_batch or self.world_size

    def seq_lens(self) -> list[int]:
        """The sequence lengths to try: the requested one and, if allowed, shorter ones down to the minimum."""
        if self.min_seq_len is None:
            return [self.seq_len]
        steps = [self.seq_len, int(self.seq_len * 0.9), self.seq_len // 2, self.min_seq_len]
        return sorted({s for s in steps if s >= self.min_seq_len}, reverse=True)


@dataclass
class Candidate:
    """One setup with its estimate and its modelled step time."""

    setup: TrainingSetup
    breakdown: Breakdown
    time: StepTime

    @property
    def fits(self) -> bool:
        return bool(self.breakdown.fits)

    def as_dict(self) -> dict:
        return {
            "setup": self.setup.as_dict(),
            "describe": self.setup.describe(),
            "estimate": self.breakdown.as_dict(),
            "step_time_s": self.time.total_s,
            "fits": self.fits,
        }


def candidate_setups(constraints: Constraints) -> list[TrainingSetup]:
    """Every valid combination of the knobs, keeping the global batch."""
    c = constraints
    setups = []
    lora_options = [(r, t) for r in c.lora_ranks for t in c.lora_targets]
    for method, precision, (stage, offload), checkpointing, micro_batch, seq_len in itertools.product(
        c.methods, c.precisions, ZERO_AND_OFFLOAD, (False, True), c.micro_batches, c.seq_lens()
    ):
        per_step = micro_batch * c.world_size
        if offload not in c.offloads or c.target_global_batch % per_step:
            continue
        if method == "qlora" and (precision == "fp32" or stage == 3):
            continue
        for r, targets in lora_options if method != "full" else [(16, ("attention",))]:
            setups.append(
                TrainingSetup(
                    model=c.model, method=method, lora=LoraSpec(r=r, alpha=2 * r, targets=targets),
                    precision=precision, zero_stage=stage, offload=offload, gpus_per_node=c.gpus_per_node,
                    num_nodes=c.num_nodes, gpu_memory_gb=c.gpu_memory_gb, host_memory_gb=c.host_memory_gb,
                    seq_len=seq_len, micro_batch=micro_batch, grad_accum=c.target_global_batch // per_step,
                    activation_checkpointing=checkpointing, attn_implementation=c.attn_implementation,
                )
            )
    return setups


@dataclass
class PlanResult:
    """Setups that fit, fastest first; if none does, the closest miss."""

    fits: list[Candidate]
    closest: Candidate
    num_searched: int
    num_fit: int

    @property
    def best(self) -> Candidate | None:
        return self.fits[0] if self.fits else None

    def verdict(self) -> str:
        if self.fits:
            return f"{self.num_fit} of {self.num_searched} setups fit; best: {self.fits[0].setup.describe()}"
        miss_gib = -self.closest.breakdown.headroom_bytes / GiB
        return (
            f"nothing fits: of {self.num_searched} setups the closest is {self.closest.setup.describe()}, "
            f"which needs {miss_gib:.1f} GiB more per GPU. Add GPUs or memory, allow offload or LoRA, "
            "or allow shorter sequences (min_seq_len)."
        )


#: How plan() orders the setups that fit (printed with the results; ``_rank_key`` implements it).
RANKING = ("longest sequence first, then the shortest modelled step time (a relative A100-class model from "
           "FLOPs and bandwidths, for ranking only: not a promise of seconds), then the most trainable "
           "parameters, then the most headroom")


def plan(constraints: Constraints, *, top: int | None = None) -> PlanResult:
    """Search every knob combination with ``estimate``; rank what fits by sequence length, then step time."""
    if not isinstance(constraints, Constraints):
        raise MoekitError(f"plan takes Constraints, got {type(constraints).__name__}; e.g. plan(Constraints(model='tiny')).")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top <= 0):
        raise MoekitError(f"top must be a positive number of setups to return, got {top!r}.")
    candidates = [Candidate(s, estimate(s), step_time(s)) for s in candidate_setups(constraints)]
    if not candidates:
        raise MoekitError(
            f"no micro-batch in {constraints.micro_batches} divides the global batch {constraints.target_global_batch} "
            f"over {constraints.world_size} GPUs; choose a global batch that is a multiple of {constraints.world_size}."
        )
    fitting = sorted((c for c in candidates if c.fits), key=_rank_key)
    closest = max(candidates, key=lambda c: c.breakdown.headroom_bytes)
    return PlanResult(fitting[:top] if top else fitting, closest, len(candidates), len(fitting))


def _rank_key(candidate: Candidate) -> tuple:
    """The longest sequence first (shortening is a concession), then the fastest; among equals prefer more
    trainable parameters, then more headroom."""
    s = candidate.setup
    return (-s.seq_len, round(candidate.time.total_s, 6), -num_trainable_params(s), -candidate.breakdown.headroom_bytes)


# ---------------------------------------------------------------------------------------------
# The ladder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mitigation:
    """One knob turned: a name, what it does, and the change (None when it does not apply)."""

    name: str
    description: str
    apply: Callable[[TrainingSetup], TrainingSetup | None]


def _changed(setup: TrainingSetup, **changes) -> TrainingSetup | None:
    new = setup.replace(**changes)
    return None if new == setup else new


def mitigations(min_seq_len: int | None = None) -> dict[str, Mitigation]:
    """The mitigations the lessons teach, keyed by name, in the article's order."""
    items = [
        Mitigation("lora", "train LoRA adapters instead of every weight (r=16 on attention and experts)",
                   lambda s: _changed(s, method="lora") if s.method == "full" else None),
        Mitigation("lower_rank", "halve the LoRA rank", lambda s: _changed(s, lora_r=max(4, s.lora.r // 2)) if s.uses_lora else None),
        Mitigation("fewer_targets", "LoRA on attention only: no adapters (and no merged copies) on the experts",
                   lambda s: _changed(s, lora_targets=("attention",)) if s.uses_lora else None),
        Mitigation("shorter_sequences", f"cut the sequence length to {min_seq_len or 'the minimum allowed'} tokens",
                   lambda s: _changed(s, seq_len=min_seq_len) if min_seq_len and min_seq_len < s.seq_len else None),
        Mitigation("micro_batch_1", "micro-batch 1 with gradient accumulation keeping the global batch",
                   lambda s: _changed(s, micro_batch=1, grad_accum=s.grad_accum * s.micro_batch)),
        Mitigation("mixed_precision", "bf16 mixed precision instead of fp32",
                   lambda s: _changed(s, precision="bf16") if s.precision == "fp32" else None),
        Mitigation("zero2", "DeepSpeed ZeRO-2: partition gradients and optimizer states",
                   lambda s: _changed(s, zero_stage=2, offload="none") if s.zero_stage < 2 else None),
        Mitigation("zero2_offload", "ZeRO-2 with the optimizer offloaded to CPU RAM",
                   lambda s: _changed(s, zero_stage=2, offload="optimizer") if s.zero_stage <= 2 else None),
        Mitigation("zero3", "DeepSpeed ZeRO-3: partition the weights too",
                   lambda s: _changed(s, zero_stage=3) if s.zero_stage < 3 else None),
        Mitigation("zero3_offload", "ZeRO-3 with optimizer and parameters offloaded to CPU RAM",
                   lambda s: _changed(s, zero_stage=3, offload="optimizer+params")),
        Mitigation("checkpointing", "activation checkpointing: keep one hidden state per layer, recompute the rest",
                   lambda s: _changed(s, activation_checkpointing=True)),
        # The field traps (moekit.traps): memory the step's account used to leave out.
        Mitigation("expandable_segments", "CUDA: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True shrinks the "
                   "allocator's reserve", lambda s: _changed(s, expandable_segments=True)),
        Mitigation("fused_loss", "fused linear-cross-entropy (Liger via use_liger_kernel): no fp32 logits "
                   "(estimate only)", lambda s: _changed(s, loss_impl="fused") if s.loss_impl == "hf" else None),
        Mitigation("adamw_8bit", "bitsandbytes 8-bit AdamW: 2 B of optimizer state per trained parameter instead of 8",
                   lambda s: _changed(s, optimizer="adamw_8bit") if s.offload == "none" else None),
        Mitigation("zero_init", "load under zero.Init (ZeRO-3): each rank materializes its partition only",
                   lambda s: _changed(s, load_path="zero_init") if s.zero_stage == 3 and s.load_path != "auto" else None),
        Mitigation("smaller_buckets", "DeepSpeed buckets of hidden x hidden elements (the Hugging Face Trainer's "
                   "\"auto\") instead of DeepSpeed's default", _smaller_buckets),
        Mitigation("adapters_not_upcast", "LoRA adapters kept in the working dtype (peft's "
                   "autocast_adapter_dtype=False): under ZeRO-3's zero.Init no fp32 copy of each adapted Linear's input",
                   _adapters_not_upcast),
        Mitigation("router_loss_off", "leave out the router's load-balancing loss (output_router_logits=False)",
                   lambda s: _changed(s, router_aux_loss=False) if s.router_aux_loss else None),
    ]
    return {m.name: m for m in items}


def _adapters_not_upcast(setup: TrainingSetup) -> TrainingSetup | None:
    if adapter_precision(setup, model_facts(setup.model).arch.model_type) == setup.precision:
        return None
    return _changed(setup, autocast_adapter_dtype=False)


def _smaller_buckets(setup: TrainingSetup) -> TrainingSetup | None:
    """reduce_bucket_size (and ZeRO-3's prefetch) as transformers resolves "auto": hidden^2 (0.9 hidden^2)."""
    if setup.zero_stage == 0:
        return None
    hidden = model_facts(setup.model).hidden
    knobs = zero_knobs(setup)
    changes = {"reduce_bucket_size": min(knobs.reduce_bucket_size, hidden * hidden)}
    if setup.zero_stage == 3:
        changes["stage3_prefetch_bucket_size"] = min(knobs.stage3_prefetch_bucket_size, int(0.9 * hidden * hidden))
    return _changed(setup, **changes)


#: The mitigations that move states to CPU RAM (left out when offloading is not allowed).
OFFLOAD_MITIGATIONS = ("zero2_offload", "zero3_offload")

ARTICLE_ORDER = ("lora", "lower_rank", "shorter_sequences", "micro_batch_1", "mixed_precision", "zero2",
                 "zero2_offload", "zero3", "zero3_offload", "checkpointing")
#: The field traps' rungs, offered after the article's ladder (``trap_rungs``).
TRAP_ORDER = ("zero_init", "router_loss_off", "fused_loss", "adapters_not_upcast", "expandable_segments",
              "smaller_buckets", "adamw_8bit")


@dataclass
class Rung:
    """One step of the ladder: the change, the resulting setup and estimate, and what it saved."""

    change: str
    description: str
    setup: TrainingSetup
    breakdown: Breakdown
    saved_bytes: int

    @property
    def fits(self) -> bool:
        return bool(self.breakdown.fits)

    def as_dict(self) -> dict:
        return {
            "change": self.change,
            "description": self.description,
            "setup": self.setup.describe(),
            "per_gpu": self.breakdown.as_dict()["per_gpu"],
            "per_host": dict(self.breakdown.per_host),
            "saved_bytes": self.saved_bytes,
            "fits": self.fits,
        }


def ladder(
    baseline: TrainingSetup,
    order: Sequence[str] = ARTICLE_ORDER,
    *,
    min_seq_len: int | None = None,
    stop_when_fits: bool = True,
    estimator: Callable[[TrainingSetup], Breakdown] = estimate,
) -> list[Rung]:
    """Apply one mitigation at a time (cumulatively) from the baseline until the estimate fits.

    estimator: what judges each rung; a toy ladder on the CPU passes ``lambda s: without_overhead(estimate(s))``
    (``moekit.lessons``), since a CPU has no CUDA context or allocator reserve.
    """
    available = mitigations(min_seq_len)
    unknown = [name for name in order if name not in available]
    if unknown:
        raise MoekitError(f"unknown mitigations {unknown}; choose from {', '.join(available)}.")
    previous = estimator(baseline)
    rungs = [Rung("baseline", baseline.describe(), baseline, previous, 0)]
    setup = baseline
    for name in order:
        if stop_when_fits and rungs[-1].fits:
            break
        try:
            changed = available[name].apply(setup)
        except SetupError:
            changed = None
        if changed is None:
            continue
        result = estimator(changed)
        rungs.append(Rung(name, available[name].description, changed, result, previous.total_bytes - result.total_bytes))
        setup, previous = changed, result
    return rungs


def trap_rungs(setup: TrainingSetup, estimator: Callable[[TrainingSetup], Breakdown] = estimate) -> list[Rung]:
    """The field traps' mitigations that apply to ``setup`` (the ladder's last rung), each alone, with what it
    saves of the step's peak per GPU (the load phase's peak is in each rung's breakdown and its fit)."""
    available = mitigations()
    before = estimator(setup)
    rungs = []
    for name in TRAP_ORDER:
        try:
            changed = available[name].apply(setup)
        except SetupError:
            changed = None
        if changed is not None:
            after = estimator(changed)
            saved = before.total_bytes - after.total_bytes  # the training step's peak
            rungs.append(Rung(name, available[name].description, changed, after, saved))
    return rungs


def first_advice(breakdown: Breakdown) -> str:
    """The first thing to change when a setup does not fit, following the numbers.

    When the weights alone exceed the card, nothing else can help until they are partitioned (ZeRO-3),
    offloaded or quantized (QLoRA); otherwise the largest category is the one to attack.
    """
    gib, weights = GiB, breakdown.per_gpu["weights"]
    if breakdown.gpu_memory_bytes is not None and weights >= breakdown.gpu_memory_bytes:
        return (f"the weights alone ({weights / gib:.1f} GiB per GPU) exceed the {breakdown.gpu_memory_bytes / gib:.0f} "
                "GiB card: partition them with ZeRO-3 (--zero 3), offload them (--offload optimizer+params) or "
                "quantize them (--method qlora) first")
    load_note = breakdown.notes.get("load", "")
    if breakdown.gpu_fits is False and breakdown.total_bytes <= (breakdown.gpu_memory_bytes or 0):
        return (f"the step fits but loading the weights needs {breakdown.peak_gpu_bytes / gib:.1f} GiB per GPU "
                f"({load_note}): load under zero.Init (ZeRO-3; an MXFP4 checkpoint as a bf16 copy with --load-path "
                "zero_init) or use larger GPUs")
    if breakdown.host_fits is False and breakdown.peak_host_bytes > breakdown.host_bytes:
        return (f"loading the weights needs {breakdown.peak_host_bytes / gib:.1f} GiB of host RAM per node "
                f"({load_note}): load under zero.Init (ZeRO-3, --load-path auto), or fewer ranks per node")
    if breakdown.host_fits is False and breakdown.gpu_fits:
        return (f"host RAM is short ({breakdown.host_bytes / gib:.1f} GiB offloaded per node of "
                f"{breakdown.host_memory_bytes / gib:.1f}): offload less, or use more nodes")
    return f"largest category: {breakdown.largest_category()} -- attack that first"


def as_json(result: PlanResult, rungs: list[Rung], traps: Sequence[Rung] = ()) -> dict:
    """The ``moekit plan --json`` document."""
    return {
        "traps": [r.as_dict() for r in traps],
        "fits": [c.as_dict() for c in result.fits],
        "closest": result.closest.as_dict(),
        "verdict": result.verdict(),
        "ranking": RANKING,
        "ladder": [r.as_dict() for r in rungs],
    }


def constraints_from_setup(setup: TrainingSetup, **overrides) -> Constraints:
    """Constraints matching a setup's hardware, model, sequence length and LoRA rank.

    The search keeps the setup's LoRA rank (pass ``lora_ranks=(8, 16, 64)`` to let it choose): a planner that
    silently trades the user's r=16 for r=64 changes the experiment, not only its memory.
    """
    base = Constraints(
        model=setup.model, gpus_per_node=setup.gpus_per_node, num_nodes=setup.num_nodes,
        gpu_memory_gb=setup.gpu_memory_gb, host_memory_gb=setup.host_memory_gb, seq_len=setup.seq_len,
        global_batch=setup.global_batch, attn_implementation=setup.attn_implementation, precisions=(setup.precision,),
        lora_ranks=(setup.lora.r,),
    )
    return dataclasses.replace(base, **overrides)


__all__ = ["Constraints", "Candidate", "PlanResult", "Rung", "StepTime", "ARTICLE_ORDER", "plan", "ladder",
           "mitigations", "step_time", "constraints_from_setup", "as_json", "first_advice", "RANKING"]
