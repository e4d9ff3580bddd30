"""Inspect a training checkpoint without a process group and without loading a tensor.

    lamemo-checkpoint info RUN_DIR/checkpoints/step_00001000
    lamemo-checkpoint info RUN_DIR                 # the newest complete checkpoint of a run
    lamemo-checkpoint info RUN_DIR --json          # for scripts

Prints the step, the layout (tensor x pipeline x data, ZeRO stage, precision, pipeline partition), the model,
the streams and the offset they have reached, the memory length, every file with its size, and whether the
checkpoint validates (every file present with its size and sha256, no pickle that could run code). A damaged
checkpoint: the report says which file fails, then one ``error: ...`` line, exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from pretrain.cli_args import OneLineParser


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="lamemo-checkpoint", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    info = commands.add_parser("info", help="what a checkpoint holds, and whether it validates")
    info.add_argument("path", help="a checkpoint directory (checkpoints/step_N) or a run directory (its newest)")
    info.add_argument("--json", action="store_true", help="one JSON object instead of the report")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 and pickle checks (fast)")
    args = parser.parse_args(argv)
    # torch loads with the checkpoint package: after the arguments, so --help and usage errors answer at once
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint.export import resolve_checkpoint
    from pretrain.checkpoint.info import checkpoint_info, describe, to_json
    try:
        report = checkpoint_info(resolve_checkpoint(args.path), verify=not args.no_verify)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_json(report) if args.json else describe(report))
    if report["error"]:
        print(f"error: {report['error']}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
