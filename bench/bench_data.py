"""Data benchmarks: preprocessing throughput (1 and 2 workers) and the loader's time per step.

    .venv/bin/python bench/bench_data.py [--repeats 3] [--steps 2000]

Preprocessing: WikiText-2 train (10.8 MB, decompressed once into a temporary folder so xz decoding is
not measured) -> .bin/.idx/.meta.json, for the word, BPE (8k, trained on the same split) and byte
tokenizers, with 1 and 2 worker processes; then the same text five times over (54 MB) for word and
BPE. Throughput = input MB (10^6 bytes) / wall seconds, best of ``--repeats``, the one-off megatron-core
import excluded (it is paid once per process, ~2.7 s here).

Loader: ``SegmentStreams.next_step()`` on the memory-mapped WikiText-2 train tokens (word level) for a
few layouts, mean over ``--steps`` steps after a warm-up; for each layout also ``MixtureStreams.next_step()``
on a three-source mixture of the same file (its first half, next quarter and last quarter as three sources,
weights 0.5 / 0.3 / 0.2, default spans of 512 tokens). Prints Markdown rows for bench/RESULTS-data.md.
``--loader-only`` skips the preprocessing rows.
"""

from __future__ import annotations

import argparse
import importlib
import lzma
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.data.indexed import load_tokens, preprocess  # noqa: E402
from pretrain.data.mixture import MixtureStreams  # noqa: E402
from pretrain.data.sources import Source  # noqa: E402
from pretrain.data.streams import SegmentStreams  # noqa: E402
from pretrain.data.tokenizer import train_tokenizer  # noqa: E402

WIKITEXT2 = ROOT / "tests" / "data" / "wikitext-2"

# (name, tgt_len, dp_size, micro_batches, micro_batch_size): the tiny-cpu config's per-rank layout, and
# per-rank shapes of the paper's WikiText-103 (tgt_len 150) and enwik8 (tgt_len 512) runs.
LAYOUTS = [
    ("tiny-cpu (configs/tiny-cpu.yaml)", 32, 1, 2, 4),
    ("wt103-like, rank 0 of 4", 150, 4, 2, 8),
    ("enwik8-like, rank 0 of 2", 512, 2, 1, 11),
]


def bench_preprocess(text_file: Path, tokenizers: dict[str, Path], out: Path, repeats: int,
                     label: str = "") -> list[str]:
    size_mb = text_file.stat().st_size / 1e6
    rows = []
    for name, tok_dir in tokenizers.items():
        times = {}
        for workers in (1, 2):
            best = float("inf")
            for r in range(repeats):
                start = time.perf_counter()
                preprocess([text_file], tok_dir, out / f"{name}{text_file.suffix}-{workers}-{r}", workers=workers,
                           progress=False, force=True)
                best = min(best, time.perf_counter() - start)
            times[workers] = best
        n_tokens = len(load_tokens(out / f"{name}{text_file.suffix}-1-0"))
        rows.append(f"| {name}{label} | {n_tokens:,} | {times[1]:.2f} | {size_mb / times[1]:.1f} | {times[2]:.2f} | "
                    f"{size_mb / times[2]:.1f} | {times[1] / times[2]:.2f}x |")
    return rows


def bench_loader(prefix: Path, steps: int) -> list[str]:
    tokens = load_tokens(prefix)
    start = time.perf_counter()
    load_tokens(prefix, verify="checksum")
    checksum_s = time.perf_counter() - start
    rows = []
    for name, tgt_len, dp, mb, mbs in LAYOUTS:
        single = SegmentStreams(tokens, tgt_len=tgt_len, dp_size=dp, dp_rank=0, micro_batches=mb,
                                micro_batch_size=mbs, roll_seed=0)
        half, three_quarters = len(tokens) // 2, 3 * len(tokens) // 4
        sources = [Source("first-half", 0.5, tokens[:half]), Source("third-quarter", 0.3, tokens[half:three_quarters]),
                   Source("last-quarter", 0.2, tokens[three_quarters:])]
        mixture = MixtureStreams(sources, tgt_len=tgt_len, dp_size=dp, dp_rank=0, micro_batches=mb,
                                 micro_batch_size=mbs, roll_seed=0)
        for label, loader in ((name, single), (f"{name}, 3-source mixture", mixture)):
            steps_here = min(steps, 5 * loader.steps_per_epoch)  # wraps epochs (and re-rolls) if short
            for _ in range(20):
                loader.next_step()
            start = time.perf_counter()
            for _ in range(steps_here):
                loader.next_step()
            per_step = (time.perf_counter() - start) / steps_here
            tokens_per_step = mb * mbs * tgt_len
            rows.append(f"| {label} | {tgt_len} | {mb} x {mbs} | {per_step * 1e6:.0f} | "
                        f"{tokens_per_step / per_step / 1e6:.1f} |")
    rows.append(f"\n`load_tokens(verify=\"checksum\")` of the {len(tokens):,}-token file: {checksum_s * 1e3:.0f} ms "
                f"(`verify=\"size\"`, the default, only stats the files).")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--loader-only", action="store_true", help="only the loader rows (no preprocessing rows)")
    args = parser.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.import_module("megatron.core.datasets.indexed_dataset")     # paid once, not part of throughput
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        text_file = tmp / "wiki.train.tokens"
        text_file.write_bytes(lzma.open(WIKITEXT2 / "train.txt.xz").read())
        start = time.perf_counter()
        tokenizers = {"word": tmp / "tok-word", "bpe 8k": tmp / "tok-bpe", "byte": tmp / "tok-byte"}
        train_tokenizer("word", [text_file], tokenizers["word"])
        word_s = time.perf_counter() - start
        start = time.perf_counter()
        train_tokenizer("bpe", [text_file], tokenizers["bpe 8k"], vocab_size=8000)
        bpe_s = time.perf_counter() - start
        train_tokenizer("byte", [], tokenizers["byte"])
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}, load average at start {os.getloadavg()[0]:.2f}")
        print(f"tokenizer training on WikiText-2 train: word {word_s:.2f} s, bpe 8k {bpe_s:.2f} s\n")
        if args.loader_only:
            preprocess([text_file], tokenizers["word"], tmp / f"word{text_file.suffix}-1-0", workers=2, progress=False)
            loader_rows(tmp / f"word{text_file.suffix}-1-0", args.steps)
            return
        print("| tokenizer | tokens | 1 worker (s) | 1 worker (MB/s) | 2 workers (s) | 2 workers (MB/s) | speed-up |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in bench_preprocess(text_file, tokenizers, tmp, args.repeats):
            print(row)
        # Fixed costs (pool start, ~35 ms; the parent's reading, hashing and writing) weigh on 10.8 MB;
        # the same text five times over shows how the worker processes scale.
        big = tmp / "wiki.train.tokens.x5"
        big.write_bytes(text_file.read_bytes() * 5)
        for row in bench_preprocess(big, {k: tokenizers[k] for k in ("word", "bpe 8k")}, tmp, 2,
                                    label=", WikiText-2 train x5 (54 MB)"):
            print(row)
        loader_rows(tmp / f"word{text_file.suffix}-1-0", args.steps)


def loader_rows(prefix: Path, steps: int) -> None:
    print("\n| layout (per DP rank) | tgt_len | micro-batches x rows | loader us/step | M tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for row in bench_loader(prefix, steps):
        print(row)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
