#!/usr/bin/env python
"""How long a checkpoint save blocks the training loop, with and without ``run.async_save`` (issue 26).

    flock /work/bigmem.lock .venv/bin/python bench/bench_async_save.py [--steps 13 --save-interval 3]
    python bench/bench_async_save.py --tensor 1 --pipeline 1 --device cuda      # one GPU (bench/gpu_check.sh)
    python bench/bench_async_save.py --snapshot host_copy                       # run.async_snapshot (default auto)

Two real ``torchrun -m pretrain.train`` runs of the ~110M LaMemo of bench_rank_memory.py (d 1024, 8 layers, d_ff
4096, 16 heads, byte vocabulary) on 4 gloo ranks, TP 2 x PP 2, a save every ``--save-interval`` steps, one with
``run.async_save=true`` and one with ``false`` (in that order, ``--repeats`` times). The blocked time of a save
at step S is the gap between the ``time`` of the step records S and S + 1 in ``metrics.jsonl`` (the save runs
between them) minus a normal step: the median gap between two records with no save between them in the same run.
The save after the last step is waited for in both modes and is not counted. Each run's log lines about its saves
are printed (the loop's wait for the snapshot; with a ``live`` snapshot, any wait of the next optimizer update for
the files). Reported: each save's blocked time,
their median per mode, and the ratio async / sync (issue 26's acceptance: <= 0.25). On a machine with few cores
the background writer competes with training for them, so the steps after an asynchronous save may be slower;
the total wall time of each run is printed too.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_rank_memory import BIG, prepare_data   # noqa: E402  (the same ~110M model and corpus)


def run(data: Path, run_dir: Path, args, async_save: bool) -> tuple[list[float], float]:
    """One training run; (blocked seconds of each counted save, wall seconds of the run)."""
    from pretrain.distributed import free_port
    world = args.tensor * args.pipeline
    train_args = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), f"data.train={data / 'train'}",
                  "data.valid=", f"data.tokenizer={data / 'tok'}", f"run.dir={run_dir}", f"run.steps={args.steps}",
                  "run.mlflow=false", "run.resume=never", "run.log_interval=1", "data.tgt_len=32", "data.mem_len=32",
                  "data.micro_batch_size=1", "data.micro_batches=2", "model.dropout=0.0",
                  f"run.save_interval={args.save_interval}", "run.keep_checkpoints=1",
                  f"run.async_save={str(async_save).lower()}", f"run.async_snapshot={args.snapshot}",
                  f"parallel.tensor={args.tensor}",
                  f"parallel.pipeline={args.pipeline}", f"run.device={args.device}",
                  *[f"{k}={v}" for k, v in BIG.items()]]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "pretrain.train", *train_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    times = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            times[record["step"]] = record["time"]
    saves = [s for s in range(1, args.steps) if s % args.save_interval == 0]
    gaps = {s: times[s + 1] - times[s] for s in range(1, args.steps)}
    normal = statistics.median(g for s, g in gaps.items() if s not in saves)
    print(f"  normal step {normal:.2f} s; " + "; ".join(x.strip() for x in result.stdout.splitlines()
                                                       if x.startswith("checkpoint of step")
                                                       or "optimizer update after it waited" in x), flush=True)
    return [gaps[s] - normal for s in saves], wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--pipeline", type=int, default=2)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--save-interval", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--modes", default="async,sync", help="which runs, in this order (async, sync)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank: bench/gpu_check.sh)")
    p.add_argument("--snapshot", default="auto", choices=("auto", "host_copy", "live"),
                   help="run.async_snapshot of the asynchronous runs (auto: live on CPU, host_copy on a GPU)")
    args = p.parse_args()
    blocked = {True: [], False: []}
    walls = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare_data(tmp)
        for i in range(args.repeats):
            for mode in [m == "async" for m in args.modes.split(",")]:
                seconds, wall = run(data, tmp / f"run-{mode}-{i}", args, mode)
                blocked[mode] += seconds
                walls[mode].append(wall)
                print(f"async_save={str(mode).lower()}: blocked per save "
                      + ", ".join(f"{s:.2f}" for s in seconds) + f" s; run wall {wall:.0f} s", flush=True)
    if not (blocked[True] and blocked[False]):
        return 0
    a, s = statistics.median(blocked[True]), statistics.median(blocked[False])
    print(f"(TP, PP) = ({args.tensor}, {args.pipeline}), {args.steps} steps, a save every {args.save_interval}: "
          f"median blocked time per save: async {a:.2f} s, sync {s:.2f} s, ratio {a / s:.2f} (acceptance <= 0.25); "
          f"median run wall: async {statistics.median(walls[True]):.0f} s, "
          f"sync {statistics.median(walls[False]):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
