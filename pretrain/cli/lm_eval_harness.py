"""lm-evaluation-harness's command line with the ``lamemo`` model type registered (``pretrain.lm_eval_model``):
every argument is lm-eval's own.

    lamemo-lm-eval --model lamemo --model_args pretrained=EXPORT[,tgt_len=128,mem_len=256,device=cpu] \\
        --tasks wikitext [--include_path DIR_OF_TASK_YAMLS] [--output_path out/]

Requires the ``[eval]`` extra (lm-eval).
"""
from __future__ import annotations

import importlib

import sys


def main(argv: list[str] | None = None) -> int:
    try:      # lm-eval is an optional extra ([eval]): imported only here, and its absence is one error line
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: lamemo-lm-eval needs lm-evaluation-harness: pip install 'lamemo-pretrain[eval]'",
              file=sys.stderr)
        return 2
    importlib.import_module("pretrain.lm_eval_model")     # registers the "lamemo" model type with lm-eval
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except (OSError, ValueError) as err:        # e.g. no export at pretrained=..., a tokenizer that does not fit
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
