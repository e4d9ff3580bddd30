"""``torchrun`` that lets the trainers finish a clean stop: ``python -m pretrain.launch [torchrun args] -m pretrain.train ...``

Plain torchrun answers SIGTERM by signalling its workers, giving them ``--shutdown-timeout`` seconds (30 by
default) and then raising, so the job exits 1 with a traceback even when every trainer saved a checkpoint and
exited 0 (and a save that takes longer than the timeout is killed half-way). This launcher is torchrun with one
change: the first SIGTERM (or SIGUSR1) is forwarded to the trainers and the agent keeps waiting for them; the
trainers save at the step they agree on and exit 0 (pretrain/run_errors.py, StopSignal), so the job exits 0. A second
SIGTERM, or SIGINT, falls back to torchrun's own shutdown. A trainer that fails ends the job with its exit code
and one line instead of torchrun's traceback (the trainer's own ``error:`` line says what happened; for a refusal at
start-up, exit code 2, that line is the only one). Every argument is torchrun's.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import psutil
from torch.distributed.elastic.multiprocessing import api
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _children() -> list[int]:
    return [child.pid for child in psutil.Process().children(recursive=False)]


def install() -> None:
    """Replace torch.distributed.elastic's signal handler (it looks the module-level name up when it starts
    the workers) by one that forwards the first SIGTERM / SIGUSR1."""
    original = api._terminate_process_handler
    received: set[int] = set()

    def handler(signum, frame):
        if signum in FORWARDED and signum not in received:
            received.add(signum)
            pids = _children()
            print(f"[pretrain.launch] {signal.Signals(signum).name}: asking {len(pids)} trainer(s) to save a "
                  f"checkpoint and exit (send it again to stop them at once)", file=sys.stderr, flush=True)
            for pid in pids:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            return
        original(signum, frame)

    api._terminate_process_handler = handler
    # torchrun sets TORCHELASTIC_SIGNALS_TO_HANDLE from this option (default: no SIGUSR1); the workers run in
    # sessions of their own, so a signal to the agent's process group reaches them only through the agent.
    if not any(arg.startswith(("--signals-to-handle", "--signals_to_handle")) for arg in sys.argv[1:]):
        sys.argv.insert(1, "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")


class _DropChildFailure(logging.Filter):
    """torchrun's own "failed (exitcode: N) local_rank ..." record: ``main`` says it in one ``error:`` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main() -> None:
    install()
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropChildFailure())
    try:
        torchrun_main()
    except ChildFailedError as err:
        # The trainers said what went wrong (one ``error:`` line); torchrun's own report would add a traceback.
        rank, failure = err.get_first_failure()
        if failure.exitcode != 2:          # 2: a refusal, whose one error line the trainer printed already
            print(f"error: trainer rank {rank} exited with code {failure.exitcode} (its message is above)",
                  file=sys.stderr, flush=True)
        sys.exit(failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1)


if __name__ == "__main__":
    main()
