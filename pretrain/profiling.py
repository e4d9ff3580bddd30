"""``run.profile_steps: [first, last]``: where the step time goes, recorded by ``torch.profiler`` on every rank.

Steps ``first..last`` (inclusive) run under the profiler (CPU activity, and CUDA kernels plus a CUDA memory
snapshot on GPU); each step is one ``train_step_<N>`` range in the trace. After ``last`` (or when the run stops
inside the window) every rank writes

    <run.dir>/profile/rank<R>/rank<R>.<time>.pt.trace.json   chrome trace (tensorboard_trace_handler)
    <run.dir>/profile/rank<R>/memory_snapshot.pickle         GPU only: torch.cuda.memory._dump_snapshot

Open a trace in https://ui.perfetto.dev (or chrome://tracing), or all ranks in TensorBoard's profiler plugin
(``tensorboard --logdir <run.dir>/profile``, with ``torch-tb-profiler``); the memory snapshot in
https://pytorch.org/memory_viz. docs/tracking.md says more. The profiler only observes: a profiled run's
losses equal an unprofiled one's bitwise (tests/parallel/test_operations.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function, tensorboard_trace_handler

PROFILE_DIR = "profile"
MEMORY_SNAPSHOT = "memory_snapshot.pickle"
_MEMORY_HISTORY_ENTRIES = 100_000      # allocation events kept for the snapshot (torch's own default)


def profile_dir(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"rank{rank}"


class StepProfiler:
    """The profiler window of one rank. ``window`` is ``run.profile_steps`` (empty: off, every call is free)."""

    def __init__(self, window: list[int] | tuple[int, ...], run_dir: Path, rank: int, device: torch.device,
                 log: Callable[[str], None]):
        self.first, self.last = (window[0], window[1]) if window else (0, -1)
        self.dir = profile_dir(run_dir, rank)
        self.rank, self.cuda, self.log = rank, device.type == "cuda", log
        self._profile: profile | None = None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wrap one optimizer step: recorded when it lies in the window (a resume inside it records the rest)."""
        if not self.first <= step <= self.last:
            yield
            return
        if self._profile is None:
            self._start(step)
        with record_function(f"train_step_{step}"):
            yield
        if step == self.last:
            self.close()

    def _start(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profile = profile(activities=activities, record_shapes=True, profile_memory=True,
                                on_trace_ready=tensorboard_trace_handler(str(self.dir), worker_name=f"rank{self.rank}"))
        if self.cuda:
            torch.cuda.memory._record_memory_history(max_entries=_MEMORY_HISTORY_ENTRIES)
        self._profile.start()
        self.log(f"profiler: recording steps {step}-{self.last} on every rank")

    def close(self) -> None:
        """Stop recording (if recording) and write this rank's trace; also when the run ends inside the window."""
        if self._profile is None:
            return
        prof, self._profile = self._profile, None
        prof.stop()                                    # on_trace_ready writes the chrome trace
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.dir / MEMORY_SNAPSHOT))
            torch.cuda.memory._record_memory_history(enabled=None)
        root = self.dir.parent
        self.log(f"profiler: traces written to {root}/rank<R>/ (one per rank; open them in https://ui.perfetto.dev "
                 f"or with tensorboard --logdir {root}; docs/tracking.md)")
