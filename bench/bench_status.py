"""``lamemo-status`` on a 1,000,000-line metrics.jsonl: wall time of the whole command (a fresh interpreter,
imports included), median of ``--repeats`` runs. Two cases: the last validation near the end of the file, and
none in the scanned tail (the worst case: the scan stops after MAX_SCAN_BYTES).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench/bench_status.py --repeats 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINES = 1_000_000
RECORD = ('{"step": %d, "time": %.3f, "loss": 3.4521, "ppl": 31.57, "lr": 0.00025, "grad_norm": 0.812, '
          '"tokens_per_s": 45200.0, "step_time_s": 0.52, "tflops": 123.4, "mfu": 0.412, "hfu": 0.549, '
          '"peak_mem_gib": 12.3}')


def make_run(run_dir: Path, eval_near_end: bool) -> None:
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"run:\n  steps: {2 * LINES}\n")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for first in range(1, LINES + 1, 10_000):
            f.write("\n".join(RECORD % (s, 1.7e9 + 0.52 * s) for s in range(first, first + 10_000)) + "\n")
            if eval_near_end and first + 10_000 > LINES - 50_000:
                f.write(json.dumps({"step": first, "time": 1.0, "eval_loss": 3.6, "eval_ppl": 36.6}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name, near in (("validation near the end", True), ("no validation in the scanned tail", False)):
            run_dir = Path(tmp) / name.replace(" ", "-")
            make_run(run_dir, near)
            size = (run_dir / "metrics.jsonl").stat().st_size
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pretrain.cli.status", str(run_dir), "--json"], check=True,
                               stdout=subprocess.DEVNULL)
                times.append(time.perf_counter() - start)
            print(f"{name}: {LINES:,} lines, {size / 1e6:.0f} MB: median {statistics.median(times):.3f} s "
                  f"(min {min(times):.3f}, max {max(times):.3f}) over {args.repeats} runs")


if __name__ == "__main__":
    main()
