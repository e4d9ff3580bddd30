"""Train a tokenizer and save it as a directory (lamemo_tokenizer.json + model files).

    python tools/train_tokenizer.py --kind bpe --input data/demo/train.txt --output runs/tok --vocab-size 4000
    python tools/train_tokenizer.py --kind word --input data/wikitext-103/train.txt --output tok/wt103
    python tools/train_tokenizer.py --kind byte --output tok/bytes

Kinds: ``bpe`` / ``unigram`` (sentencepiece), ``byte`` (256 bytes + <eos>, nothing to train), ``word``
(WikiText-style vocabulary from the training split only, <eos> per line). Train on the training split
only. Bad input stops with one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretrain.cli_args import OneLineParser, non_negative_int, positive_int, probability
from pretrain.data.cli import run_tool
from pretrain.data.errors import DataError
from pretrain.data.tokenizer import KINDS, train_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--input", nargs="+", default=[], metavar="PATH",
                   help="training text files or folders (.xz/.gz read as is); ignored for --kind byte")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to save the tokenizer into")
    sp = p.add_argument_group("bpe / unigram (sentencepiece)")
    sp.add_argument("--vocab-size", type=positive_int, help="vocabulary size (default 8000)")
    sp.add_argument("--character-coverage", type=probability, help="share of characters covered (default 0.9995)")
    sp.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=None,
                    help="unknown characters become byte pieces (default on: exact round trip)")
    sp.add_argument("--max-sentences", type=positive_int, help="sample at most this many lines (default all)")
    sp.add_argument("--num-threads", type=positive_int)
    sp.add_argument("--seed", type=non_negative_int)
    sp.add_argument("--spm-option", action="append", default=[], metavar="KEY=VALUE",
                    help="any other sentencepiece trainer option, e.g. split_digits=true")
    wd = p.add_argument_group("word")
    wd.add_argument("--lowercase", action="store_true", default=None)
    wd.add_argument("--min-freq", type=positive_int)
    wd.add_argument("--max-size", type=positive_int)
    p.add_argument("--user-symbols", nargs="+", default=None, metavar="SYM",
                   help="extra symbols that are always one id (<eos> is always present)")
    return p


def _spm_options(items: Sequence[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"--spm-option {item!r}: expected KEY=VALUE")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif value.lstrip("-").isdigit():
            out[key] = int(value)
        else:
            out[key] = value
    return out


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "vocab_size": args.vocab_size,
        "character_coverage": args.character_coverage,
        "byte_fallback": args.byte_fallback,
        "max_sentences": args.max_sentences,
        "num_threads": args.num_threads,
        "seed": args.seed,
        "lowercase": args.lowercase,
        "min_freq": args.min_freq,
        "max_size": args.max_size,
        "user_symbols": args.user_symbols,
        "spm_options": _spm_options(args.spm_option) or None,
    }
    # Only what was given: the library rejects options that do not apply to the kind, by name.
    options = {k: v for k, v in options.items() if v is not None}
    if args.kind != "byte" and not args.input:
        raise DataError(f"--input is required for --kind {args.kind}")
    tokenizer = train_tokenizer(args.kind, args.input, args.output, **options)
    print(f"saved {tokenizer.kind} tokenizer (vocab_size {tokenizer.vocab_size}, "
          f"eos_id {tokenizer.eos_id}) to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with an ``error:`` line for bad input)."""
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
