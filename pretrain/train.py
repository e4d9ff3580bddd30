"""Entry point: ``python -m pretrain.train --config CONFIG [section.key=value ...]``.

One process directly, or N processes under torchrun / srun (data parallel = world / (tensor x pipeline)).
The run itself is ``pretrain.trainer``; this module parses the command line, loads the config and turns the
outcome into the exit codes of docs/reliability.md: 0 finished (or stopped cleanly on a signal), 2 bad input
(config, data, checkpoint, run directory: one ``error:`` line), 3 divergence, 1 any other failure after
start-up, 130 a second Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch.distributed as dist

from .cli_args import OneLineParser
from .config import load_config
from .run_errors import USER_ERRORS, RunFailed
from .startup import dry_run
from .trainer import run


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m pretrain.train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything, print the resolved config, parameters and memory per rank, the "
                             "layout and steps per epoch, then exit (nothing is built or written)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. parallel.tensor=2")
    args = parser.parse_args(argv)
    code = 0
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(config)
        run(config)
    except (*USER_ERRORS, OSError) as err:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        code = 2
    except RunFailed as err:          # after start-up: printed by every rank that saw it
        if err.every_rank or not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; " + "the newest complete checkpoint is kept", file=sys.stderr, flush=True)
        code = 130
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
