#!/usr/bin/env python
"""Training-step time (forward + backward) of Transformer-XL (variant 0) against LaMemo (variant 3).

    .venv/bin/python bench/bench_model_step.py [--repeats 7] [--device cpu]

Default shape (issue 2): N = M = 128, d = 256, 4 layers, 8 heads, d_ff = 1024, batch 8, fp32. Both variants
are timed in the same process, interleaved, median of the repeats, and the measured 3/0 ratio is printed next
to the ratio predicted by the FLOP formula of docs/method.md §6 (lamemo_parallel.flops).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lamemo_parallel import LaMemoConfig, LaMemoModel  # noqa: E402
from lamemo_parallel.flops import StepShape, training_flops  # noqa: E402


def build(variant, args):
    torch.manual_seed(0)
    cfg = LaMemoConfig(vocab_size=args.vocab, n_layer=args.layers, d_model=args.d_model, n_head=args.heads,
                       d_inner=args.d_inner, variant=variant, tgt_len=args.seg_len, mem_len=args.mem_len)
    return LaMemoModel(cfg).to(args.device).train()


def step_time(model, tokens, memory, args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(tokens[:, :-1], targets=tokens[:, 1:], memory=memory, mem_len=args.mem_len)
    out.nll.mean().backward()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seg-len", type=int, default=128)
    p.add_argument("--mem-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-inner", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=10000)
    args = p.parse_args()
    models = {v: build(v, args) for v in (0, 3)}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seg_len + 1), generator=g).to(args.device)
    memories = {}
    for v, model in models.items():     # fill the memory to M = mem_len, then warm up
        mem = None
        with torch.no_grad():
            while mem is None or mem.length < args.mem_len:
                mem = model(tokens[:, :-1], memory=mem, mem_len=args.mem_len).memory
        memories[v] = mem
        step_time(model, tokens, mem, args)
    times = {0: [], 3: []}
    for _ in range(args.repeats):
        for v in (0, 3):
            times[v].append(step_time(models[v], tokens, memories[v], args))
    med = {v: statistics.median(t) for v, t in times.items()}
    flops = {v: training_flops(StepShape(args.layers, args.d_model, args.d_inner, args.vocab, args.seg_len,
                                         args.mem_len, lookahead=v != 0)) for v in (0, 3)}
    no_out = {v: training_flops(StepShape(args.layers, args.d_model, args.d_inner, 0, args.seg_len,
                                          args.mem_len, lookahead=v != 0)) for v in (0, 3)}
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"N={args.seg_len} M={args.mem_len} d={args.d_model} d_ff={args.d_inner} L={args.layers} "
          f"H={args.heads} B={args.batch} V={args.vocab} fp32 repeats={args.repeats}")
    for v in (0, 3):
        print(f"variant {v}: median {med[v] * 1e3:8.1f} ms/step  (min {min(times[v]) * 1e3:.1f}, "
              f"max {max(times[v]) * 1e3:.1f})  {flops[v] * args.batch / med[v] / 1e9:.1f} GFLOP/s")
    print(f"measured time ratio 3/0: {med[3] / med[0]:.3f}")
    print(f"FLOP ratio 3/0 (docs/method.md §6): {flops[3] / flops[0]:.3f} with the output layer, "
          f"{no_out[3] / no_out[0]:.3f} layer stack only")


if __name__ == "__main__":
    main()
