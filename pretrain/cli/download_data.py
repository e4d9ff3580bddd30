"""Fetch WikiText-103, WikiText-2, enwik8 and text8 from their official sources (checksums verified).

    python tools/download_data.py wikitext-103 enwik8 --out-dir data
    python tools/download_data.py wikitext-2 --out-dir data --from /mnt/archives   # no network: local copies
    python tools/download_data.py demo --out-dir data                               # offline demo corpus

Writes ``<out-dir>/<name>/{train,valid,test}.txt`` and ``SOURCE.json``. enwik8 / text8 use the standard
90M / 5M / 5M split. ``--from DIR`` takes the official archive (e.g. ``enwik8.zip``) or the extracted
files (e.g. ``wiki.train.tokens``) from DIR and verifies them like a download. ``demo`` is not a
download: it writes the Python standard library's own sources as a small corpus (see docs/data.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pretrain.cli_args import OneLineParser
from pretrain.data.cli import run_tool
from pretrain.data.download import CORPORA, prepare, prepare_demo


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", choices=[*CORPORA, "demo"], metavar="DATASET",
                   help=f"one or more of: {', '.join(CORPORA)}, demo")
    p.add_argument("--out-dir", default="data", help="where <name>/ folders are written (default data)")
    p.add_argument("--from", dest="local_dir", metavar="DIR", help="use local copies from DIR, no network")
    p.add_argument("--delete-archive", action="store_true", help="remove the downloaded archive afterwards")
    p.add_argument("--no-progress", action="store_true")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name in args.datasets:
        if name == "demo":
            out = prepare_demo(args.out_dir)
        else:
            out = prepare(name, args.out_dir, local_dir=args.local_dir, keep_archive=not args.delete_archive,
                          progress=not args.no_progress)
        print(f"{name}: {out}/{{train,valid,test}}.txt")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with an ``error:`` line for bad input)."""
    return run_tool(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
