#!/usr/bin/env python
"""Issue 26's part of the GPU check (bench/gpu_check.sh): ``parallel.recompute`` none / attention / full on one
device, and a training step of DeepSpeed's pipeline engine with the fused attention (issue 21).

    python bench/gpu_check_recompute.py recompute --out bench/RESULTS-gpu.md           # on the GPU
    python bench/gpu_check_recompute.py recompute --device cpu --tiny --out x.md      # the CPU smoke run
    python -m torch.distributed.run --nproc-per-node=S bench/gpu_check_recompute.py pipeline --out ...

``recompute``: issue 26's setting (N = M = 512, d 256, 8 heads, 4 layers, batch 4, the byte vocabulary, dropout
0.1; see bench/bench_recompute.py for why) with each attention backend, the three settings interleaved step by
step on the same weights, memory and tokens. Per setting: the activations' peak (CUDA ``max_memory_allocated``
during the step minus what was allocated when it began: weights, gradients of the previous step are freed,
memory), the median step time, and whether its losses equal ``none``'s bit for bit.

``pipeline``: one process per pipeline stage (S = the GPUs available, at most 2: NCCL refuses two ranks on one
GPU, so on one GPU the engine runs a single stage, the schedule and the stage modules without the p2p);
``parallel.attention_backend`` as given (flex on the GPU), a few training steps of ``PipelineEngine`` from the
model builder, and a check that every stage's layers run that backend.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from lamemo_parallel import LaMemoConfig, LaMemoModel  # noqa: E402
from lamemo_parallel.attention import attention_backend_of, use_selective_recompute  # noqa: E402
from lamemo_parallel.config import DEFAULT_VARIANT, RECOMPUTE_MODES  # noqa: E402

from gpu_check import resolve_device, sync  # noqa: E402

#: Issue 26's acceptance setting (bench/bench_recompute.py) and the CPU smoke run's.
SETTING = dict(n_layer=4, d_model=256, n_head=8, d_inner=1024, vocab_size=257, seg_len=512, batch=4)
TINY = dict(n_layer=2, d_model=32, n_head=2, d_inner=64, vocab_size=50, seg_len=8, batch=2)


def recompute_table(args) -> list[str]:
    s = TINY if args.tiny else SETTING
    N, device = s["seg_len"], args.device
    config = LaMemoConfig(vocab_size=s["vocab_size"], n_layer=s["n_layer"], d_model=s["d_model"],
                          n_head=s["n_head"], d_inner=s["d_inner"], variant=DEFAULT_VARIANT, tgt_len=N, mem_len=N,
                          dropout=0.1)
    torch.manual_seed(0)
    model = LaMemoModel(config).to(device).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, s["vocab_size"], (s["batch"], N + 1), generator=g).to(device)
    memory = None
    with torch.no_grad():
        while memory is None or memory.length < N:
            memory = model(tokens[:, :-1], memory=memory, mem_len=N).memory
    lines = [f"### parallel.recompute on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}", "",
             f"N = M = {N}, {s}, fp32, dropout 0.1; {args.steps} steps per setting after {args.warmup} warm-up "
             "steps, the settings interleaved; activations' peak = max_memory_allocated during a step minus what "
             "was allocated when it began.", "",
             "| backend | recompute | activations' peak MiB | x none | median ms / step | x none | losses == none |",
             "|---|---|---:|---:|---:|---:|---|"]
    for backend in args.backends:
        model.attention_backend = backend
        peaks = {m: [] for m in RECOMPUTE_MODES}
        times = {m: [] for m in RECOMPUTE_MODES}
        losses = {m: [] for m in RECOMPUTE_MODES}
        for step in range(args.warmup + args.steps):
            for mode in RECOMPUTE_MODES:
                model.activation_checkpointing = mode == "full"
                use_selective_recompute(model, mode)
                torch.manual_seed(100 + step)                 # the same dropout masks for every setting
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                nll = model(tokens[:, :-1], targets=tokens[:, 1:], memory=memory, mem_len=N).nll
                nll.float().mean().backward()
                model.zero_grad(set_to_none=True)
                sync(device)
                if step >= args.warmup:
                    times[mode].append(time.perf_counter() - start)
                    losses[mode].append(nll.detach())
                    if device.type == "cuda":
                        peaks[mode].append(torch.cuda.max_memory_allocated(device) - before)
        base_t = statistics.median(times["none"])
        base_p = statistics.median(peaks["none"]) if peaks["none"] else None
        for mode in RECOMPUTE_MODES:
            t = statistics.median(times[mode])
            p = statistics.median(peaks[mode]) if peaks[mode] else None
            same = all(torch.equal(a, b) for a, b in zip(losses[mode], losses["none"], strict=True))
            lines.append(f"| {backend} | {mode} | {p / 2 ** 20:.1f} | {p / base_p:.2f} |" if p is not None
                         else f"| {backend} | {mode} | n/a | n/a |")
            lines[-1] += f" {t * 1e3:.1f} | {t / base_t:.2f} | {'yes' if same else 'NO'} |"
    return lines


def pipeline_step(args) -> tuple[list[str], bool]:
    """A few steps of the pipeline engine (one stage per process) with ``args.backend``; runs under torchrun."""
    from megatron.core import parallel_state

    from pretrain.config import load_config
    from pretrain.distributed import init_distributed
    from pretrain.engines.pipeline import PipelineEngine
    from pretrain.layout import Layout
    stages = int(os.environ.get("WORLD_SIZE", "1"))
    s = TINY if args.tiny else SETTING
    N = s["seg_len"]
    overrides = [f"model.vocab_size={s['vocab_size']}", f"model.n_layer={max(s['n_layer'], stages)}",
                 f"model.d_model={s['d_model']}", f"model.n_head={s['n_head']}", f"model.d_inner={s['d_inner']}",
                 f"data.tgt_len={N}", f"data.mem_len={N}", f"data.micro_batch_size={s['batch']}",
                 "data.micro_batches=2", f"parallel.pipeline={stages}", f"parallel.attention_backend={args.backend}",
                 f"parallel.precision={'bf16' if args.device.type == 'cuda' else 'fp32'}"]
    config = load_config(ROOT / "configs" / "tiny-cpu.yaml", overrides)
    init_distributed(args.device)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=stages)
    engine = PipelineEngine(config, Layout(world_size=stages, tensor=1, pipeline=stages, data=1), s["vocab_size"],
                            args.device)
    backends = attention_backend_of(engine.model)
    g = torch.Generator().manual_seed(3)
    results = []
    for _ in range(args.steps):
        micro = [(torch.randint(0, s["vocab_size"], (s["batch"], N), generator=g),
                  torch.randint(0, s["vocab_size"], (s["batch"], N), generator=g)) for _ in range(2)]
        results.append(engine.train_step(micro))
    losses = [r.loss for r in results]
    ok = backends == {args.backend} and all(torch.isfinite(torch.tensor(losses)))
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    return [f"### Pipeline engine with attention_backend={args.backend} on {name}", "",
            f"{stages} stage(s), one per process, {config.model.n_layer} layers, N = M = {N}, 2 micro-batches of "
            f"{s['batch']}, {config.parallel.precision}; stage 0's layers run {sorted(backends)}; losses of "
            f"{args.steps} steps: " + ", ".join(f"{x:.4f}" for x in losses) + "; median step "
            f"{statistics.median(r.seconds for r in results) * 1e3:.1f} ms: **{'ok' if ok else 'FAILED'}**"], ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("recompute", "pipeline"))
    p.add_argument("--out", required=True, help="markdown report to append to")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", nargs="+", default=["eager", "flex"], help="recompute: the attention backends")
    p.add_argument("--backend", default="flex", help="pipeline: the attention backend")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 2-layer d-32 model (the CPU smoke run)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    if args.device is None:
        return 2
    ok = True
    if args.what == "recompute":
        lines = recompute_table(args)
    else:
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        lines, ok = pipeline_step(args)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0 if ok else 1
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    with open(args.out, "a") as f:
        f.write("\n" + text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
