"""``Breakdown``: bytes per memory category, per GPU and per host.

``estimate``, ``simulate`` and ``measure`` all return this one type with the same category names,
so a notebook can put prediction, simulation and measurement side by side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.units import GiB

#: The categories, in the order plots stack them.
CATEGORIES = (
    "weights",  # parameters held on the device (16-bit copies, fp32 masters, 4-bit QLoRA base)
    "gradients",  # gradient buffers of trainable parameters
    "optimizer_states",  # Adam moments (and fp32 master weights under mixed precision)
    "activations",  # tensors saved for backward, alive at the end of forward
    "temporaries",  # short-lived tensors at the peak of backward / the optimizer step
    "buffers",  # DeepSpeed communication buckets, ZeRO-3 prefetch and live gathered parameters
    "overhead",  # CUDA context and allocator reserve / fragmentation
)



@dataclass
class Breakdown:
    """Memory in bytes by category, for one GPU (rank) and for one host.

    total_bytes is the predicted (or measured) peak, which is not always the sum of the categories:
    temporaries of backward and of the optimizer step are not alive at the same time.
    """

    source: str  # "estimate", "simulate" or "measure"
    per_gpu: dict[str, int]
    per_host: dict[str, int] = field(default_factory=dict)
    total_bytes: int | None = None
    gpu_memory_bytes: int | None = None
    notes: dict[str, str] = field(default_factory=dict)
    host_memory_bytes: int | None = None  # RAM per node; None: not given, so not checked
    #: The load phase (moekit.traps.load_phase): peak per GPU and host RAM per node while weights are loaded.
    load_gpu_bytes: int | None = None
    load_host_bytes: int | None = None

    def __post_init__(self) -> None:
        unknown = set(self.per_gpu) - set(CATEGORIES)
        if unknown:
            raise ValueError(f"unknown categories {sorted(unknown)}; use {', '.join(CATEGORIES)}")
        self.per_gpu = {c: int(self.per_gpu.get(c, 0)) for c in CATEGORIES}
        if self.total_bytes is None:
            self.total_bytes = sum(self.per_gpu.values())

    @property
    def fits(self) -> bool | None:
        """The one fit verdict (estimate, plan, launch and the dashboard ask this): the GPU peak, of the
        training step and of loading the weights, fits the card and, when the host's RAM is given, what lives
        on the host (offloaded states, the load's copies) fits it too. None when the GPU memory is unknown."""
        if self.gpu_memory_bytes is None:
            return None
        return self.gpu_fits and self.host_fits is not False

    @property
    def gpu_fits(self) -> bool | None:
        return None if self.gpu_memory_bytes is None else self.peak_gpu_bytes <= self.gpu_memory_bytes

    @property
    def peak_gpu_bytes(self) -> int:
        """The larger of the training step's peak and the load phase's (when known)."""
        return max(self.total_bytes, self.load_gpu_bytes or 0)

    @property
    def peak_host_bytes(self) -> int:
        """Host RAM per node at its fullest: offloaded states during training, or the load's copies."""
        return max(self.host_bytes, self.load_host_bytes or 0)

    @property
    def host_bytes(self) -> int:
        """Bytes per node held in host RAM (offloaded optimizer states, gradients, parameters)."""
        return sum(self.per_host.values())

    @property
    def host_fits(self) -> bool | None:
        return None if self.host_memory_bytes is None else self.peak_host_bytes <= self.host_memory_bytes

    def verdict(self) -> str:
        """One line: fits, or which memory is short and by how much."""
        if self.fits is None:
            return "no GPU memory given: nothing to check against"
        problems = []
        if not self.gpu_fits:
            when = " to load the weights" if self.peak_gpu_bytes > self.total_bytes else ""
            problems.append(f"GPU needs {self.peak_gpu_bytes / GiB:.1f} GiB of {self.gpu_memory_bytes / GiB:.1f} GiB{when}")
        if self.host_fits is False:
            when = " to load the weights" if self.peak_host_bytes > self.host_bytes else ""
            problems.append(f"host RAM needs {self.peak_host_bytes / GiB:.1f} GiB of "
                            f"{self.host_memory_bytes / GiB:.1f} GiB{when}")
        return "fits" if not problems else "DOES NOT FIT: " + "; ".join(problems)

    @property
    def headroom_bytes(self) -> int | None:
        if self.gpu_memory_bytes is None:
            return None
        return self.gpu_memory_bytes - self.peak_gpu_bytes

    @property
    def model_state_bytes(self) -> int:
        return self.per_gpu["weights"] + self.per_gpu["gradients"] + self.per_gpu["optimizer_states"]

    def largest_category(self) -> str:
        """The category holding the most bytes: the first thing to attack when it does not fit."""
        return max(CATEGORIES, key=lambda c: self.per_gpu[c])

    def as_dict(self) -> dict:
        per_gpu = dict(self.per_gpu)
        per_gpu["total"] = self.total_bytes
        return {
            "source": self.source,
            "per_gpu": per_gpu,
            "per_host": dict(self.per_host),
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "host_memory_bytes": self.host_memory_bytes,
            "fits": self.fits,
            "gpu_fits": self.gpu_fits,
            "host_fits": self.host_fits,
            "headroom_bytes": self.headroom_bytes,
            "notes": dict(self.notes),
            "load": {"gpu_bytes": self.load_gpu_bytes, "host_bytes_per_node": self.load_host_bytes},
        }

    def table(self) -> str:
        """A readable per-GPU table in GiB."""
        rows = [f"{'category':<18}{'GiB per GPU':>14}"]
        for category in CATEGORIES:
            rows.append(f"{category:<18}{self.per_gpu[category] / GiB:>14.2f}")
        rows.append(f"{'total (peak)':<18}{self.total_bytes / GiB:>14.2f}")
        if self.load_gpu_bytes is not None:
            rows.append(f"{'load (peak)':<18}{self.load_gpu_bytes / GiB:>14.2f}   loading the weights; host RAM per "
                        f"node {(self.load_host_bytes or 0) / GiB:.2f} GiB")
        if self.gpu_memory_bytes is not None:
            verdict = "fits" if self.gpu_fits else "DOES NOT FIT"
            rows.append(f"{'GPU memory':<18}{self.gpu_memory_bytes / GiB:>14.2f}")
            rows.append(f"{'headroom':<18}{self.headroom_bytes / GiB:>14.2f}   -> {verdict}")
        for key, value in self.per_host.items():
            rows.append(f"host {key:<13}{value / GiB:>14.2f}")
        if self.host_memory_bytes is not None:
            verdict = "fits" if self.host_fits else "DOES NOT FIT"
            rows.append(f"{'host RAM':<18}{self.host_memory_bytes / GiB:>14.2f}   -> {verdict}")
        rows.extend(f"{key}: {note}" for key, note in self.notes.items())
        return "\n".join(rows)
