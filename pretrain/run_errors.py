"""How a run fails: the user's errors (``USER_ERRORS``: one ``error:`` line, exit 2); after start-up one line for
the user naming where it can continue from, the traceback in ``<run.dir>/error-rank<R>.log``; and the stop
signals that end a run cleanly with a checkpoint."""
from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

from lamemo_parallel import ConfigError

from .checkpoint import CheckpointError, complete_checkpoints
from .config import TrainConfigError
from .data.errors import DataError
from .distributed import STOP_SIGNALS, any_rank

#: What is the user's to fix (config, layout, data, checkpoint), reported as one ``error:`` line with exit code 2
#: (docs/reliability.md): the one list, used by start-up checks and the entry points.
USER_ERRORS = (TrainConfigError, DataError, ConfigError, CheckpointError)


class RunFailed(RuntimeError):
    """A failure after start-up, already worded for the user (names the newest complete checkpoint).
    ``exit_code``: 3 divergence, 1 anything else."""

    def __init__(self, message: str, exit_code: int = 1, every_rank: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.every_rank = every_rank     # False: every rank knows it (a collective decision), rank 0 says it


def newest_checkpoint_note(run_dir: Path) -> str:
    """Where the run can continue from. Not collective (a failing rank may be alone): the newest checkpoint with
    a completion marker; resuming verifies it and falls back past a damaged one."""
    try:
        found = complete_checkpoints(run_dir)
    except OSError:                        # the note must never hide the original failure
        found = []
    ckpt = found[0] if found else None
    if ckpt is None:
        return f"no complete checkpoint in {run_dir / 'checkpoints'}"
    return f"newest complete checkpoint: {ckpt} (the same command resumes from it)"


def failure(err: BaseException, what: str, rank: int, run_dir: Path) -> RunFailed:
    """An unexpected exception as one line; its traceback goes to ``<run.dir>/error-rank<R>.log``."""
    trace = run_dir / f"error-rank{rank}.log"
    try:
        trace.write_text(traceback.format_exc())
        where = f"traceback in {trace}"
    except OSError:
        where = "traceback not saved"
    return RunFailed(f"{what} on rank {rank}: {type(err).__name__}: {' '.join(str(err).split())[:500]} "
                     f"({where}); {newest_checkpoint_note(run_dir)}")


class StopSignal:
    """SIGUSR1 / SIGTERM / a first Ctrl-C (SIGINT) ask for a checkpoint and a clean exit (so a scheduler can
    requeue the job); a second Ctrl-C stops at once. Ranks agree on stopping through a tiny all-reduce after
    each step."""

    def __init__(self):
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            print("interrupt: saving a checkpoint at the end of this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.received = signum

    def agreed(self) -> bool:
        stopping = any_rank(self.received is not None)
        if stopping:
            # Stopping is agreed: a later SIGUSR1 / SIGTERM changes nothing, and one arrives on SLURM (the step's
            # processes are signalled directly and pretrain.launch forwards the same signal). Ignored, not handled:
            # at interpreter shutdown Python restores the default actions, which would kill the trainer (-10).
            for sig in (signal.SIGUSR1, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        return stopping
