"""Import a state dict saved by the paper's official release (thu-coai/LaMemo) into a from_pretrained directory.

    python tools/import_official_checkpoint.py SRC.pt OUT_DIR [--pre-lnorm] [--clamp-len 400] [--variant 33]

n_layer, d_model, n_head, d_head, d_inner, the vocabulary size and the variant are read off the tensors;
what the tensors cannot tell (pre-LN, clamp_len, default segment / memory lengths, 33 versus 3) comes from flags.
"""
from __future__ import annotations

import argparse
import sys

from lamemo_parallel.config import SUPPORTED_VARIANTS, ConfigError
from lamemo_parallel.convert import OfficialImportError, import_official, read_official_state_dict
from pretrain.cli_args import OneLineParser, non_negative_int, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="state dict file saved by the release (torch.save(model.state_dict()))")
    parser.add_argument("out", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--variant", type=int, choices=list(SUPPORTED_VARIANTS), default=None,
                        help="attn_type; inferred from the tensors (3 and 33 are indistinguishable: default 3)")
    parser.add_argument("--pre-lnorm", action="store_true", help="the model was trained with --pre_lnorm")
    parser.add_argument("--clamp-len", type=int, default=-1, help="clamp relative distances (<= 0: off)")
    parser.add_argument("--tgt-len", type=positive_int, default=128, help="default segment length stored in config.json")
    parser.add_argument("--mem-len", type=non_negative_int, default=None,
                        help="default memory length stored in config.json (default: equal to the segment length)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow a whole pickled model (unsafe unpickling) when SRC is not a plain state dict")
    args = parser.parse_args(argv)
    try:
        state = read_official_state_dict(args.src, trust_pickle=args.trust_pickle)
        model = import_official(state, variant=args.variant, pre_lnorm=args.pre_lnorm, clamp_len=args.clamp_len,
                                tgt_len=args.tgt_len, mem_len=args.mem_len)
    except (OfficialImportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    c = model.config
    print(f"imported variant {c.variant}: {c.n_layer} layers, d_model {c.d_model}, {c.n_head}x{c.d_head} heads, "
          f"d_inner {c.d_inner}, vocabulary {c.vocab_size}, {model.num_parameters():,} parameters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
