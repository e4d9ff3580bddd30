"""Fault injection for tests: every hook that lets a test break a real run on purpose, in one place.

Production code asks one small question at the point where a fault can be injected; with no ``LAMEMO_FAULT_*``
variable set every answer is "no", so a normal run never takes a fault path. The variables are read when asked
(not at import), so a test sets them in the environment of the processes it launches.

    LAMEMO_FAULT_KILL_DURING_SAVE=S   ``kill_during_save(S)``: the process SIGKILLs itself while saving the
                                      checkpoint of step S, after every shard is written and before the marker
                                      (``checkpoint/writer.py``). A real crash mid-save: the checkpoint must stay
                                      incomplete and resume must fall back to the previous one.
                                      Used by ``tests/checkpoint/test_checkpoint.py`` (kill during save).
    LAMEMO_FAULT_KILL_WHILE_WRITING=S ``kill_while_writing(S, went_on)``: the checkpoint writer of step S
                                      SIGKILLs its process after its tensor files, before the hashes and the
                                      marker, once the training loop has gone on by two steps with the save in
                                      flight (at once for a synchronous save): a crash in the middle of an
                                      asynchronous save (``checkpoint/writer.py``). The previous checkpoint
                                      must stay usable. Used by ``tests/checkpoint/test_async_save.py``.
    LAMEMO_FAULT_SLOW_WRITE=SECONDS   ``slow_write()``: the checkpoint writer waits that long before writing a
                                      save's files, so with a ``live`` snapshot the next optimizer update comes
                                      while they are unwritten and must wait for them (``checkpoint/writer.py``).
                                      Used by ``tests/checkpoint/test_async_save.py``.
    LAMEMO_FAULT_NAN_STEPS=3,4        ``nan_gradient_steps()``: the gradients are filled with NaN on those
                                      optimizer steps of the process (1-based, counted by the step guard,
                                      ``divergence.py``), so the divergence guard skips them and stops the run.
                                      Used by ``tests/trainer/test_reliability.py`` (divergence stop).
    LAMEMO_FAULT_KILL_DURING_EXPORT=M ``kill_during_export(M)``: the export SIGKILLs itself at moment M, one of
                                      ``weights`` (model.safetensors written), ``record`` (export.json and
                                      tokenizer/ written, config.json not), ``staged`` (everything written, not
                                      yet moved into place), ``swapped`` (moved into place, the old export or
                                      the staging directory not yet removed) (``checkpoint/export.py``).
                                      Used by ``tests/checkpoint/test_checkpoint.py`` (atomic export).
    LAMEMO_FAULT_DROP_MEMORY=1        ``drop_memory_on_resume(engine)``: a resume on another layout empties the
                                      memory it has just resharded (what resuming did before the memory was
                                      resharded), so a test can show that the memory matters.
                                      Used by ``tests/checkpoint/test_checkpoint.py`` (resharded resume).

See docs/reliability.md ("Fault injection").
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable

KILL_DURING_SAVE_ENV = "LAMEMO_FAULT_KILL_DURING_SAVE"
KILL_WHILE_WRITING_ENV = "LAMEMO_FAULT_KILL_WHILE_WRITING"
SLOW_WRITE_ENV = "LAMEMO_FAULT_SLOW_WRITE"
NAN_STEPS_ENV = "LAMEMO_FAULT_NAN_STEPS"
KILL_DURING_EXPORT_ENV = "LAMEMO_FAULT_KILL_DURING_EXPORT"
EXPORT_MOMENTS = ("weights", "record", "staged", "swapped")
DROP_MEMORY_ENV = "LAMEMO_FAULT_DROP_MEMORY"


def kill_during_save(step: int) -> None:
    """SIGKILL this process if a test asked for a crash while saving the checkpoint of ``step``."""
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_while_writing(step: int, went_on: Callable[[], bool]) -> None:
    """SIGKILL this process if a test asked for a crash while the checkpoint of ``step`` is being written,
    once ``went_on()`` says training has moved past the save."""
    if os.environ.get(KILL_WHILE_WRITING_ENV) == str(step):
        while not went_on():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


def slow_write() -> None:
    """Wait before a checkpoint writer writes its files, if a test asked for it."""
    time.sleep(float(os.environ.get(SLOW_WRITE_ENV, "0")))


def nan_gradient_steps() -> set[int]:
    """The optimizer steps (1-based, of this process) whose gradients a test wants filled with NaN."""
    return {int(x) for x in os.environ.get(NAN_STEPS_ENV, "").split(",") if x.strip()}


def kill_during_export(moment: str) -> None:
    """SIGKILL this process if a test asked for a crash at this moment of an export (``EXPORT_MOMENTS``)."""
    if os.environ.get(KILL_DURING_EXPORT_ENV) == moment:
        os.kill(os.getpid(), signal.SIGKILL)


def drop_memory_on_resume(engine) -> None:
    """Empty the engine's memory if a test asked for a resharded resume without it."""
    if os.environ.get(DROP_MEMORY_ENV) == "1":
        engine.reset_memory()
