#!/usr/bin/env python
"""Checkpoint cost per rank: peak memory and wall time of save, offline export and resharded load.

    .venv/bin/python bench/bench_checkpoint.py [--sizes 100m 400m] [--repeats 3]

For each model size, 4 gloo ranks build the trainer's engine for (TP, PP, DP) = (2, 2, 1), run one step (so the
Adam state exists) and save ``--repeats`` checkpoints; the offline export (``pretrain.checkpoint.export``, one process, no
process group) runs ``--repeats`` times on the last one; then 4 ranks in (1, 2, 2) ZeRO-1 (another layout) load
it ``--repeats`` times through the resharding path. Each phase reports, per rank, the wall time and the peak
resident memory above the resident memory just before the phase (sampled every 2 ms from /proc), as medians
over the repeats, next to the bytes of checkpoint files that rank wrote (its shard). The export's peak is its
whole process's peak RSS, compared with the size of the exported file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # name -> model overrides (vocabulary: the byte tokenizer, 257); "tiny" checks the script quickly
    "tiny": ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.d_inner=128"],
    "100m": ["model.n_layer=8", "model.d_model=1024", "model.n_head=16", "model.d_inner=4096"],
    "400m": ["model.n_layer=13", "model.d_model=1536", "model.n_head=16", "model.d_inner=6144"],
}
SAVE_LAYOUT, LOAD_LAYOUT = (2, 2, 1, 0), (1, 2, 2, 1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Peak RSS of this process while the ``with`` block runs (a sampling thread)."""

    def __enter__(self):
        self.start, self.peak, self._stop = rss_bytes(), rss_bytes(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def corpus(work: Path) -> Path:
    import lzma

    from pretrain.data.indexed import preprocess
    from pretrain.data.tokenizer import train_tokenizer
    if not (work / "tok").exists():
        text = lzma.open(ROOT / "tests" / "data" / "tinyshakespeare" / "input.txt.xz", "rt").read()[:200000]
        (work / "train.txt").write_text(text)
        train_tokenizer("byte", [work / "train.txt"], work / "tok")
        preprocess([work / "train.txt"], work / "tok", work / "train", workers=1)
    return work


def overrides(data: Path, run_dir: Path, size: str, layout) -> list[str]:
    tp, pp, dp, zero = layout
    return [f"data.train={data / 'train'}", "data.valid=", f"data.tokenizer={data / 'tok'}", f"run.dir={run_dir}",
            "run.mlflow=false", "run.steps=100", "run.keep_checkpoints=1", "data.tgt_len=16", "data.mem_len=16",
            "data.micro_batch_size=1", "data.micro_batches=2", f"parallel.tensor={tp}", f"parallel.pipeline={pp}",
            f"parallel.zero_stage={zero}", *SIZES[size]]


# ------------------------------------------------------------------------------------------ workers
def worker(mode: str, out: Path, repeats: int, config_overrides: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from pretrain.checkpoint import CheckpointWriter, complete_checkpoints, load_checkpoint, save_checkpoint
    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.engines import build_engine
    from pretrain.layout import resolve_layout
    from pretrain.data.streams import SegmentStreams
    from pretrain.preflight import check_data
    from pretrain.startup import init_model_parallel
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", config_overrides)
    device = torch.device("cpu")
    rank, world = init_distributed(device)
    layout = resolve_layout(config, world, cuda=False)
    dp_rank = init_model_parallel(layout)
    data, d = check_data(config, verify_checksums=False, log=lambda m: None), config.data
    streams = SegmentStreams(data.train, tgt_len=d.tgt_len, dp_size=layout.data, dp_rank=dp_rank,
                             micro_batches=d.micro_batches, micro_batch_size=d.micro_batch_size, roll_seed=d.roll_seed)
    engine = build_engine(config, layout, config.model.vocab_size, device)
    results = []
    if mode == "save":
        engine.train_step(streams.next_step())
        writer = CheckpointWriter(asynchronous=False)        # the whole save, written at once
        for i in range(repeats):
            dist.barrier()
            with PeakSampler() as s:
                ckpt = save_checkpoint(engine=engine, streams=streams, config=config, step=i + 1, layout=layout,
                                       tracker_run_id=None, keep=1, writer=writer, log=lambda m: None)
            index = json.loads((ckpt / f"shards_rank_{rank:05d}.json").read_text())
            own = {loc[0] for p in index["pieces"] for loc in (p["master"], p["exp_avg"], p["exp_avg_sq"]) if loc}
            results.append({"seconds": s.seconds, "peak_above_start": s.peak - s.start,
                            "shard_bytes": sum((ckpt / f).stat().st_size for f in own)})
    else:
        ckpt = complete_checkpoints(config.run.dir)[0]
        for _ in range(repeats):
            dist.barrier()
            with PeakSampler() as s:
                load_checkpoint(ckpt, engine=engine, streams=streams, layout=layout, log=lambda m: None)
            results.append({"seconds": s.seconds, "peak_above_start": s.peak - s.start,
                            "params_on_rank": sum(p.numel() for p in engine.module.parameters())})
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def export_worker(ckpt: Path, dest: Path, out: Path) -> None:
    # sampled, not ru_maxrss: Linux carries the parent's peak over fork + exec into the child's ru_maxrss
    from pretrain.checkpoint.export import export_checkpoint
    with PeakSampler() as s:
        export_checkpoint(ckpt, dest, overwrite=True)
    size = (dest / "model.safetensors").stat().st_size
    (out / "export.json").write_text(json.dumps({"seconds": s.seconds, "peak": s.peak, "start": s.start,
                                                 "file": size}))


# ------------------------------------------------------------------------------------------ driver
def torchrun(mode: str, out: Path, repeats: int, config_overrides: list[str]) -> None:
    from pretrain.distributed import free_port
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), "--worker", mode, "--out", str(out),
           "--repeats", str(repeats), "--", *config_overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-4000:]}")


def median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def bench_size(size: str, repeats: int, work: Path) -> list[str]:
    data = corpus(work)
    out, run_dir = work / f"out-{size}", work / f"run-{size}"
    out.mkdir(exist_ok=True)
    torchrun("save", out, repeats, overrides(data, run_dir, size, SAVE_LAYOUT))
    from pretrain.checkpoint import complete_checkpoints
    ckpt = complete_checkpoints(run_dir)[0]
    exports = []
    for _ in range(repeats):
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--export", str(ckpt), str(work / "export"),
                        "--out", str(out)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        exports.append(json.loads((out / "export.json").read_text()))
    torchrun("load", out, repeats, overrides(data, run_dir, size, LOAD_LAYOUT))
    gib = 2 ** 30
    lines = [f"\n{size}: save (TP, PP, DP) = {SAVE_LAYOUT[:3]} ZeRO {SAVE_LAYOUT[3]}; resharded load into "
             f"{LOAD_LAYOUT[:3]} ZeRO {LOAD_LAYOUT[3]}; medians of {repeats}",
             "| phase | rank | wall s | peak RSS above start GiB | rank's shard GiB |", "|---|---|---|---|---|"]
    for mode in ("save", "load"):
        for rank in range(4):
            records = json.loads((out / f"{mode}-rank{rank}.json").read_text())
            shard = median(records, "shard_bytes") / gib if mode == "save" else float("nan")
            lines.append(f"| {mode} | {rank} | {median(records, 'seconds'):.2f} | "
                         f"{median(records, 'peak_above_start') / gib:.3f} | {shard:.3f} |")
    peak, file = median(exports, "peak"), exports[0]["file"]
    lines.append(f"| export (1 process) | - | {median(exports, 'seconds'):.2f} | whole-process peak "
                 f"{peak / gib:.3f} GiB (before: {median(exports, 'start') / gib:.3f}) = {peak / file:.2f} x the "
                 f"exported file ({file / gib:.3f} GiB) | - |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100m", "400m"], choices=sorted(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--worker", choices=["save", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Path(args.out), args.repeats, args.overrides)
        return 0
    if args.export:
        export_worker(Path(args.export[0]), Path(args.export[1]), Path(args.out))
        return 0
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for size in args.sizes:
            print("\n".join(bench_size(size, args.repeats, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
