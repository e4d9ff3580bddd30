"""Progress displays of every tool: a tqdm bar on a terminal, plain interval lines in a log file.

    from pretrain.progress import progress
    for item in progress(items, desc="evaluate", unit="segment"): ...
    with progress(total=n_bytes, unit="B", unit_scale=True, desc="tokenize") as bar: bar.update(k)

When the stream the display writes to (stderr unless ``file=`` says otherwise) is not a terminal (SLURM,
``nohup``, CI, ``> log``), a redrawn bar would fill the log with carriage returns. There, the same tqdm object
writes one plain line (``desc: 40% 1.2M/3.0M [00:12<00:18, 98.1kB/s]``) when the work has moved on by
``LINE_PERCENT`` percent or ``LINE_INTERVAL_S`` seconds have passed since the last line, never more often than
every ``MIN_INTERVAL_S`` seconds, plus one final line (for a job shorter than that, only when it completed its
total): a few dozen lines for any job, never a carriage return.
"""
from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

LINE_PERCENT = 10.0       # a line per this much progress ...
LINE_INTERVAL_S = 60.0    # ... or after this long without one (also for displays without a total)
MIN_INTERVAL_S = 5.0      # but never more often than this (except the final line)
_clock = time.monotonic   # the line timing's clock (a test sets its own)


class _LineFile:
    """The stream a plain display writes through: tqdm's own cursor control (a lone ``\\r`` or ``\\n`` written
    on clearing or closing) is dropped, the display's whole lines pass."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip("\r\n"):
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class PlainLines(tqdm):
    """tqdm writing plain interval lines (see the module docstring); the counting, rates and ETA are tqdm's."""

    def __init__(self, *args, **kwargs):
        self._started = self._last_line_t = _clock()
        self._last_line_n = 0
        kwargs["file"] = _LineFile(kwargs.get("file") or sys.stderr)
        kwargs["ncols"] = 0                        # statistics only, no bar
        kwargs["dynamic_ncols"] = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None or self.n == self._last_line_n:
            return True                            # a clear request, or nothing new to say
        now, closing = _clock(), self.disable   # tqdm.close() sets disable before its last display
        since = now - self._last_line_t
        moved = (100.0 * (self.n - self._last_line_n) / self.total) if self.total else 0.0
        # The final line closes a display that completed its total, ran a while or wrote before; a short one that
        # did not complete (no total, or stopped by an error) leaves the log, and a one-line error message, alone.
        completed = bool(self.total) and self.n >= self.total
        final = closing and (completed or self._last_line_n > 0 or now - self._started >= MIN_INTERVAL_S)
        if final or (since >= MIN_INTERVAL_S and (moved >= LINE_PERCENT or since >= LINE_INTERVAL_S)):
            self.fp.write(self.__str__().strip() + "\n")
            self.fp.flush()
            self._last_line_t, self._last_line_n = now, self.n
        return True


def is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an interactive terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm progress display (same arguments as ``tqdm``): a bar when its stream is a terminal, else
    :class:`PlainLines`."""
    stream = kwargs.get("file") or sys.stderr
    return (tqdm if is_terminal(stream) else PlainLines)(iterable, **kwargs)
