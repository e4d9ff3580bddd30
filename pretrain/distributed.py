"""Process-group set-up: one process directly, or N under torchrun / srun (env:// rendezvous)."""
from __future__ import annotations

import os
import signal
import socket

import torch
import torch.distributed as dist


#: The signals that ask a run to save a checkpoint and stop (a scheduler's USR1 before its time limit, TERM, a
#: first Ctrl-C): the trainer handles them (``run_errors.StopSignal``); its helper processes ignore them.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE, or SLURM_NTASKS under srun without torchrun),
    read before any process group exists: the layout is checked against it before anything is built."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed from the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT);
    a bare single process gets a private 127.0.0.1 rendezvous so DeepSpeed and megatron-core work unchanged.
    SLURM without torchrun: SLURM_PROCID / SLURM_NTASKS are used when RANK is absent."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ \
            and int(os.environ["SLURM_NTASKS"]) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def first_problem(problem: str | None, *, name_rank: bool = False, group=None) -> str | None:
    """Collective over every rank (each passes what it found, or None): the problem of the lowest rank that
    found one, the same on every rank, so all stop together and none waits for another in vain; None when no
    rank found one. ``name_rank``: prefix the message with that rank when not every rank saw a problem.
    ``group``: a process group spanning every rank other than the default one (the checkpoint writer's).
    Without a process group (or with one process) it is ``problem`` itself."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return problem
    everyone: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, problem, group=group)
    found = [(rank, p) for rank, p in enumerate(everyone) if p]
    if not found:
        return None
    rank, message = found[0]
    return f"rank {rank}: {message}" if name_rank and len(found) < len(everyone) else message


def any_rank(flag: bool) -> bool:
    """Collective over every rank (a one-number all-reduce, on the GPU under NCCL): whether ``flag`` is True on
    at least one rank."""
    value = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
