"""Where a training run stands, on one screen: ``lamemo-status RUN_DIR`` (``--json`` for scripts).

    state        running (a live trainer holds run.lock: host, pid, since), finished (exported after the last
                 step), diverged (checkpoints quarantined), or stopped (resumable)
    progress     step / run.steps, tokens seen (steps x tokens per step)
    loss         the last logged training loss, the last validation
    speed        tokens/s and seconds per step, medians of the recent records; the ETA from them
    checkpoints  the newest complete one and its age, incomplete saves, quarantined ones (checkpoints/diverged/)
    export       run.dir/final, if any (its step and dtype)

Fast on any run: ``metrics.jsonl`` is read from its end backwards (a few blocks, never the whole file), and
nothing here imports torch (that alone takes over a second): the run directory is read as files, by the
names the trainer writes them with.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from pretrain.cli_args import OneLineParser
from pretrain.durations import format_duration
from pretrain.run_lock import lock_holder
from pretrain.tracking import METRICS_FILE

# On-disk names of pretrain/checkpoint/format.py and pretrain/divergence.py. Importing those would import torch
# (the checkpoint package loads DeepSpeed's shards), so this reader names the files itself.
CHECKPOINTS, STEP_PREFIX, MARKER, QUARANTINE = "checkpoints", "step_", "COMPLETE.json", "diverged"
EXPORT_DIR, EXPORT_META = "final", "export.json"

RECENT = 50                      # records the speed figures are medians over
BLOCK = 1 << 16                  # bytes read per backward step through metrics.jsonl
MAX_SCAN_BYTES = 32 << 20        # how far back the last validation is looked for (~140,000 records)


def lines_backwards(path: Path, max_bytes: int = MAX_SCAN_BYTES) -> Iterator[bytes]:
    """The lines of ``path``, newest first, read in blocks from its end (at most ``max_bytes`` of it)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos, head = end, b""
        while pos > 0 and end - pos < max_bytes:
            start = max(0, pos - BLOCK)
            f.seek(start)
            lines = (f.read(pos - start) + head).split(b"\n")
            pos = start
            head = lines.pop(0) if pos > 0 else b""     # maybe the end of a line that starts further back
            yield from reversed(lines)


def _parse(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metrics_summary(run_dir: Path, total_steps: int | None) -> dict:
    """Last loss and validation, speed and ETA from the tail of ``metrics.jsonl``."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    recent: list[dict] = []
    last_eval = None
    for line in lines_backwards(path):
        # Past the recent records only a validation is looked for: lines without one are not parsed (the scan
        # back to the last validation may cover hundreds of thousands of records).
        if len(recent) >= RECENT and b'"eval_loss"' not in line:
            continue
        record = _parse(line)              # None for a torn last line (a write in progress) or a blank one
        if record is None:
            continue
        if "loss" in record and len(recent) < RECENT:
            recent.append(record)
        if last_eval is None and "eval_loss" in record:
            last_eval = record
        if len(recent) >= RECENT and last_eval is not None:
            break
    if not recent:
        return {}
    last = recent[0]
    out: dict = {"step": last["step"], "loss": _number(last.get("loss")), "logged_at": _number(last.get("time"))}
    per_step = [(a["time"] - b["time"]) / (a["step"] - b["step"]) for a, b in zip(recent, recent[1:])
                if a["step"] > b["step"] and _number(a.get("time")) and _number(b.get("time"))
                and a["time"] > b["time"]]
    rates = [r["tokens_per_s"] for r in recent if _number(r.get("tokens_per_s"))]
    if per_step:
        out["seconds_per_step"] = statistics.median(per_step)
    if rates:
        out["tokens_per_s"] = statistics.median(rates)
    tokens = _number(last.get("tokens_per_s")) and _number(last.get("step_time_s"))
    if tokens:       # tokens_per_s x step_time_s is the step's token count (pretrain/trainer.py)
        out["tokens_seen"] = int(round(last["tokens_per_s"] * last["step_time_s"])) * last["step"]
    if per_step and total_steps and last["step"] < total_steps:
        out["eta_s"] = (total_steps - last["step"]) * out["seconds_per_step"]
    if last_eval is not None:
        out["validation"] = {"step": last_eval["step"], "loss": _number(last_eval.get("eval_loss")),
                             "ppl": _number(last_eval.get("eval_ppl"))}
    return out


def checkpoint_summary(run_dir: Path, now: float) -> dict:
    """The newest complete checkpoint (step, age), incomplete saves and quarantined checkpoints."""
    root = run_dir / CHECKPOINTS
    out: dict = {"newest": None, "incomplete": [], "quarantined": []}
    if not root.is_dir():
        return out
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)), reverse=True)
    complete = [p for p in steps if (p / MARKER).is_file()]
    if complete:
        marker = complete[0] / MARKER
        out["newest"] = {"path": str(complete[0]), "step": int(complete[0].name[len(STEP_PREFIX):]),
                         "age_s": max(0.0, now - marker.stat().st_mtime)}
    out["incomplete"] = [p.name for p in steps if not (p / MARKER).is_file()]
    quarantine = root / QUARANTINE
    if quarantine.is_dir():
        out["quarantined"] = sorted(p.name for p in quarantine.iterdir() if p.name.startswith(STEP_PREFIX))
    return out


def export_summary(run_dir: Path) -> dict | None:
    meta = run_dir / EXPORT_DIR / EXPORT_META
    if not meta.is_file():
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return {"path": str(meta.parent), "error": f"{EXPORT_META} is unreadable"}
    step = info.get("step")
    return {"path": str(meta.parent), "step": int(step) if str(step).isdigit() else None, "dtype": info.get("dtype")}


def run_status(run_dir: Path, now: float | None = None) -> dict:
    """Everything ``lamemo-status`` shows, as one JSON-able dict."""
    now = time.time() if now is None else now
    config = {}
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    total = (config.get("run") or {}).get("steps") if isinstance(config, dict) else None
    total = total if isinstance(total, int) else None
    metrics = metrics_summary(run_dir, total)
    checkpoints = checkpoint_summary(run_dir, now)
    export = export_summary(run_dir)
    lock = None
    holder = lock_holder(run_dir)
    if holder is not None:
        record, stale = holder
        lock = {key: record.get(key) for key in ("host", "pid", "since", "command")}
        lock["alive"] = stale is None
        if stale:
            lock["stale"] = stale
    step = metrics.get("step")
    if lock and lock["alive"]:
        state = "running"
    elif checkpoints["quarantined"]:
        state = "diverged"
    elif export and total is not None and export.get("step") == total:
        state = "finished"
    else:
        state = "stopped"
    return {"run_dir": str(run_dir), "state": state, "step": step, "total_steps": total, **{
        k: v for k, v in metrics.items() if k != "step"}, "checkpoints": checkpoints, "lock": lock, "export": export}


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def render(status: dict, now: float | None = None) -> str:
    """The one-screen text of ``run_status``."""
    now = time.time() if now is None else now
    lines = []

    def row(name: str, text: str) -> None:
        lines.append(f"{name:<12}{text}")

    lock = status["lock"]
    state = status["state"]
    if state == "running":
        state += f": pid {lock['pid']} on {lock['host']} since {lock['since']}"
    elif lock:
        state += f" (stale lock: {lock['stale']})"
    row("run", f"{status['run_dir']}  [{state}]")
    step, total = status["step"], status["total_steps"]
    if step is None:
        row("step", "no training step logged yet")
    else:
        share = f" ({100.0 * step / total:.1f}%)" if total else ""
        tokens = f" | {_si(status['tokens_seen'])} tokens seen" if "tokens_seen" in status else ""
        row("step", f"{step}/{total if total else '?'}{share}{tokens}")
        ago = f" ({format_duration(now - status['logged_at'])} ago)" if status.get("logged_at") else ""
        row("loss", (f"{status['loss']:.4f}" if status.get("loss") is not None else "non-finite") + ago)
    valid = status.get("validation")
    if valid:
        ppl = f" | ppl {valid['ppl']:.2f}" if valid.get("ppl") is not None else ""
        row("validation", f"{valid['loss']:.4f}{ppl} (step {valid['step']})" if valid.get("loss") is not None
            else f"non-finite (step {valid['step']})")
    speed = []
    if "tokens_per_s" in status:
        speed.append(f"{_si(status['tokens_per_s'])} tok/s")
    if "seconds_per_step" in status:
        speed.append(f"{status['seconds_per_step']:.3f} s/step")
    if "eta_s" in status and status["state"] in ("running", "stopped"):
        speed.append(f"ETA {format_duration(status['eta_s'])}" + ("" if status["state"] == "running"
                                                                   else " of training once resumed"))
    if speed:
        row("speed", " | ".join(speed))
    ckpt = status["checkpoints"]
    newest = ckpt["newest"]
    text = (f"{Path(newest['path']).name} (step {newest['step']}), {format_duration(newest['age_s'])} old"
            if newest else "none complete")
    if ckpt["incomplete"]:
        text += f"; incomplete: {', '.join(ckpt['incomplete'])}"
    row("checkpoint", text)
    if ckpt["quarantined"]:
        row("quarantined", f"{CHECKPOINTS}/{QUARANTINE}/: {', '.join(ckpt['quarantined'])} (written after the "
                           f"divergence began; not resumed from)")
    export = status["export"]
    if export:
        row("export", f"{export['path']} (step {export.get('step')}, {export.get('dtype')})"
            if "error" not in export else f"{export['path']}: {export['error']}")
    else:
        row("export", "none")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the run directory (run.dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the screen")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"error: run directory {run_dir} does not exist", file=sys.stderr)
        return 2
    if not any((run_dir / name).exists() for name in ("config.yaml", METRICS_FILE, CHECKPOINTS)):
        print(f"error: {run_dir} is not a training run directory (no config.yaml, {METRICS_FILE} or "
              f"{CHECKPOINTS}/)", file=sys.stderr)
        return 2
    status = run_status(run_dir)
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
