"""What happens to old checkpoints: rotation (keep the newest complete ones, remove interrupted saves that a
newer complete checkpoint has made useless) and quarantine (a diverged run's suspect checkpoints are moved
aside, not deleted). Rank 0 only; both are plain directory operations."""
from __future__ import annotations

import shutil
from pathlib import Path

from .format import MARKER, checkpoint_root, complete_checkpoints

QUARANTINE = "diverged"


def _step_dirs(run_dir: str | Path) -> list[Path]:
    """Every ``step_N`` directory (complete or not), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def rotate_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Keep the ``keep`` newest complete checkpoints; remove the older complete ones and every interrupted
    save (no marker) older than the newest complete checkpoint (a newer interrupted save may be one in
    progress, or the one a kill left for the next start to overwrite). Returns what was removed."""
    complete = complete_checkpoints(run_dir)
    removed = list(complete[keep:])
    if complete:
        newest = complete[0].name
        removed += [p for p in _step_dirs(run_dir) if p.name < newest and not (p / MARKER).is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def quarantine_checkpoints(run_dir: str | Path, from_step: int) -> list[Path]:
    """Move the checkpoints of step >= ``from_step`` to ``checkpoints/diverged/``; returns their new paths."""
    moved = []
    for ckpt in _step_dirs(run_dir):
        if int(ckpt.name.split("_")[1]) >= from_step:
            target = checkpoint_root(run_dir) / QUARANTINE / ckpt.name
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            ckpt.rename(target)
            moved.append(target)
    return moved
