#!/usr/bin/env python
"""Export a training checkpoint to a single-device directory that loads with plain torch.

    python tools/export_checkpoint.py RUN_DIR/checkpoints/step_00001000 OUT
    python tools/export_checkpoint.py RUN_DIR OUT          # the newest complete checkpoint of a run

The checkpoint's manifest is verified first (missing / truncated files, interrupted saves). The weights were
merged over tensor-, pipeline- and ZeRO-shards when the checkpoint was saved (checkpoints/*/consolidated);
the export checks them against the model config, writes config.json + model.safetensors + tokenizer/, and
loads the result with lamemo_parallel.LaMemoModel to prove it (no deepspeed or megatron-core needed).
"""
from __future__ import annotations

import argparse
import sys

import _bootstrap  # noqa: F401
from pretrain.cli_args import OneLineParser

from lamemo_parallel import CheckpointMismatchError


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_N) or a run directory")
    parser.add_argument("out", help="output directory")
    args = parser.parse_args(argv)
    from pretrain.checkpoint import CheckpointError
    from pretrain.export import export_checkpoint
    try:
        model, meta, ckpt = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, CheckpointMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = model.config
    print(f"exported step {meta['step']} of {ckpt}: variant {c.variant}, {c.n_layer} layers, d_model {c.d_model}, "
          f"{model.num_parameters():,} parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
