"""Human-readable durations, shared by the trainer's console line and ``lamemo-status`` (no torch here: the
status command must start in well under a second)."""
from __future__ import annotations


def format_duration(seconds: float) -> str:
    """12:03:04 or 2d 03:04:05."""
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock
