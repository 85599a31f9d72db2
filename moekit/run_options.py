"""The options of one training run besides the setup: declared once, with their defaults and checks.

``moekit train`` and ``moekit launch`` (cli.py), the per-rank script ``python -m moekit.train`` and
``launch()`` all read them from ``RunOptions``: the flags come from ``add_run_option_flags``, a
parsed command line becomes options with ``RunOptions.from_args``, and ``RunOptions.argv`` writes
them back as the flags a rank gets. Adding an option is one field here (plus its flag below).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, fields

from moekit.errors import MoekitError

#: Learning rates for real fine-tuning; tiny lesson models learn visibly with 1e-3 (full) to 1e-2 (LoRA).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "qlora": 2e-4}


class RunOptionsError(MoekitError):
    """A run option out of range; the message names the option and what it takes."""


@dataclass(frozen=True)
class RunOptions:
    """What a training run gets besides the setup (see ``moekit.train.train``)."""

    steps: int = 20  # optimizer steps to reach
    save_every: int = 0  # checkpoint every N steps; 0: only at the end
    data: str | os.PathLike | None = None  # a local .txt / .jsonl file; None: moekit's bundled text
    weights: str | os.PathLike | None = None  # a local Hugging Face model folder; None: seeded random weights
    lr: float | None = None  # None: DEFAULT_LR for the setup's method
    seed: int = 0

    def __post_init__(self) -> None:
        """The one check of a run's options (``moekit train``, ``moekit launch`` and ``train()`` use it)."""
        for name, minimum, meaning in (("steps", 1, "a positive number of optimizer steps"),
                                       ("save_every", 0, "0 (only at the end) or a positive number of steps"),
                                       ("seed", 0, "a whole number >= 0")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise RunOptionsError(f"{name} must be {meaning}, got {value!r}.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise RunOptionsError(f"the learning rate must be a finite positive number, got {self.lr!r}; e.g. 2e-4 for LoRA.")
        for name in ("data", "weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise RunOptionsError(f"{name} must be a path, got {value!r}.")

    def learning_rate(self, method: str) -> float:
        """The learning rate the run uses: ``lr``, or the default for the setup's method."""
        return DEFAULT_LR[method] if self.lr is None else self.lr

    def argv(self) -> list[str]:
        """The options as the flags ``python -m moekit.train`` reads (``add_run_option_flags``)."""
        args = ["--steps", str(self.steps), "--save-every", str(self.save_every), "--seed", str(self.seed)]
        if self.data is not None:
            args += ["--data", str(self.data)]
        if self.weights is not None:
            args += ["--weights", str(self.weights)]
        if self.lr is not None:
            args += ["--lr", repr(self.lr)]
        return args

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        """The options from a command line parsed with ``add_run_option_flags`` (checked here)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def finite_float(text: str) -> float:
    """A float flag that refuses nan and inf (argparse's float accepts both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def add_run_option_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--steps, --save-every, --data, --weights, --lr and --seed, with RunOptions' defaults."""
    d = RunOptions()
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps to reach (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=d.save_every,
                        help="checkpoint every N steps; 0: only at the end (default: %(default)s)")
    parser.add_argument("--data", default=d.data, help="a local .txt or .jsonl file (default: moekit's bundled text)")
    parser.add_argument("--weights", default=d.weights,
                        help="a local Hugging Face model folder (default: seeded random weights)")
    parser.add_argument("--lr", type=finite_float, default=d.lr,
                        help=f"learning rate (default: {DEFAULT_LR['lora']:g} LoRA, {DEFAULT_LR['full']:g} full)")
    parser.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
