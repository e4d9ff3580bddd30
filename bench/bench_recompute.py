#!/usr/bin/env python
"""``parallel.recompute`` none / attention / full: peak memory and step time of a LaMemo training step.

    .venv/bin/python bench/bench_recompute.py [--repeats 5] [--seg-len 512] [--mem-len 512] [--batch 4]

Issue 26's setting: N = M = 512, d = 256, 8 heads, 4 layers, d_ff = 1024, one process, fp32, a full memory;
dropout 0.1 and attention dropout 0 (the paper's configs, configs/*-base.yaml; ``--dropatt`` to change it:
attention dropout adds a mask and a second probability tensor per layer, which ``none`` keeps and the
recompute redraws). The rest, chosen to be representative of that setting rather than to pass: N = M = 512 is
the paper's character-level setting (configs/enwik8-*-base.yaml, text8-*-base.yaml: tgt_len = mem_len = 512),
whose vocabulary is the byte tokenizer's 257 (``--vocab``, default 257; the word- and BPE-level configs train
at N = M = 150 or shorter); batch 4 (``--batch``): every activation, the logits included, is linear in the
batch, so the ratio to ``none`` does not depend on it beyond the small fixed part (W_R on the distance table),
and 4 keeps one step of ``none`` around 1 GiB and a few seconds on one CPU thread (the paper's 20 per GPU
would be 5x both). ``--vocab 10000`` shows a word-piece-sized output layer for comparison (its logits, their
softmax and gradient, 3 x 78 MiB kept by every setting, lower all three ratios). Each (setting, length) runs in a fresh child process (``--child``), so its peak resident memory
(VmHWM; a new process image starts its own high-water mark, unlike ru_maxrss across fork + exec) is its own.
The memory figure is the peak *above a short-segment run* (N = M = ``--short``) of the same setting: the
activations, without the interpreter, weights, gradients and Adam-free baseline every run shares. Step time is
the median of ``--steps`` timed steps after a warm-up step, and across ``--repeats`` rounds the median of those;
the settings run interleaved, round by round, so the machine's load falls on all of them alike.
Each child fixes glibc's mmap threshold as the trainer does (``pretrain.host_memory.release_freed_memory``, called
by ``build_engine``): otherwise glibc raises it to 32 MiB after the first large frees and VmHWM also counts the
holes of its heap, ~150 MiB here for every setting (``--malloc-default`` measures that). One torch
thread: on a loaded machine the CPU time of a one-thread run is the steadier figure (printed next to the wall
time).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

from bench_model_step import Ours, build, timed  # noqa: E402
from lamemo_parallel.attention import use_selective_recompute  # noqa: E402
from lamemo_parallel.config import DEFAULT_VARIANT as LAMEMO, RECOMPUTE_MODES  # noqa: E402
from pretrain.host_memory import release_freed_memory  # noqa: E402


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args) -> None:
    if not args.malloc_default:
        release_freed_memory()                      # as the trainer does before it builds the model
    torch.set_num_threads(1)
    args.mode, args.device, args.backend = "train", "cpu", "eager"
    model = build(LAMEMO, args)
    for name, module in model.named_modules():     # dropout on: the recompute replays the masks
        if isinstance(module, torch.nn.Dropout):
            module.p = args.dropatt if name.endswith("dropatt") else args.dropout
    model.activation_checkpointing = args.recompute == "full"
    use_selective_recompute(model, args.recompute)
    torch.manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seg_len + 1))
    runner = Ours(model, tokens, args)
    runner()                                        # warm-up (and the first backward's buffers)
    times = [timed(runner, args) for _ in range(args.steps)]
    print(json.dumps({"peak": peak_rss(), "wall": statistics.median(t[0] for t in times),
                      "cpu": statistics.median(t[1] for t in times)}))


def run_child(args, recompute: str, length: int) -> dict:
    command = [sys.executable, __file__, "--child", "--recompute", recompute, "--seg-len", str(length),
               "--mem-len", str(length), "--batch", str(args.batch), "--steps", str(args.steps),
               "--d-model", str(args.d_model), "--d-inner", str(args.d_inner), "--layers", str(args.layers),
               "--heads", str(args.heads), "--vocab", str(args.vocab), "--dropout", str(args.dropout),
               "--dropatt", str(args.dropatt)]
    out = subprocess.run(command + (["--malloc-default"] if args.malloc_default else []), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child process")
    p.add_argument("--seg-len", type=int, default=512)
    p.add_argument("--mem-len", type=int, default=512, help="(the child's; the parent uses --seg-len for both)")
    p.add_argument("--short", type=int, default=16, help="N = M of the short-segment baseline run")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-inner", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=257, help="default: the byte tokenizer (enwik8 / text8 at N = M = 512)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dropatt", type=float, default=0.0)
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's dynamic mmap threshold (the trainer fixes it: pretrain/host_memory.py)")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    rows = {mode: {"above": [], "wall": [], "cpu": []} for mode in RECOMPUTE_MODES}
    for r in range(args.repeats):
        order = RECOMPUTE_MODES[r % 3:] + RECOMPUTE_MODES[:r % 3]      # rotate who runs first
        for mode in order:
            short = run_child(args, mode, args.short)
            long = run_child(args, mode, args.seg_len)
            rows[mode]["above"].append(long["peak"] - short["peak"])
            rows[mode]["wall"].append(long["wall"])
            rows[mode]["cpu"].append(long["cpu"])
            print(f"round {r + 1} {mode:9s} peak above N=M={args.short}: {rows[mode]['above'][-1] / 2**20:7.1f} MiB"
                  f"  step {long['wall']:.3f} s wall, {long['cpu']:.3f} s CPU", flush=True)
    med = {mode: {k: statistics.median(v) for k, v in row.items()} for mode, row in rows.items()}
    base = med["none"]
    print(f"\nN = M = {args.seg_len}, d {args.d_model}, {args.heads} heads, {args.layers} layers, batch {args.batch}, "
          f"vocabulary {args.vocab}, "
          f"{'glibc malloc defaults' if args.malloc_default else 'the trainer malloc setting'}, "
          f"dropout {args.dropout}, dropatt {args.dropatt}, one thread; medians of {args.repeats} rounds x {args.steps} steps")
    print(f"{'recompute':10s} {'peak above short (MiB)':>23s} {'x none':>7s} {'step wall (s)':>14s} {'x none':>7s} "
          f"{'step CPU (s)':>13s} {'x none':>7s}")
    for mode, m in med.items():
        print(f"{mode:10s} {m['above'] / 2**20:23.1f} {m['above'] / base['above']:7.2f} {m['wall']:14.3f} "
              f"{m['wall'] / base['wall']:7.2f} {m['cpu']:13.3f} {m['cpu'] / base['cpu']:7.2f}")


if __name__ == "__main__":
    main()
