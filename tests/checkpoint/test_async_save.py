"""Asynchronous checkpoints (``run.async_save``, pretrain/checkpoint/writer.py): the same files and losses as a
synchronous save, with either snapshot (``run.async_snapshot``: ``live``, CPU's default, and ``host_copy``),
exact resume from them, kill -9 while one is being written, a failed background write agreed by every rank. Real
two-stage pipeline runs (2 gloo ranks), folded into as few launches as possible."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from pretrain.checkpoint import rank_state_path

from helpers import SMALL_SHM, base_overrides, check_full_disk_stop, launch, losses, mount_tmpfs, one_error

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 6


def args(corpus, run_dir, *extra):
    """Two pipeline stages, dropout on (the RNG state matters), a save every 2 steps."""
    return [*base_overrides(corpus, run_dir), f"run.steps={STEPS}", "model.dropout=0.1", "parallel.pipeline=2",
            "run.save_interval=2", "run.keep_checkpoints=3", *extra]


def tensor_file_hashes(ckpt) -> dict[str, str]:
    """sha256 of DeepSpeed's tensor files of a checkpoint, from its marker."""
    files = json.loads((ckpt / "COMPLETE.json").read_text())["files"]
    return {name: record["sha256"] for name, record in files.items()
            if name.endswith(".pt") and not name.startswith("trainer_state")}


def same(a, b) -> bool:
    """Nested states equal, tensors bitwise (dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def trainer_state(ckpt, rank: int) -> dict:
    """A rank's memory slots, data offset and torch RNG state as saved. Python's and numpy's generators are left
    out: the trainer does not seed them (nothing in training draws from them), so they differ between runs."""
    state = torch.load(rank_state_path(ckpt, rank), weights_only=True)
    state["rng"] = {k: v for k, v in state["rng"].items() if k not in ("python", "numpy")}
    return state


def test_async_save_equals_sync_resumes_exactly_and_survives_kill_and_full_disk(corpus, tmp_path):
    """Five launches. (1) A synchronous run. (2) The same run asynchronous (a ``live`` snapshot, CPU's default),
    killed (-9) by its checkpoint writer in the middle of step 4's save, after training went on to steps 5 and 6
    with the save in flight. (3) Its restart, with the writer slowed so that step 5's optimizer update comes
    before step 4's files are written: it resumes from step 2's asynchronous checkpoint (the one before the
    half-written one), and every checkpoint it writes completes; losses of every step, and every tensor file and
    rank state of steps 4 and 6, are bitwise those of the synchronous run (the update waited for the live state to
    be written). (4) The asynchronous run with a ``host_copy`` snapshot on a disk that holds one checkpoint:
    step 2's checkpoint holds the synchronous run's bytes, step 4's background write fails, every rank stops at the
    same step with one error line, step 2 stays usable. (5) One process with a ``host_copy`` snapshot and a
    /dev/shm too small for it: the save fails with one line that says why."""
    from pretrain.checkpoint import validate
    from pretrain.faults import KILL_WHILE_WRITING_ENV, SLOW_WRITE_ENV

    sync = launch(2, args(corpus, tmp_path / "sync", "run.async_save=false"))
    assert sync.returncode == 0, sync.stderr[-4000:]

    run = tmp_path / "async"
    killed = launch(2, args(corpus, run), env_extra={KILL_WHILE_WRITING_ENV: "4"})
    assert killed.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step_00000002" / "COMPLETE.json").is_file()
    assert (ckpts / "step_00000004").is_dir() and not (ckpts / "step_00000004" / "COMPLETE.json").exists()
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]        # the loop trained on while step 4 was being written

    again = launch(2, args(corpus, run), env_extra={SLOW_WRITE_ENV: "3"})
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from" in again.stdout and "step_00000002" in again.stdout
    for step in (4, 6):
        validate(ckpts / f"step_{step:08d}")         # complete: marker, sizes, sha256 of every file
    waited = re.search(r"step_00000004 \(the optimizer update after it waited ([0-9.]+) s for its files\)",
                       again.stdout)
    assert waited and float(waited.group(1)) > 1.0, again.stdout[-3000:]    # most of the writer's 3 s delay
    a, b = losses(tmp_path / "sync"), losses(run)
    assert [a[s] for s in range(1, STEPS + 1)] == [b[s] for s in range(1, STEPS + 1)]     # bitwise
    for step in (4, 6):
        ckpt = f"checkpoints/step_{step:08d}"
        assert tensor_file_hashes(tmp_path / "sync" / ckpt) == tensor_file_hashes(run / ckpt), step  # same bytes
        assert all(same(trainer_state(tmp_path / "sync" / ckpt, r), trainer_state(run / ckpt, r)) for r in (0, 1))

    ckpt_bytes = sum(p.stat().st_size for p in (tmp_path / "sync" / "checkpoints" / "step_00000002").rglob("*")
                     if p.is_file())
    disk = tmp_path / "disk"
    assert mount_tmpfs(disk, int(ckpt_bytes * 1.5) + 64 * 1024), "mounting a size-limited tmpfs needs root"
    try:
        full = launch(2, args(corpus, disk / "run", "run.async_snapshot=host_copy"))
        assert full.returncode != 0 and "exitcode  : 1" in full.stderr, full.stderr[-4000:]
        check_full_disk_stop(full, disk / "run", a)
        first = "checkpoints/step_00000002"
        assert tensor_file_hashes(tmp_path / "sync" / first) == tensor_file_hashes(disk / "run" / first)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    shutil.rmtree(disk, ignore_errors=True)

    # shared memory (/dev/shm) too small for the host copy: the save fails with one line that says so, and how
    # to save without one
    no_shm = launch(1, [*base_overrides(corpus, tmp_path / "no-shm"), "run.steps=3", "run.save_interval=2",
                        "run.async_snapshot=host_copy"], prefix=SMALL_SHM)
    assert no_shm.returncode == 1, no_shm.stderr[-4000:]
    error = one_error(no_shm)
    assert all(s in error for s in ("step_00000002", "/dev/shm: No space left on device", "host copy",
                                    "run.async_save=false")), error
    assert not (tmp_path / "no-shm" / "checkpoints" / "step_00000002").exists()
