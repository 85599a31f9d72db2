"""The exact command line for a run: ``deepspeed`` on one node, a hostfile for several, ``torchrun``, and
``accelerate launch``.

``launch(setup)`` writes nothing and runs nothing: it returns a ``LaunchPlan`` holding the files a run
needs (the setup, the DeepSpeed config, accelerate's config, a hostfile for several nodes) and every command as an
argument list. ``plan.write()`` writes the files; ``plan.commands()`` gives the shell lines, each
argument quoted with ``shlex`` so paths with spaces survive copy and paste; ``run_plan(plan)`` writes
the files and runs the DeepSpeed command after a last check that ``moekit.estimate`` says the setup
fits the GPUs (``force=True`` skips it). Every rank runs ``python -m moekit.train`` (see train.py).

On a machine without GPUs the same ``deepspeed --num_gpus N`` command starts N CPU processes
(DeepSpeed's CPU accelerator with gloo), which is how the lessons and tests run it.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from moekit.distributed import free_port, launch_env  # noqa: F401 (re-exported)
from moekit.errors import MoekitError
from moekit.run_options import RunOptions
from moekit.training_setup import TrainingSetup
from moekit.units import GiB

DEFAULT_MASTER_PORT = 29500


TRAIN_MODULE = "moekit.train"


class LaunchError(MoekitError):
    """A launch that would fail or does not fit; the message says what to change."""


#: What the training script gets besides the setup; one declaration for cli, train and launch.
TrainArgs = RunOptions


@dataclass
class LaunchPlan:
    """Files to write and commands to run for one training run."""

    setup: TrainingSetup
    run_dir: Path
    hosts: list[str]
    master_addr: str
    master_port: int
    train_args: RunOptions
    ds_config: dict
    fit_note: str = ""
    fits: bool | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = {"setup": self.run_dir / "setup.json", "ds_config": self.run_dir / "ds_config.json",
                      "accelerate": self.run_dir / "accelerate.yaml"}
        if self.multi_node:
            self.files["hostfile"] = self.run_dir / "hostfile"

    @property
    def multi_node(self) -> bool:
        return self.setup.num_nodes > 1

    def script_argv(self) -> list[str]:
        """The arguments every rank's ``python -m moekit.train`` gets."""
        return [
            "--setup-json", str(self.files["setup"]),
            "--ds-config", str(self.files["ds_config"]),
            "--output-dir", str(self.run_dir),
            *self.train_args.argv(),
        ]

    def deepspeed_argv(self) -> list[str]:
        """``deepspeed`` for one node, or with the hostfile for several (it starts the other nodes over ssh)."""
        argv = ["deepspeed"]
        if self.multi_node:
            argv += ["--hostfile", str(self.files["hostfile"]), "--num_nodes", str(self.setup.num_nodes),
                     "--master_addr", self.master_addr]
        argv += ["--num_gpus", str(self.setup.gpus_per_node), "--master_port", str(self.master_port)]
        return argv + ["--module", TRAIN_MODULE, *self.script_argv()]

    def torchrun_argvs(self) -> list[list[str]]:
        """The torchrun equivalent: one command, or one per node (each with its --node_rank)."""
        if not self.multi_node:
            return [["torchrun", "--standalone", "--nproc_per_node", str(self.setup.gpus_per_node),
                     "-m", TRAIN_MODULE, *self.script_argv()]]
        return [
            ["torchrun", "--nnodes", str(self.setup.num_nodes), "--nproc_per_node", str(self.setup.gpus_per_node),
             "--node_rank", str(node), "--master_addr", self.master_addr, "--master_port", str(self.master_port),
             "-m", TRAIN_MODULE, *self.script_argv()]
            for node in range(self.setup.num_nodes)
        ]

    def accelerate_argvs(self) -> list[list[str]]:
        """``accelerate launch`` with the run's accelerate.yaml: one command, or one per node (with --machine_rank)."""
        from moekit.export import accelerate_argv

        script = ["--module", TRAIN_MODULE, *self.script_argv()]
        ranks = range(self.setup.num_nodes) if self.multi_node else [None]
        return [accelerate_argv(self.files["accelerate"], script, machine_rank=rank) for rank in ranks]

    def hostfile_text(self) -> str:
        """DeepSpeed's hostfile: one ``host slots=N`` line per node."""
        return "".join(f"{host} slots={self.setup.gpus_per_node}\n" for host in self.hosts)

    def commands(self) -> dict[str, list[str]]:
        """Shell lines, every argument quoted: {'deepspeed': [line], 'torchrun': [line per node]}."""
        return {"deepspeed": [shlex.join(self.deepspeed_argv())], "torchrun": [shlex.join(a) for a in self.torchrun_argvs()],
                "accelerate": [shlex.join(a) for a in self.accelerate_argvs()]}

    def write(self) -> dict[str, Path]:
        """Write the setup, the DeepSpeed config and (several nodes) the hostfile into run_dir."""
        from moekit.checkpoints import check_run_folder, save_setup

        check_run_folder(self.run_dir, self.setup, resume=True)  # never overwrite another run's setup
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_setup(self.setup, self.files["setup"])
        self.files["ds_config"].write_text(json.dumps(self.ds_config, indent=2) + "\n")
        if self.multi_node:
            self.files["hostfile"].write_text(self.hostfile_text())
        from moekit.export import accelerate_config

        accelerate_config(self.setup, self.files["ds_config"], main_process_ip=self.master_addr,
                          main_process_port=self.master_port).to_yaml_file(str(self.files["accelerate"]))
        return dict(self.files)

    def describe(self) -> str:
        """What ``moekit launch --dry-run`` prints."""
        lines = [f"# {self.setup.describe()}"]
        if self.fit_note:
            lines.append(f"# {self.fit_note}")
        lines.append(f"# files: {', '.join(shlex.quote(str(p)) for p in self.files.values())}")
        if self.multi_node:
            lines.append("# hostfile:")
            lines += [f"#   {line}" for line in self.hostfile_text().splitlines()]
        lines.append("# DeepSpeed launcher (run on the first node; it reaches the others over ssh):")
        lines += self.commands()["deepspeed"]
        lines.append("# or torchrun" + (", one command on each node:" if self.multi_node else ":"))
        lines += self.commands()["torchrun"]
        lines.append("# or accelerate launch" + (", one command on each node:" if self.multi_node else ":"))
        lines += self.commands()["accelerate"]
        return "\n".join(lines)


def launch(
    setup: TrainingSetup,
    *,
    run_dir: str | Path = "runs/moekit",
    hosts: list[str] | None = None,
    master_addr: str | None = None,
    master_port: int = DEFAULT_MASTER_PORT,
    train_args: RunOptions | None = None,
    preset: str | None = None,
    check_fit: bool = True,
) -> LaunchPlan:
    """The plan (files and commands) for a run of this setup; nothing is written or started."""
    from moekit.train import training_config
    from moekit.zero import ds_config

    hosts = check_hosts(setup, hosts, master_addr, master_port)
    train_args = train_args or RunOptions()
    config = training_config(setup, train_args.learning_rate(setup.method), ds_config(setup, preset))
    plan = LaunchPlan(setup, Path(run_dir), hosts, master_addr or hosts[0], master_port, train_args, config)
    if check_fit:
        plan.fits, plan.fit_note = fit_verdict(setup)
    return plan


def check_hosts(setup: TrainingSetup, hosts: list[str] | None, master_addr: str | None = None,
                master_port: int = DEFAULT_MASTER_PORT) -> list[str]:
    """The hosts, one per node (default node1, node2, ...), once their names and the master's are checked."""
    if not isinstance(setup, TrainingSetup):
        raise LaunchError(f"launch takes a TrainingSetup, got {type(setup).__name__}; e.g. launch(TrainingSetup(model='tiny')).")
    hosts = list(hosts) if hosts else [f"node{i + 1}" for i in range(setup.num_nodes)]
    for host in hosts + ([master_addr] if master_addr is not None else []):
        check_hostname(host)
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"hosts repeat a name ({', '.join(hosts)}); give each node once.")
    if len(hosts) != setup.num_nodes:
        raise LaunchError(f"{len(hosts)} hosts given ({', '.join(hosts)}) for a setup of {setup.num_nodes} nodes; give one host per node.")
    if not isinstance(master_port, int) or isinstance(master_port, bool) or not 0 < master_port < 65536:
        raise LaunchError(f"master_port must be a TCP port (1-65535), got {master_port}.")
    return hosts


#: One DNS label (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def check_hostname(host: object) -> str:
    """A host name (RFC 1123) or an IP address, else LaunchError: hosts go verbatim into DeepSpeed's hostfile,
    which its launcher hands to ssh/pdsh, so ``;``, ``$(...)`` or spaces must never reach it."""
    if isinstance(host, str):
        try:
            ipaddress.ip_address(host)
            return host
        except ValueError:
            pass
        labels = host.removesuffix(".").split(".")
        if 0 < len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels):
            return host
    raise LaunchError(
        f"{host!r} is not a host name or IP address; use names like node1 or gpu-01.example.org "
        "(letters, digits, '-' and '.'), one per node, comma-separated."
    )


def fit_verdict(setup: TrainingSetup) -> tuple[bool | None, str]:
    """(fits, one-line note) from ``moekit.estimate``; (None, note) where no estimate is available."""
    try:
        from moekit.estimate import estimate
    except ImportError:  # estimate.py ships with moekit; a partial install may lack it
        return None, "no memory estimate available (moekit.estimate missing): the fit check is skipped"
    breakdown = estimate(setup)
    note = (
        f"estimate: {breakdown.total_bytes / GiB:.1f} GiB per GPU of {setup.gpu_memory_gb:.4g} GB -> {breakdown.verdict()}"
        f" (largest: {breakdown.largest_category()})"
    )
    return breakdown.fits, note


def run_plan(plan: LaunchPlan, *, force: bool = False, launcher: str = "deepspeed") -> int:
    """Write the files and run the plan's command here (the first node); refuse a setup that will not fit.

    Returns the launcher's exit code.
    """
    if plan.fits is False and not force:
        raise LaunchError(
            f"refusing to launch: {plan.fit_note}. Change the setup (`moekit plan` lists setups that fit) "
            "or pass force=True (--force) if you know better than the estimate."
        )
    if launcher not in ("deepspeed", "torchrun"):
        raise LaunchError(f"launcher must be 'deepspeed' or 'torchrun', got '{launcher}'.")
    if launcher == "torchrun" and plan.multi_node:
        raise LaunchError("torchrun starts one node at a time: run the printed command on each node (moekit launch --dry-run).")
    plan.write()
    argv = plan.deepspeed_argv() if launcher == "deepspeed" else plan.torchrun_argvs()[0]
    return subprocess.call(argv, env=launch_env())


