"""Prepare the data of configs/mixture-cpu.yaml: WikiText-2 and Tiny Shakespeare (shipped in tests/data), one
sentencepiece BPE tokenizer trained on both training texts, four token files.

    python tools/prepare_mixture_example.py --out-dir runs/mixture-data

Writes ``<out-dir>/tokenizer``, ``<out-dir>/{wikitext2,shakespeare}/{train,valid}`` (token-file prefixes) and,
for Tiny Shakespeare, which has no official split, ``shakespeare/{train,valid}.txt``: its lines cut at 90 %.
Re-running keeps up-to-date outputs (as tools/preprocess_data.py does). ``--limit-chars`` keeps only the first
characters of every text (for quick tests). Bad input stops with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import lzma
from collections.abc import Sequence
from pathlib import Path

from pretrain.cli_args import OneLineParser, non_negative_int, positive_int
from pretrain.data.cli import run_tool
from pretrain.data.indexed import preprocess, read_meta
from pretrain.data.tokenizer import load_tokenizer, train_tokenizer

CORPORA = Path(__file__).resolve().parents[2] / "tests" / "data"
"""The shipped corpora (tests/data/README.md gives their provenance and licences)."""
SHAKESPEARE_VALID_FROM = 0.9
"""Tiny Shakespeare's lines from this fraction on are its validation split."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="tools/prepare_mixture_example.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/mixture-data", help="where to write (default runs/mixture-data)")
    p.add_argument("--vocab-size", type=positive_int, default=4000, help="BPE vocabulary size (default 4000)")
    p.add_argument("--limit-chars", type=non_negative_int, default=0,
                   help="keep only the first N characters of every text (0: all; for quick tests)")
    p.add_argument("--workers", type=positive_int, default=2, help="tokenizing processes (default 2)")
    return p


def _texts(out: Path, limit: int) -> dict[str, dict[str, Path]]:
    """{source: {split: text file}}; Shakespeare split by lines, everything cut to ``limit`` chars if set."""
    texts = {"wikitext2": {split: CORPORA / "wikitext-2" / f"{split}.txt.xz" for split in ("train", "valid")}}
    lines = lzma.open(CORPORA / "tinyshakespeare" / "input.txt.xz", "rt", encoding="utf-8").read().splitlines(True)
    cut = int(len(lines) * SHAKESPEARE_VALID_FROM)
    shakespeare = {"train": "".join(lines[:cut]), "valid": "".join(lines[cut:])}
    texts["shakespeare"] = {}
    for split, text in shakespeare.items():
        path = out / "shakespeare" / f"{split}.txt"
        texts["shakespeare"][split] = _write(path, text[:limit] if limit else text)
    if limit:
        for split, path in list(texts["wikitext2"].items()):
            text = lzma.open(path, "rt", encoding="utf-8").read(limit)
            texts["wikitext2"][split] = _write(out / "wikitext2" / f"{split}.txt", text)
    return texts


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:   # unchanged text keeps outputs up to date
        path.write_text(text, encoding="utf-8")
    return path


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out_dir)
    texts = _texts(out, args.limit_chars)
    tokenizer_dir = out / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        train_tokenizer("bpe", [texts["wikitext2"]["train"], texts["shakespeare"]["train"]], tokenizer_dir,
                        vocab_size=args.vocab_size, character_coverage=1.0)
    print(f"{tokenizer_dir}: {load_tokenizer(tokenizer_dir).vocab_size} ids (BPE on both training texts)")
    for source, splits in texts.items():
        for split, text in splits.items():
            prefix = preprocess([text], tokenizer_dir, out / source / split, workers=args.workers, progress=False)
            print(f"{prefix}: {read_meta(prefix)['num_tokens']:,} tokens")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
