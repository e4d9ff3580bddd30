"""Tokenize text files / folders into a memory-mapped token file (megatron-core .bin/.idx + .meta.json).

    python tools/preprocess_data.py --input data/demo/train.txt --tokenizer runs/tok --output-prefix data/demo/train
    python tools/preprocess_data.py --input data/wikitext-103/train.txt --tokenizer tok/wt103 \\
        --output-prefix data/wt103/train --workers 2

Each plain file is one document and each line of a ``.jsonl`` file (field ``--json-key``) is one;
documents are separated by <eos>. Uses ``--workers`` processes and shows a progress bar. Safe to re-run
after an interruption: outputs appear only when complete, and an up-to-date output is kept (``--force``
rebuilds). Bad input stops with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from pretrain.cli_args import OneLineParser
from pretrain.data.cli import run_tool
from pretrain.data.errors import DataError
from pretrain.data.indexed import preprocess, read_meta


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text/.jsonl files or folders")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory from tools/train_tokenizer.py")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="writes PREFIX.bin, .idx, .meta.json")
    p.add_argument("--workers", type=int, default=2, help="tokenizing processes (default 2)")
    p.add_argument("--chunk-mb", type=float, default=1.0, help="text per work item in MB (default 1)")
    p.add_argument("--json-key", default="text", help="document field of .jsonl inputs (default text)")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        raise DataError(f"--workers must be at least 1, got {args.workers}")
    if args.chunk_mb <= 0:
        raise DataError(f"--chunk-mb must be positive, got {args.chunk_mb}")
    start = time.perf_counter()
    prefix = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                        chunk_bytes=int(args.chunk_mb * (1 << 20)), json_key=args.json_key,
                        progress=not args.no_progress, force=args.force)
    meta = read_meta(prefix)
    print(f"{prefix}: {meta['num_tokens']:,} tokens in {meta['num_documents']:,} documents "
          f"({meta['dtype']}, vocab {meta['vocab_size']}) in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with an ``error:`` line for bad input)."""
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
