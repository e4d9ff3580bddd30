"""bench/gpu_check_recompute.py, the issue 26 block of bench/gpu_check.sh, on CPU with a tiny model: the recompute
table (every setting's losses equal ``none``'s bit for bit) and the pipeline engine's steps (2 stages, gloo, the
eager backend: FlexAttention has no CPU backward)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from helpers import free_port, subprocess_env


def _load(root):
    spec = importlib.util.spec_from_file_location("gpu_check_recompute", root / "bench" / "gpu_check_recompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recompute_table_on_cpu(tmp_path, root):
    report = tmp_path / "gpu.md"
    assert _load(root).main(["recompute", "--device", "cpu", "--tiny", "--backends", "eager", "--steps", "2",
                             "--warmup", "1", "--out", str(report)]) == 0
    rows = [line.split("|") for line in report.read_text().splitlines() if line.startswith("| eager |")]
    assert [r[2].strip() for r in rows] == ["none", "attention", "full"]
    assert all(r[7].strip() == "yes" for r in rows)             # losses bitwise equal to none's
    assert all(float(r[5]) > 0 for r in rows)                   # median ms / step
    assert "NO" not in report.read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_engine_steps_on_cpu(tmp_path, root):
    report = tmp_path / "gpu.md"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                           str(root / "bench" / "gpu_check_recompute.py"), "pipeline", "--device", "cpu", "--tiny",
                           "--backend", "eager", "--steps", "2", "--out", str(report)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    text = report.read_text()
    assert "2 stage(s)" in text and "['eager']" in text and "**ok**" in text
