"""The local metrics log after a resume: records of steps that will be trained again are moved aside."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .mlflow_logger import METRICS_FILE


def rewind_metrics(run_dir: Path, start_step: int) -> int:
    """Drop (into ``metrics.rewound.jsonl``, nothing is lost) every record of ``metrics.jsonl`` past
    ``start_step``: after a resume from an older checkpoint those steps are trained again, and the log must not
    hold them twice. Returns the number of records moved."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    keep, dropped = [], []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError, TypeError):
            keep.append(line if line.endswith("\n") else line + "\n")       # an unparsable line (a torn write) is kept where it is
            continue
        (dropped if step > start_step else keep).append(line)
    if not dropped:
        return 0
    with open(run_dir / "metrics.rewound.jsonl", "a", encoding="utf-8") as f:
        f.writelines(dropped)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(dropped)
