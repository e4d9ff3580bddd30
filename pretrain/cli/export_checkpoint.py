"""Export a training checkpoint to a single-device directory that loads with plain torch.

    python tools/export_checkpoint.py RUN_DIR/checkpoints/step_00001000 OUT
    python tools/export_checkpoint.py RUN_DIR OUT                  # the newest complete checkpoint of a run
    python tools/export_checkpoint.py RUN_DIR OUT --dtype bfloat16

Offline, from the checkpoint's shards (any TP / PP / DP / ZeRO layout): no process group, no GPU. The
manifest is verified first (missing, truncated or corrupted files, interrupted saves, unsafe pickles); then
every parameter is merged from its shards one tensor at a time (peak memory about the largest tensor) from the
optimizer's fp32 master copy, cast to --dtype and appended to OUT/model.safetensors, with config.json,
export.json (step, dtype, source) and tokenizer/. The result loads with lamemo_parallel.LaMemoModel, which needs
neither deepspeed nor megatron-core.

OUT is written atomically (a staging directory beside it, moved into place in one rename; with --force the
old export is replaced only once the new one is complete): a kill, a full disk or a read-only directory
leaves OUT as it was, and every failure is one ``error:`` line, exit 2. export.json records the source
checkpoint's manifest hash and the tokenizer's fingerprint.
"""
from __future__ import annotations

import argparse
import signal
import sys

from pretrain.cli_args import OneLineParser


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory (checkpoints/step_N) or a run directory")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the exported weights (default float32, the master copy itself)")
    parser.add_argument("--force", action="store_true", help="replace a model already exported to OUT")
    args = parser.parse_args(argv)
    # A file-size limit (ulimit -f) would otherwise kill the process with SIGXFSZ mid-write; ignored, the
    # write fails with EFBIG and is reported like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # torch loads with the checkpoint package: after the arguments, so --help and usage errors answer at once
    from pretrain.checkpoint import CheckpointError
    from pretrain.checkpoint.export import export_checkpoint
    try:
        result = export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, overwrite=args.force,
                                   show_progress=True)
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = result.config
    print(f"exported step {result.step} of {result.checkpoint}: variant {c.variant}, {c.n_layer} layers, d_model "
          f"{c.d_model}, {result.parameters:,} parameters as {result.dtype} (from the fp32 master) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
