"""Process groups for a run: start (or a one-rank group for a plain call), teardown, DeepSpeed's CPU
shared-memory cleanup, a free port, the environment of the processes moekit starts, and a value reduced over every rank.

Every training path (``moekit.train``, ``moekit.measure_engine``, ``moekit.hf``) starts and ends
its process group here; torch and DeepSpeed are imported inside the functions, so the launcher and
the CLI can ask for a free port without loading them.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it), so two runs on one machine do not collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: ``subprocess.Popen`` arguments for a child in a process group of its own, in this session (Python 3.10 has
#: no ``process_group``: a new session there).
NEW_PROCESS_GROUP: dict = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


def launch_env() -> dict[str, str]:
    """This environment, with this Python's bin folder first, for every process moekit starts.

    ``deepspeed``/``torchrun`` are then the ones moekit uses, and so is ``ninja``: DeepSpeed's C++ ops are
    built by whichever ``ninja`` is first on PATH, and two versions (pip's and the system's) hash the
    build commands differently, so each would rebuild what the other built (about 2 minutes per op).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


SINGLE_RANK_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group, or make a one-rank group for a plain call; return (rank, world size).

    DeepSpeed picks the backend for the accelerator: NCCL on GPUs, gloo (or oneCCL) on the CPU. A
    one-rank group lives as long as the process (DeepSpeed caches its groups, so it cannot be taken
    down and made again between two ``train`` calls in a notebook); it is closed at exit.
    """
    import atexit

    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update({**SINGLE_RANK_ENV, "MASTER_PORT": str(free_port())})
        atexit.register(close_process_group)
    deepspeed.init_distributed(verbose=False)
    release_shm_allreduce_buffer()
    return dist.get_rank(), dist.get_world_size()


def shm_allreduce_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's CPU all-reduce keeps this rank's shared-memory workspace (about 69 MB)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{rank}"
    return Path("/dev/shm") / name


def release_shm_allreduce_buffer() -> None:
    """Unlink this rank's name for DeepSpeed's CPU all-reduce workspace once every rank has mapped it.

    On the CPU accelerator DeepSpeed creates one shared-memory file per rank and never unlinks it
    (``shm.cpp`` has ``shared_close`` but nothing calls it), so every run left ~69 MB per rank in
    ``/dev/shm``: a test suite's worth filled the RAM. The mappings stay valid after the unlink
    (POSIX keeps the memory until the last ``munmap``), so removing the name right after the
    barrier frees it at exit, even when a rank is killed. GPUs (NCCL) have no such buffer: nothing to do.
    """
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    dist.barrier()  # every rank has opened every other rank's buffer by now (shm_initialize waits for them)
    shm_allreduce_buffer_path(dist.get_rank()).unlink(missing_ok=True)  # absent without DeepSpeed's shm op


def close_process_group() -> None:
    """Leave the process group in step with the other ranks: a process exiting while its communication
    threads still run can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_ranks(value: float, op: str) -> float:
    """``value`` reduced over every rank: ``mean``, ``max`` or ``min`` (every rank gets the result)."""
    import torch
    import torch.distributed as dist

    sign = -1.0 if op == "min" else 1.0  # min(x) = -max(-x): gloo and NCCL both have MAX
    tensor = torch.tensor([sign * value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "mean" else dist.ReduceOp.MAX)
    return sign * float(tensor.item()) / (dist.get_world_size() if op == "mean" else 1)


def exit_now(code: int) -> None:
    """Exit without Python's interpreter teardown, after flushing output.

    Seen on the CPU with 2 ranks: a rank that finished cleanly (process group destroyed) can still
    abort during teardown with "terminate called without an active exception" (a C++ thread
    destroyed while joinable), turning a good run into exit code -6. All files are closed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
