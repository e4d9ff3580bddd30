"""One run per run directory: a lock file held for the trainer's life, and the rules for reusing a directory.

``<run.dir>/run.lock`` (JSON: host, pid, process start time, command, heartbeat) is created with O_EXCL by
global rank 0 only; the other ranks learn the outcome from it through a collective (``pretrain.preflight.agree``),
so one node's view decides and multi-node jobs need no shared-filesystem locking semantics. A heartbeat thread
rewrites the file's mtime every ``HEARTBEAT_S``. A lock is stale, and taken over with a warning, when

* its process is gone (same host: the pid no longer exists, or is another process started later), or
* (another host) its heartbeat is older than ``STALE_AFTER_S`` (a node that died without cleaning up).

A live holder is named in the refusal. The lock is removed when the trainer ends (any exit but SIGKILL).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunLockError(RuntimeError):
    """The run directory is in use by another live trainer."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot; guards against a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                "command": " ".join(sys.argv)[:500], "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the recorded holder is dead (None: it may be alive)."""
        age = time.time() - self.path.stat().st_mtime
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid <= 0 or not pid_alive(pid):
                return f"process {pid} on {holder.get('host')} is gone"
            if holder.get("start") and _process_start(pid) != holder.get("start"):
                return f"pid {pid} now belongs to another process"
            return None
        if age > STALE_AFTER_S:
            return f"no heartbeat from {holder.get('host')} for {age:.0f} s (stale after {STALE_AFTER_S:.0f} s)"
        return None

    def acquire(self, log=print) -> None:
        """Take the lock or raise RunLockError naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if not isinstance(holder, dict):
                    holder = {}
                try:
                    reason = self._stale_reason(holder) if holder else "the lock file is unreadable"
                except FileNotFoundError:
                    continue                     # released meanwhile: try again
                if reason is None:
                    raise RunLockError(
                        f"run directory {self.path.parent} is in use by another trainer (pid {holder.get('pid')} "
                        f"on {holder.get('host')}, since {holder.get('since')}: {holder.get('command')}); wait "
                        f"for it, stop it, or choose another run.dir (lock: {self.path})") from None
                log(f"warning: taking over the stale lock {self.path} ({reason})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunLockError(f"cannot take the lock {self.path} (it keeps changing)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self.held = False


def has_previous_run(run_dir: Path) -> list[str]:
    """What in ``run_dir`` belongs to an earlier run (checkpoints, metrics, final export)."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir()):
        found.append("checkpoints/")
    for name in ("metrics.jsonl", "final"):
        if (run_dir / name).exists():
            found.append(name)
    return found


def move_previous_run_aside(run_dir: Path) -> Path:
    """Move everything in ``run_dir`` but the lock into ``<run_dir>.replaced-<time>`` (a sibling directory)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}")
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name != LOCK_NAME:
            os.replace(entry, target / entry.name)
    return target


def lock_holder(run_dir: str | Path) -> tuple[dict, str | None] | None:
    """Who holds ``run_dir``'s lock, as recorded (host, pid, since, command), and why that holder is dead (None:
    it may be alive, by the rules :class:`RunLock` takes a lock over with); None when the directory is not locked.
    Read-only: for ``lamemo-status``."""
    lock = RunLock(run_dir)
    try:
        holder = json.loads(lock.path.read_text() or "{}")
        return (holder, lock._stale_reason(holder)) if isinstance(holder, dict) and holder else \
            ({}, "the lock file is unreadable")
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return {}, "the lock file is unreadable"
