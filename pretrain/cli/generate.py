"""Sample text from a from_pretrained model: the prompt is fed in segments, then one token at a time.

    python tools/generate.py MODEL_DIR --prompt "The meaning of" [--max-new-tokens 100] [--top-p 0.95]
        [--top-k 0] [--temperature 1.0] [--seed 0] [--segment-len 256] [--mem-len 512] [--clamp-len 400]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pretrain.cli_args import (OneLineParser, clamp_len, device, non_negative_float, non_negative_int, positive_int,
                               probability)
from lamemo_parallel.generation import generate
from pretrain.cli.model_inputs import load_model, model_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="from_pretrained directory")
    parser.add_argument("--prompt", required=True, help="prompt text (or @FILE to read it from a file)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL/tokenizer)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=100)
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=non_negative_int, default=0)
    parser.add_argument("--top-p", type=probability, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segment-len", type=positive_int, default=None, help="prompt segment length (default tgt_len)")
    parser.add_argument("--mem-len", type=non_negative_int, default=None)
    parser.add_argument("--clamp-len", type=clamp_len, default=None)
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, device=args.device)
        tokenizer = model_tokenizer(args.model, args.tokenizer, model.config.vocab_size)
        prompt = Path(args.prompt[1:]).read_text(encoding="utf-8") if args.prompt.startswith("@") else args.prompt
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ids = tokenizer.encode(prompt)
    if not ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    if args.clamp_len is not None:
        model.config.clamp_len = args.clamp_len
    segment_len = args.segment_len or model.config.tgt_len
    try:
        mem_len = model.resolve_mem_len(args.mem_len, segment_len)      # the model's default; 0 = no memory
        new = generate(model, torch.tensor([ids], device=args.device), max_new_tokens=args.max_new_tokens,
                       segment_len=segment_len, mem_len=mem_len, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    except ValueError as err:          # ConfigError too: a memory or segment length the model refuses
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(prompt + tokenizer.decode(new[0].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
