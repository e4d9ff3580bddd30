"""Process set-up before training: the device and CPU threads, megatron-core's process groups, the run
directory's lock and reuse rules, start-up checks every rank agrees on, and ``--dry-run``."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import TrainConfig, TrainConfigError
from .data.mixture import build_streams, mixture_report
from .distributed import launch_world_size
from .layout import Layout, resolve_layout
from .preflight import agree, check_data, check_memory, dry_run_report, estimate_memory
from .run_errors import USER_ERRORS
from .run_lock import RunLockError, has_previous_run, move_previous_run_aside
from .tracking import TrackingError


def log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def resolve_device(config: TrainConfig) -> torch.device:
    wanted = config.run.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise TrainConfigError("run.device=cuda but no GPU is visible")
    return torch.device("cuda" if (wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())) else "cpu")


def set_cpu_threads(device: torch.device) -> None:
    """One process per core share on CPU: oversubscribed OpenMP threads make every op wait for a
    descheduled thread (measured: 200x slower steps on 2 cores). OMP_NUM_THREADS, when set, wins."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def init_model_parallel(layout: Layout) -> int:
    """megatron-core's process groups (tensor, pipeline, data); returns this rank's data-parallel rank."""
    if layout.tensor == 1 and layout.pipeline == 1:
        return dist.get_rank()
    from megatron.core import parallel_state   # costly: only model-parallel layouts load megatron-core
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=layout.tensor,
                                                 pipeline_model_parallel_size=layout.pipeline)
    return parallel_state.get_data_parallel_rank()


def claim_run_dir(config: TrainConfig, run_dir, lock) -> None:
    """Rank 0: take the run directory's lock and check the reuse rules (run.resume=never / run.overwrite). The
    previous run is moved aside later (``replace_previous_run``), once every start-up check has passed."""
    try:
        lock.acquire(log=log)
    except OSError as err:
        raise TrainConfigError(f"run.dir={run_dir} cannot be used as the run directory ({err.strerror}: "
                               f"{err.filename})") from None
    if config.run.resume != "never":
        return
    previous = has_previous_run(run_dir)
    if not previous:
        return
    if not config.run.overwrite:
        raise TrainConfigError(f"run.dir={run_dir} already holds a run ({', '.join(previous)}) and "
                               f"run.resume=never: set run.overwrite=true to move it aside and start fresh, "
                               f"run.resume=auto to continue it, or choose another run.dir")


def replace_previous_run(config: TrainConfig, run_dir) -> None:
    """Rank 0, after the start was accepted: with run.resume=never run.overwrite=true, move the previous run
    aside (a start refused before this point leaves the run directory as it was)."""
    if config.run.resume == "never" and config.run.overwrite and has_previous_run(run_dir):
        moved = move_previous_run_aside(run_dir)
        log(f"run.overwrite: moved the previous run in {run_dir} to {moved}")


def checked(action, *args, **kwargs):
    """Run a start-up check on every rank; a problem on any rank stops all of them with one message."""
    result, problem = None, None
    try:
        result = action(*args, **kwargs)
    except (*USER_ERRORS, RunLockError, TrackingError, OSError) as err:
        problem = str(err)
    agree(problem)
    return result


def dry_run(config: TrainConfig) -> int:
    """--dry-run: every start-up check and the report, no process group, no engine, nothing written."""
    device = resolve_device(config)
    layout = resolve_layout(config, launch_world_size(), cuda=device.type == "cuda")
    data = check_data(config, verify_checksums=False)
    streams = build_streams(data.train, config.data, dp_size=layout.data, dp_rank=0)
    estimate = estimate_memory(config, layout, cuda=device.type == "cuda")
    if int(os.environ.get("RANK", "0")) == 0:
        print(dry_run_report(config, layout, estimate, streams.steps_per_epoch, device), flush=True)
        if isinstance(data.train, list):
            print(mixture_report(streams, config.run.steps), flush=True)
    check_memory(config, layout, device)
    return 0
