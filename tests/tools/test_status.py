"""``lamemo-status`` (pretrain/cli/status.py) on generated run directories: the tail reader, the states, the
million-line ``metrics.jsonl`` in under a second without importing torch. The states of real runs (running,
finished, diverged with a quarantined checkpoint) are checked where those runs are launched anyway:
tests/trainer/test_reliability.py and tests/parallel/test_operations.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.cli import status as status_cli

from helpers import ROOT, subprocess_env

STEPS = 1_000_000


def record(step: int, t0: float = 1_700_000_000.0, **extra) -> str:
    """One realistic metrics.jsonl line (the trainer's keys), 0.5 s and 4096 tokens a step."""
    return json.dumps({"step": step, "time": round(t0 + 0.5 * step, 3), "loss": 3.0 + 1.0 / step,
                       "ppl": 20.0, "lr": 2.5e-4, "grad_norm": 0.8, "tokens_per_s": 8192.0, "step_time_s": 0.5,
                       "tflops": 1.5, "mfu": 0.41, "hfu": 0.55, "peak_mem_gib": 12.3, **extra})


def make_run(run_dir: Path, steps: int, total: int, *, evals_every: int = 0) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run:\n  steps: {total}\n  dir: {run_dir}\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(record(step) + "\n")
            if evals_every and step % evals_every == 0:
                f.write(json.dumps({"step": step, "time": 1.0, "eval_loss": 3.25, "eval_ppl": 25.8}) + "\n")


def checkpoint(run_dir: Path, step: int, *, complete: bool = True, quarantined: bool = False) -> Path:
    root = run_dir / "checkpoints" / ("diverged" if quarantined else "")
    ckpt = root / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    if complete:
        (ckpt / "COMPLETE.json").write_text("{}")
    return ckpt


def test_tail_reader_returns_the_lines_newest_first_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(status_cli, "BLOCK", 7)          # many block boundaries inside lines
    path = tmp_path / "m.jsonl"
    lines = [record(s) for s in range(1, 40)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 40, "ti')      # a torn last line
    got = [x for x in status_cli.lines_backwards(path) if x]
    assert got[0] == b'{"step": 40, "ti' and [x.decode() for x in got[1:]] == lines[::-1]
    assert [x for x in status_cli.lines_backwards(path, max_bytes=7 * 10) if x][-1] != lines[0].encode()


def test_states_of_generated_runs(tmp_path, capsys):
    now = time.time()
    # stopped mid-run (resumable): 120 of 1000 steps, checkpoint 100 complete, 120 interrupted
    run = tmp_path / "stopped"
    make_run(run, 120, 1000, evals_every=50)
    os.utime(checkpoint(run, 100) / "COMPLETE.json", (now - 90, now - 90))
    checkpoint(run, 120, complete=False)
    s = status_cli.run_status(run, now=now)
    assert s["state"] == "stopped" and s["step"] == 120 and s["total_steps"] == 1000
    assert s["tokens_seen"] == 120 * 4096 and s["tokens_per_s"] == 8192.0
    assert s["seconds_per_step"] == pytest.approx(0.5) and s["eta_s"] == pytest.approx(880 * 0.5)
    assert s["loss"] == pytest.approx(3.0 + 1 / 120) and s["validation"]["step"] == 100
    assert s["checkpoints"]["newest"]["step"] == 100 and s["checkpoints"]["newest"]["age_s"] == pytest.approx(90, abs=2)
    assert s["checkpoints"]["incomplete"] == ["step_00000120"] and s["lock"] is None and s["export"] is None
    screen = status_cli.render(s, now=now)
    assert "[stopped]" in screen and "120/1000 (12.0%)" in screen and "491.5k tokens seen" in screen
    assert "step_00000100 (step 100), 0:01:30 old" in screen and "incomplete: step_00000120" in screen
    assert "ETA 0:07:20" in screen and "validation  3.2500 | ppl 25.80 (step 100)" in screen

    # running: this process holds the lock
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "today"}))
    s = status_cli.run_status(run, now=now)
    assert s["state"] == "running" and s["lock"]["pid"] == os.getpid() and s["lock"]["alive"]
    assert f"[running: pid {os.getpid()} on {socket.gethostname()} since today]" in status_cli.render(s)
    # a lock left by a dead process is named stale, the run is not running
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 17, "since": "x"}))
    s = status_cli.run_status(run, now=now)
    assert s["state"] == "stopped" and "stale lock" in status_cli.render(s)
    (run / "run.lock").unlink()

    # diverged: a quarantined checkpoint
    checkpoint(run, 110, quarantined=True)
    s = status_cli.run_status(run, now=now)
    assert s["state"] == "diverged" and s["checkpoints"]["quarantined"] == ["step_00000110"]
    assert "quarantined checkpoints/diverged/: step_00000110" in status_cli.render(s)

    # finished: exported after the last step
    done = tmp_path / "done"
    make_run(done, 50, 50)
    checkpoint(done, 50)
    (done / "final").mkdir()
    (done / "final" / "export.json").write_text(json.dumps({"step": "50", "dtype": "float32"}))
    assert status_cli.main([str(done), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["state"] == "finished" and s["step"] == 50 and "eta_s" not in s and s["export"]["step"] == 50
    assert status_cli.main([str(done)]) == 0
    assert "[finished]" in capsys.readouterr().out

    # not a run directory: one error line, exit 2
    assert status_cli.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_a_million_metric_lines_in_under_a_second_without_torch(tmp_path):
    """Acceptance: a 1,000,000-line metrics.jsonl (about 250 MB); the command, in a fresh interpreter, imports
    no torch and answers (import included) in under a second."""
    run = tmp_path / "big"
    run.mkdir()
    (run / "config.yaml").write_text(f"run:\n  steps: {2 * STEPS}\n")
    line = record(1).replace('"step": 1,', '"step": %d,').replace('"time": 1700000000.5,', '"time": %.3f,')
    assert line != record(1) and json.loads(line % (7, 1.5)) == {**json.loads(record(1)), "step": 7, "time": 1.5}
    with open(run / "metrics.jsonl", "w") as f:       # formatted, not json.dumps'd: seconds, not a minute
        chunk = 10_000
        for first in range(1, STEPS + 1, chunk):
            f.write("\n".join(line % (s, 1_700_000_000.0 + 0.5 * s) for s in range(first, first + chunk)) + "\n")
            if first == 1:       # the only validation: at the very start, so the whole scan back is needed
                f.write(json.dumps({"step": chunk, "time": 1.0, "eval_loss": 3.5, "eval_ppl": 33.1}) + "\n")
    probe = ("import json, sys, time\nstart = time.perf_counter()\nfrom pretrain.cli.status import main\n"
             "rc = main([sys.argv[1], '--json'])\nseconds = time.perf_counter() - start\n"
             "print(json.dumps({'rc': rc, 'seconds': seconds, 'torch': 'torch' in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    *screen, probe_line = done.stdout.strip().splitlines()
    result, status = json.loads(probe_line), json.loads("\n".join(screen))
    assert result["rc"] == 0 and not result["torch"]
    assert status["step"] == STEPS and status["tokens_seen"] == STEPS * 4096 and status["loss"] == 4.0
    assert status["eta_s"] == pytest.approx(STEPS * 0.5)
    # the validation is looked for 32 MB back (MAX_SCAN_BYTES, the worst case timed here); this one is 220 MB back
    assert "validation" not in status
    print(f"lamemo-status on {STEPS:,} lines: {result['seconds']:.3f} s (import included)")
    assert result["seconds"] < 1.0, result
