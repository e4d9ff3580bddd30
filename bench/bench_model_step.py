#!/usr/bin/env python
"""LaMemo (variant 3) against Transformer-XL (variant 0), and optionally against the paper's official release.

    .venv/bin/python bench/bench_model_step.py [--repeats 9] [--device cpu]                 # training step
    .venv/bin/python bench/bench_model_step.py --mode eval --seg-len 64 --mem-len 1024 --batch 4
    .venv/bin/python bench/bench_model_step.py --release /path/to/LaMemo/pytorch            # + the release

Training (default, issue 2): N = M = 128, d = 256, 4 layers, 8 heads, d_ff = 1024, batch 8, fp32, forward +
backward with a full memory. Evaluation (``--mode eval``): one segment's forward with targets under no_grad.
All models are timed in the same process, interleaved, median of the repeats; the measured ratios are printed
next to the multiply-add ratios of docs/method.md §6 (lamemo_parallel.flops).

``--release DIR`` also times the official release's LaMemo (its ``mem_transformer.py`` in DIR, with DIR/utils,
loaded from there: it is not part of this repository) on the same weights (``convert.to_official_state_dict``),
and prints the largest |difference| of the per-token losses between it and ours.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lamemo_parallel import LaMemoConfig, LaMemoModel  # noqa: E402
from lamemo_parallel.config import BASELINE_VARIANT as XL, DEFAULT_VARIANT as LAMEMO, variant_traits  # noqa: E402
from lamemo_parallel.flops import StepShape, forward_macs, training_flops  # noqa: E402


def build(variant, args):
    torch.manual_seed(0)
    cfg = LaMemoConfig(vocab_size=args.vocab, n_layer=args.layers, d_model=args.d_model, n_head=args.heads,
                       d_inner=args.d_inner, variant=variant, tgt_len=args.seg_len, mem_len=args.mem_len)
    model = LaMemoModel(cfg).to(args.device)
    model.attention_backend = args.backend
    return model.train(args.mode == "train")


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """One timed call = one segment's loss (forward), and its backward when training."""

    model: torch.nn.Module
    args: argparse.Namespace

    def nll(self) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self):
        if self.args.mode == "eval":
            with torch.no_grad():
                self.nll()
        else:
            self.nll().mean().backward()
            self.model.zero_grad(set_to_none=True)


class Ours(Runner):
    """Our model."""

    def __init__(self, model, tokens, args):
        self.model, self.tokens, self.args = model, tokens, args
        mem = None
        with torch.no_grad():     # fill the memory to M = mem_len
            while mem is None or mem.length < args.mem_len:
                mem = model(tokens[:, :-1], memory=mem, mem_len=args.mem_len).memory
        self.memory = mem

    def nll(self):
        return self.model(self.tokens[:, :-1], targets=self.tokens[:, 1:], memory=self.memory,
                          mem_len=self.args.mem_len).nll


class Release(Runner):
    """The official release's MemTransformerLM on our weights (time-major [T, B])."""

    def __init__(self, ours: LaMemoModel, tokens, args):
        sys.path[:0] = [args.release, str(Path(args.release) / "utils")]
        import mem_transformer  # noqa: the release, from the user's path
        from lamemo_parallel.convert import to_official_state_dict
        c = ours.config
        self.model = mem_transformer.MemTransformerLM(
            c.vocab_size, c.n_layer, c.n_head, c.d_model, c.d_head, c.d_inner, 0.0, 0.0, tie_weight=True,
            d_embed=c.d_model, div_val=1, tie_projs=[False], pre_lnorm=c.pre_lnorm, tgt_len=args.seg_len,
            ext_len=0, mem_len=args.mem_len, cutoffs=[], attn_type=c.variant, clamp_len=c.clamp_len)
        self.model.load_state_dict(to_official_state_dict(ours), strict=False)
        self.model.to(args.device).train(args.mode == "train")
        self.args = args
        self.data, self.target = tokens[:, :-1].t().contiguous(), tokens[:, 1:].t().contiguous()
        self.mems = tuple()
        with torch.no_grad():
            while not self.mems or self.mems[0].shape[0] < args.mem_len:
                self.mems = self._call()[1]

    def _call(self):
        out = self.model(self.data, self.target, *self.mems)
        if self.model.training:                  # [loss, mem_loss, *mems]
            return out[0], tuple(out[2:])
        return out[0][0], tuple(out[0][1:])      # ([loss, *mems], analysis)

    def nll(self):
        return self._call()[0].t()               # [B, N]


def timed(fn, args):
    """(wall seconds, CPU seconds of this process) of one call. On a loaded machine the CPU time of a
    one-thread run is the steadier figure (it does not count the time other processes hold the core)."""
    sync(args)
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(args)
    return time.perf_counter() - start, time.process_time() - cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("eager", "flex"), default="eager")
    p.add_argument("--seg-len", type=int, default=128)
    p.add_argument("--mem-len", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-inner", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--release", default=None, help="directory of the official release's mem_transformer.py")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seg_len + 1), generator=g).to(args.device)
    models = {v: build(v, args) for v in (XL, LAMEMO)}
    runners = {"XL": Ours(models[XL], tokens, args), "LaMemo": Ours(models[LAMEMO], tokens, args)}
    if args.release:
        runners["release"] = Release(models[LAMEMO], tokens, args)
        with torch.no_grad():
            diff = (runners["release"].nll() - runners["LaMemo"].nll()).abs().max().item()
    for run in runners.values():   # warm-up
        run()
    walls, cpus = {name: [] for name in runners}, {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            wall, cpu = timed(run, args)
            walls[name].append(wall)
            cpus[name].append(cpu)
    med = {name: statistics.median(t) for name, t in walls.items()}
    cpu_med = {name: statistics.median(t) for name, t in cpus.items()}

    def macs(v, vocab=args.vocab):
        shape = StepShape(args.layers, args.d_model, args.d_inner, vocab, args.seg_len, args.mem_len,
                          lookahead=variant_traits(v).looks_ahead)
        if args.mode == "eval":
            return forward_macs(shape, include_output=vocab > 0)
        return training_flops(shape) / 2

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"mode={args.mode} backend={args.backend} device={args.device} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} N={args.seg_len} M={args.mem_len} d={args.d_model} "
          f"d_ff={args.d_inner} L={args.layers} H={args.heads} B={args.batch} V={args.vocab} fp32 "
          f"repeats={args.repeats}")
    print(f"load: {load}")
    for name in runners:
        print(f"{name:8s}: wall median {med[name] * 1e3:8.1f} ms  (min {min(walls[name]) * 1e3:.1f}, "
              f"max {max(walls[name]) * 1e3:.1f});  CPU median {cpu_med[name] * 1e3:8.1f} ms  "
              f"(min {min(cpus[name]) * 1e3:.1f})")
    print(f"measured ratio LaMemo/XL: {med['LaMemo'] / med['XL']:.3f} wall, "
          f"{cpu_med['LaMemo'] / cpu_med['XL']:.3f} CPU")
    print(f"multiply-add ratio LaMemo/XL (docs/method.md §6): {macs(LAMEMO) / macs(XL):.3f} with the output layer, "
          f"{macs(LAMEMO, 0) / macs(XL, 0):.3f} layer stack only")
    if args.release:
        print(f"measured ratio LaMemo/release: {med['LaMemo'] / med['release']:.3f} wall, "
              f"{cpu_med['LaMemo'] / cpu_med['release']:.3f} CPU  (max |nll difference| {diff:.2e})")


if __name__ == "__main__":
    main()
