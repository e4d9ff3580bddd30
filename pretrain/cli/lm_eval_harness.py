"""lm-evaluation-harness's command line with the ``lamemo`` model type registered (``pretrain.lm_eval_model``):
every argument is lm-eval's own.

    lamemo-lm-eval --model lamemo --model_args pretrained=EXPORT[,tgt_len=128,mem_len=256,device=cpu] \\
        --tasks wikitext [--include_path DIR_OF_TASK_YAMLS] [--output_path out/]

Requires the ``[eval]`` extra (lm-eval).
"""
from __future__ import annotations

import importlib
import sys


def _lamemo_export(args: list[str]) -> str | None:
    """The ``pretrained=`` directory of ``--model lamemo --model_args ...`` (lm-eval's own argument syntax), if
    given."""
    from lm_eval.utils import simple_parse_args_string      # the optional extra, present once main got here
    value = {}
    for flag in ("--model", "--model_args"):
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                value[flag] = args[i + 1]
            elif arg.startswith(flag + "="):
                value[flag] = arg.split("=", 1)[1]
    if value.get("--model") != "lamemo" or "--model_args" not in value:
        return None
    return simple_parse_args_string(value["--model_args"]).get("pretrained")


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
        # lm-eval indexes its thousands of task files before it makes the model: a wrong path is said at once
        lamemo_export = _lamemo_export(sys.argv[1:])
        if lamemo_export is not None:
            from lamemo_parallel.model_files import require_model_dir     # torch: only once the command runs
            require_model_dir(lamemo_export)
        cli_evaluate()
    except (OSError, ValueError) as err:        # e.g. no export at pretrained=..., a tokenizer that does not fit
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
