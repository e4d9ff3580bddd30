"""Verify preprocessed token files against their ``meta.json``: completeness, sizes, the megatron index, the sha256
of ``.bin`` and ``.idx`` and, with ``--tokenizer``, that they were made with that tokenizer.

    python tools/verify_data.py data/wt103/train data/wt103/valid [--tokenizer data/wt103/tokenizer]

One line per prefix (``ok: PREFIX (N tokens, sha256 verified)``); the first problem stops with one
``error: ...`` line and exit code 2. See docs/data.md (integrity policy).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pretrain.cli_args import OneLineParser
from pretrain.data.cli import run_tool
from pretrain.data.indexed import load_tokens
from pretrain.data.tokenizer import load_tokenizer


def _main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="+", metavar="PREFIX", help="token file prefixes (PREFIX.bin/.idx/.meta.json)")
    parser.add_argument("--tokenizer", metavar="DIR", help="also require this tokenizer's fingerprint")
    parser.add_argument("--size-only", action="store_true", help="skip the sha256 (sizes and index only)")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    for prefix in args.prefixes:
        tokens = load_tokens(prefix, verify="size" if args.size_only else "checksum", tokenizer=tokenizer)
        what = "sizes and index checked" if args.size_only else "sha256 verified"
        if tokenizer is not None:
            what += ", tokenizer matches"
        print(f"ok: {prefix} ({len(tokens):,} tokens, {what})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
