#!/usr/bin/env python
"""One-GPU check: bf16 training steps of a ~350 M-parameter LaMemo and Transformer-XL at N = M = 512
(tokens/s, MFU against the GPU's dense bf16 peak, peak memory), and the fused (FlexAttention) path against
the eager reference on the same weights. Writes a markdown report (``--out``). Run through bench/gpu_check.sh.

    python bench/gpu_check.py --out bench/RESULTS-gpu.md                     # the H200 check
    python bench/gpu_check.py --tiny --device cpu --backend eager --out x.md  # the CPU smoke run (tests)

A step is forward + backward + AdamW on bf16 weights with a full memory (filled first with eager attention, so
that the fused kernel is compiled for one shape only); the memory is carried from step to step as in training.
MFU counts the model's FLOPs (lamemo_parallel.flops.training_flops, no recompute) against
pretrain.throughput.dense_peak_tflops of the device (``--peak-tflops`` overrides).
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
from lamemo_parallel.config import BASELINE_VARIANT, DEFAULT_VARIANT, variant_traits  # noqa: E402
from lamemo_parallel.flops import StepShape, training_flops  # noqa: E402
from pretrain.throughput import dense_peak_tflops  # noqa: E402

#: ~350 M parameters: 24 layers of d 1024 (16 heads of 64, d_ff 4096) and a 32k vocabulary.
BASE = dict(n_layer=24, d_model=1024, n_head=16, d_inner=4096, vocab_size=32000)
TINY = dict(n_layer=2, d_model=32, n_head=2, d_inner=64, vocab_size=50)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device | None:
    """The device asked for; None (after one ``error:`` line) when it is CUDA and torch sees none."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return None
    return device


def build(variant: int, args, sizes: dict) -> LaMemoModel:
    torch.manual_seed(0)
    config = LaMemoConfig(variant=variant, tgt_len=args.seg_len, mem_len=args.mem_len, **sizes)
    return LaMemoModel(config).to(device=args.device, dtype=args.dtype)


def fill_memory(model, tokens, args):
    """A memory of mem_len rows (eager attention, no grad)."""
    model.attention_backend = "eager"
    memory = None
    with torch.no_grad():
        while memory is None or memory.length < args.mem_len:
            memory = model(tokens[:, :-1], memory=memory, mem_len=args.mem_len).memory
    return memory


def measure(variant: int, args, sizes: dict) -> dict:
    """Median step time, tokens/s, MFU and peak memory of one variant."""
    device = args.device
    model = build(variant, args, sizes).train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, sizes["vocab_size"], (args.batch, args.seg_len + 1), generator=g).to(device)
               for _ in range(4)]
    memory = fill_memory(model, batches[0], args)
    model.attention_backend = args.backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        tokens = batches[step % len(batches)]
        sync(device)
        start = time.perf_counter()
        out = model(tokens[:, :-1], targets=tokens[:, 1:], memory=memory, mem_len=args.mem_len)
        out.nll.float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
        memory = out.memory
    c = model.config
    shape = StepShape(c.n_layer, c.d_model, c.d_inner, c.vocab_size, args.seg_len, args.mem_len,
                      lookahead=c.traits.looks_ahead)
    flops = training_flops(shape, batch_size=args.batch)
    median = statistics.median(times)
    peak = args.peak_tflops or (dense_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda"
                                else None)
    return {"variant": variant, "params": model.num_parameters(), "median_s": median, "min_s": min(times),
            "tokens_per_s": args.batch * args.seg_len / median, "tflops": flops / median / 1e12,
            "mfu": flops / median / 1e12 / peak if peak else None, "peak_tflops": peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None}


def equality(args, sizes: dict) -> list[str]:
    """Eager against fused on the same weights and memory: losses and gradients of one step, per variant."""
    rows = []
    for variant in (DEFAULT_VARIANT, BASELINE_VARIANT):
        model = build(variant, args, sizes).train()
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, sizes["vocab_size"], (args.batch, args.seg_len + 1), generator=g).to(args.device)
        memory = fill_memory(model, tokens, args)
        results = {}
        for backend in ("eager", args.backend):
            model.attention_backend = backend
            model.zero_grad(set_to_none=True)
            out = model(tokens[:, :-1], targets=tokens[:, 1:], memory=memory, mem_len=args.mem_len)
            out.nll.float().mean().backward()
            grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results[backend] = (out.nll.float(), grads, out.memory)
        (nll_e, grad_e, mem_e), (nll_f, grad_f, mem_f) = results["eager"], results[args.backend]
        loss_rel = ((nll_f.mean() - nll_e.mean()).abs() / nll_e.mean().abs()).item()
        nll_max = (nll_f - nll_e).abs().max().item()
        grad_rel = ((grad_f - grad_e).norm() / grad_e.norm()).item()
        z_max = max(((a.float() - b.float()).abs().max().item() for a, b in
                     zip(mem_f.log_normalizers, mem_e.log_normalizers)), default=0.0)
        rows.append(f"| {variant} | {loss_rel:.2e} | {nll_max:.2e} | {grad_rel:.2e} | {z_max:.2e} |")
        del model
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--backend", default="flex", choices=("eager", "flex"))
    p.add_argument("--seg-len", type=int, default=512)
    p.add_argument("--mem-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--tiny", action="store_true", help="a 2-layer d-32 model (the CPU smoke run)")
    p.add_argument("--command", default="", help="the command line to record in the report")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.device is None:
        return 2
    args.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    sizes = TINY if args.tiny else BASE
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    lines = [f"## {name}: {'tiny' if args.tiny else '~350M'} LaMemo and Transformer-XL, "
             f"{str(args.dtype).replace('torch.', '')}, {args.backend} attention", "",
             f"    {args.command or ' '.join(sys.argv)}", "",
             f"torch {torch.__version__}; N = {args.seg_len}, M = {args.mem_len}, batch {args.batch} "
             f"({args.batch * args.seg_len} tokens / step), {sizes}; median of {args.steps} steps after "
             f"{args.warmup} warm-up steps (forward + backward + AdamW).", "",
             "| variant | parameters | median ms / step | min | tokens / s | model TFLOP/s | MFU | peak memory GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    results = {}
    for variant in (DEFAULT_VARIANT, BASELINE_VARIANT):
        r = results[variant] = measure(variant, args, sizes)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        lines.append(f"| {variant} ({'LaMemo' if variant_traits(variant).looks_ahead else 'XL'}) | {r['params'] / 1e6:.1f} M | "
                     f"{r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops']:.1f} | {mfu} | {mem} |")
        print(lines[-1], flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    lines += ["", f"LaMemo / XL step time: {results[3]['median_s'] / results[0]['median_s']:.3f}; dense peak "
              f"used for MFU: {results[3]['peak_tflops']} TFLOP/s.", "",
              f"Fused ({args.backend}) against eager, one training step on the same weights and memory:", "",
              "| variant | mean-loss rel. diff | max per-token nll diff | gradient rel. diff (L2) | max Z-bar diff |",
              "|---|---:|---:|---:|---:|"]
    lines += equality(args, sizes)
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "a") as f:
        f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
