#!/usr/bin/env python
"""Training throughput of the parallel layouts on this machine: tokens/s for (TP, PP, DP) layouts.

    .venv/bin/python bench/bench_parallel.py [--layouts 1,1,1 2,1,1 1,2,1] [--steps 30] [--repeats 3]

Each layout is a real `torchrun -m pretrain.train` launch of configs/tiny-cpu.yaml (same global batch) on the demo
data (run `python -m pretrain.demo` first, or pass --data DIR). tokens/s is the median over steps after the
first 5 (warm-up) of each launch; the reported figure is the median over repeats, launches interleaved so that
machine noise hits every layout alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_layout(tp, pp, dp, args, out_dir):
    from pretrain.distributed import free_port
    world = tp * pp * dp
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)), PYTHONPATH=str(ROOT))
    data = Path(args.data)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "pretrain.train", "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
           f"data.train={data / 'train'}", "data.valid=", f"data.tokenizer={data / 'tokenizer'}",
           f"run.dir={out_dir}", f"run.steps={args.steps}", "run.mlflow=false", "run.resume=never",
           f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"data.micro_batches={args.micro_batches}",
           f"data.micro_batch_size={args.micro_batch_size // dp}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if result.returncode:
        raise RuntimeError(f"layout {(tp, pp, dp)} failed:\n{result.stderr[-3000:]}")
    rates = [json.loads(x)["tokens_per_s"] for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in json.loads(x)]
    return statistics.median(rates[5:])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", nargs="+", default=["1,1,1", "2,1,1", "1,2,1"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--data", default=str(ROOT / "runs" / "demo-data"))
    args = p.parse_args()
    layouts = [tuple(int(x) for x in s.split(",")) for s in args.layouts]
    results = {layout: [] for layout in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for layout in layouts:
                results[layout].append(run_layout(*layout, args, Path(tmp) / f"{layout}-{r}"))
    print(f"cpu_count={os.cpu_count()} steps={args.steps} repeats={args.repeats} config=configs/tiny-cpu.yaml "
          f"global batch={args.micro_batch_size}x{args.micro_batches} sequences of 32 tokens")
    base = statistics.median(results[layouts[0]])
    for layout, rates in results.items():
        med = statistics.median(rates)
        print(f"(TP, PP, DP) = {layout}: {med:8.0f} tokens/s  (x{med / base:.2f} of {layouts[0]}; "
              f"runs: {', '.join(f'{x:.0f}' for x in rates)})")


if __name__ == "__main__":
    main()
