"""The checkpoint writer: writes one checkpoint's files, hashes them, and has rank 0 seal it with the marker;
in the background while training goes on (``run.async_save``: a thread that coordinates, a process that does
the heavy work, :class:`WriterProcess`), or at once.

What it writes was taken on the main thread by ``save.start_save`` (for an asynchronous save as
``run.async_snapshot`` says, see ``snapshot.py``); from there every rank's writer runs the same protocol:

1. write this rank's files (DeepSpeed's shards, the per-rank state, the shard index; rank 0 the run's records):
   a host copy in the writer process; a ``live`` state in the writer's thread, which releases it once written
   (the next optimizer update waits for that: :meth:`CheckpointWriter.fence`);
2. agree on failures (a full disk on one rank fails the save on every rank);
3. hash the checkpoint's files, each rank its share (``format.share_of``), and gather the hashes;
4. rank 0 writes ``COMPLETE.json`` (atomic rename) only now that every rank's files are written and hashed, or
   removes the half-written checkpoint after a failure; every rank learns rank 0's outcome.

Every collective of the writer goes over its own gloo process group, created once at start-up: a background
thread must never issue collectives on the default group while the main thread trains on it (two threads'
collectives on one group would interleave differently on different ranks and deadlock or mix their data).
The main thread learns that a save is over at a step boundary, by a one-number all-reduce on the default group
that every rank issues at the same step (:meth:`CheckpointWriter.poll`), so every rank sees the outcome, and a
failure is raised, at the same step. One save is in flight at a time.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing

from .. import faults
from ..distributed import STOP_SIGNALS, any_rank, first_problem
from .format import listed_files, sha256_file, share_of
from .safe_load import write_failure
from .snapshot import save_file

#: The writer process's CPU priority (a nice value; training runs at the trainer's own, usually 0).
WRITER_NICE = 10


def _lower_this_threads_priority() -> None:
    """The calling thread (not its process) at WRITER_NICE above the trainer's priority (Linux: a thread's nice
    value is its own), so the writer's thread yields the cores to training."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
    except OSError:                     # not permitted here: it runs at the trainer's priority
        pass


class WriteFailed(Exception):
    """A write or hash in the writer process failed; the message is the one-line cause (path and reason)."""


def _die_with_parent() -> None:
    """The writer process is killed with the trainer (Linux: PR_SET_PDEATHSIG), so a trainer killed with
    -9 leaves no orphan that could go on writing into a checkpoint directory the next start reuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)                    # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:                            # the trainer died before that took effect
        os._exit(1)


def _serve(conn) -> None:
    """The writer process's loop: run each (function, args) it is sent, answer (True, result) or (False, the
    one-line failure); None ends it."""
    _die_with_parent()
    # A stop signal is for the trainer, which saves and exits; it reaches this process too (SLURM signals every
    # process of the job step, a Ctrl-C the whole process group), and by default would kill it mid-save. Its
    # lifetime is its trainer's (above).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)      # blocked since its start (WriterProcess)
    os.nice(WRITER_NICE)
    while True:
        try:
            request = conn.recv()
        except EOFError:            # the trainer has exited
            return
        if request is None:
            return
        function, args = request
        try:
            conn.send((True, function(*args)))
        except Exception as err:
            path = next((a for a in reversed(args) if isinstance(a, (str, os.PathLike))), "checkpoint")
            conn.send((False, write_failure(getattr(err, "filename", None) or path, err)))
        del request, args


class WriterProcess:
    """A process of its own that does the writer's heavy work (``torch.save`` of each file, hashing), so it
    neither holds the trainer's GIL (torch.save keeps it while it writes a tensor's bytes, which would stall
    the training loop's Python between kernels) nor competes with training at the same priority. Tensors reach
    it through shared memory (``snapshot.to_host``, one block per file): nothing is copied on the way. Started
    once, at start-up (spawn: a fresh interpreter, no state inherited from the trainer's threads)."""

    def __init__(self):
        context = torch.multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="checkpoint-writer", daemon=True)
        # The stop signals are blocked while it starts: the process inherits the mask, so a signal that arrives
        # during its seconds of imports, before its loop ignores them, cannot kill it (SLURM signals every process
        # of the job step); here they stay pending and reach the trainer's handler once unblocked.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        child.close()
        atexit.register(self.close)     # before multiprocessing's own exit handler, which could not end it

    def close(self, timeout: float = 10.0) -> None:
        """End the process: it finishes the call in hand (if any) within ``timeout`` seconds, else it is killed
        (an unfinished checkpoint has no marker and is never used). It ignores the stop signals, so
        multiprocessing's exit handler, which ends daemon processes with SIGTERM, would wait for it forever."""
        if not self.process.is_alive():
            return
        try:
            self.conn.send(None)
        except OSError:                 # the pipe is gone: so is the process, or it soon will be
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def call(self, function, *args):
        """``function(*args)`` in the writer process (not a collective), waited for: the calling thread sleeps
        meanwhile; its failure raises WriteFailed."""
        self.conn.send((function, args))
        ok, value = self.conn.recv()
        if not ok:
            raise WriteFailed(value)
        return value


@dataclass
class SaveJob:
    """One rank's part of one checkpoint, as taken on the main thread."""
    ckpt: Path
    step: int
    files: list[tuple[str, object]]                  # torch.save'd: DeepSpeed's shards, the per-rank state
    texts: list[tuple[Path, str]] = field(default_factory=list)   # the shard index; rank 0: run records
    tokenizer: Path | None = None                    # rank 0: copied into the checkpoint
    seal: Callable[[list[dict]], None] | None = None  # rank 0: writes the marker from every rank's hashes
    live: bool = False                               # files hold live tensors (``snapshot.live_state``)
    released: threading.Event = field(default_factory=threading.Event)   # set once no file reads live state
    update_waited: float = 0.0                       # seconds the next optimizer update waited for ``released``


@dataclass
class SaveOutcome:
    """A finished save, the same on every rank: its directory and step, and the agreed failure (None: sealed)."""
    ckpt: Path
    step: int
    failure: str | None
    update_waited: float = 0.0      # this rank's next optimizer update waited so long for a live state's files


def _hash_share(ckpt: Path, rank: int, world: int) -> dict[str, dict]:
    paths = listed_files(ckpt)
    sizes = [p.stat().st_size for p in paths]
    return {str(paths[i].relative_to(ckpt)): {"size": sizes[i], "sha256": sha256_file(paths[i])}
            for i in share_of(paths, sizes, rank, world)}


class CheckpointWriter:
    """Writes checkpoints for one rank, one at a time. Construct on every rank at the same point (it creates the
    writer's process group, a collective)."""

    def __init__(self, asynchronous: bool):
        self.asynchronous = asynchronous
        self.group = dist.new_group(backend="gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.polls = 0                      # step boundaries the main thread has passed with this save in flight
        self._job: SaveJob | None = None
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._process = WriterProcess() if asynchronous else None

    def _call(self, function, *args):
        """``function(*args)`` in the writer process (asynchronous) or here; a failure raises WriteFailed."""
        if self._process is None:
            return function(*args)
        return self._process.call(function, *args)

    def fence(self) -> None:
        """Main thread, before an optimizer update (``TrainingEngine.before_update``): wait until the save in flight
        no longer reads the live training state (at once unless it is a ``live`` snapshot still being written)."""
        job = self._job
        if job is not None and not job.released.is_set():
            began = time.perf_counter()
            job.released.wait()
            job.update_waited += time.perf_counter() - began

    def submit(self, job: SaveJob) -> None:
        """Start writing ``job`` (the previous save must have been waited for): in the background, or at once."""
        assert self._job is None, "one checkpoint save in flight at a time"
        if not job.live:
            job.released.set()
        self._job, self.polls = job, 0
        if self.asynchronous:
            self._thread = threading.Thread(target=self._run, args=(job,), name=f"checkpoint-{job.step}",
                                            daemon=True)
            self._thread.start()
        else:
            self._run(job)

    def poll(self) -> SaveOutcome | None:
        """Collective on the default group (main thread, at a step boundary, every rank alike): the outcome once
        every rank's writer is done, else None (and nothing waits)."""
        if self._job is None:
            return None
        self.polls += 1
        if any_rank(self._thread is not None and self._thread.is_alive()):
            return None
        return self.wait()

    def wait(self) -> SaveOutcome | None:
        """Block until the save in flight (if any) is over; its outcome, the same on every rank."""
        if self._job is None:
            return None
        if self._thread is not None:
            self._thread.join()
        job, failure = self._job, self._failure
        self._job = self._thread = self._failure = None
        return SaveOutcome(job.ckpt, job.step, failure, job.update_waited)

    # ------------------------------------------------------------------ the writer's side
    def _training_went_on(self) -> bool:
        return not self.asynchronous or self.polls >= 2

    def _run(self, job: SaveJob) -> None:
        if self.asynchronous:
            _lower_this_threads_priority()
        failure = None
        try:
            try:
                faults.slow_write()
                while job.files:
                    path, state = job.files.pop(0)  # written, then let go: a host copy shrinks as it goes
                    if job.live:                    # here: only this process can read the live tensors
                        save_file(state, path)
                    else:
                        self._call(save_file, state, path)
                    del state
            finally:                                # written or failed, the next optimizer update may go on
                job.released.set()
            faults.kill_while_writing(job.step, self._training_went_on)
            for path, text in job.texts:
                path.write_text(text)
            if job.tokenizer is not None:
                shutil.copytree(job.tokenizer, job.ckpt / "tokenizer", dirs_exist_ok=True)
        except WriteFailed as err:
            failure = str(err)
        except Exception as err:        # whatever it is, every rank must still reach the agreement below
            failure = write_failure(getattr(err, "filename", None) or job.ckpt, err)
        job.files.clear()
        failure = first_problem(failure, group=self.group)
        if failure is None:
            faults.kill_during_save(job.step)   # tests: a real SIGKILL after the shards, before the marker
            try:
                share, problem = self._call(_hash_share, job.ckpt, self.rank, self.world), None
            except WriteFailed as err:
                share, problem = {}, str(err)
            except OSError as err:
                share, problem = {}, write_failure(job.ckpt, err)
            shares: list = [None] * self.world
            dist.all_gather_object(shares, (problem, share), group=self.group)
            failure = next((p for p, _ in shares if p), None)
            if failure is None and job.seal is not None:
                try:
                    job.seal([s for _, s in shares])
                except Exception as err:
                    failure = write_failure(job.ckpt, err)
        if failure is not None and self.rank == 0:
            shutil.rmtree(job.ckpt, ignore_errors=True)
        self._failure = first_problem(failure, group=self.group)   # rank 0's marker outcome reaches every rank
