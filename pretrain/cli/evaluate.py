"""Perplexity and bits per character of a from_pretrained model over a token file or a text file.

    python tools/evaluate.py MODEL_DIR --tokens data/wt2/valid        # a preprocessed .bin/.idx prefix
    python tools/evaluate.py MODEL_DIR --text valid.txt              # tokenised with MODEL_DIR/tokenizer
        [--tgt-len 128] [--mem-len 256] [--clamp-len 400] [--batch-size 1] [--device cuda] [--json]

Fixed-length segments with streaming memory; every token is scored once (the last segment may be shorter).
``--text`` reads the file as one document tokenised exactly as preprocessing does (``encode_document``: its
ids and a final <eos>) after the <eos> that ends the document before it, so every id of the document is
scored; ``word_perplexity`` is exp(total NLL / words), words counted as lm-evaluation-harness does
(``len(re.split(r"\s+", text))``): the figure its rolling-loglikelihood tasks report for the same text.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from pathlib import Path

import torch

from lamemo_parallel import LaMemoModel
from lamemo_parallel.inference import evaluate_tokens
from pretrain.progress import progress
from pretrain.cli_args import OneLineParser, clamp_len, device, non_negative_int, positive_int


progress_bar = functools.partial(progress, desc="evaluate", unit="segment")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for ``word_perplexity`` (``Task.count_words``)."""
    return len(re.split(r"\s+", text))


def load_eval_tokens(args, vocab_size: int) -> tuple[torch.Tensor, str | None]:
    """The token ids to score and, for ``--text``, the text they encode (for bpc and word perplexity)."""
    from pretrain.data.tokenizer import check_vocab_matches, load_tokenizer, tokenizer_description
    tokenizer_dir = Path(args.tokenizer or Path(args.model) / "tokenizer")
    if args.tokens:
        from pretrain.data.indexed import load_tokens
        # With the model's tokenizer at hand, a token file made with another one (same vocabulary size or not)
        # is refused by its fingerprint instead of being scored as nonsense.
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_description(tokenizer_dir) else None
        tokens = torch.from_numpy(load_tokens(args.tokens, tokenizer=tokenizer).astype("int64"))
        return tokens, None
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocab_matches(tokenizer, vocab_size)
    text = Path(args.text).read_text(encoding="utf-8")
    # an empty document has nothing to score (its <eos> alone is not a document)
    ids = [tokenizer.eos_id] + tokenizer.encode_document(text) if tokenizer.encode(text) else []
    return torch.tensor(ids, dtype=torch.long), text


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="from_pretrained directory (config.json + model.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="prefix of a preprocessed token file (PREFIX.bin / PREFIX.idx)")
    source.add_argument("--text", help="a UTF-8 text file, tokenised with the model's tokenizer (one <eos> a line)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL/tokenizer)")
    parser.add_argument("--tgt-len", type=positive_int, default=None, help="segment length (default: the model's tgt_len)")
    parser.add_argument("--mem-len", type=non_negative_int, default=None, help="memory length (default: the model's mem_len)")
    parser.add_argument("--clamp-len", type=clamp_len, default=None, help="clamp relative distances (default: model's)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="number of parallel evaluation streams")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        model = LaMemoModel.from_pretrained(args.model, device=args.device)
        tokens, text = load_eval_tokens(args, model.config.vocab_size)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_tokens:
        tokens = tokens[:args.max_tokens]
    if tokens.numel() < 2:
        print(f"error: {args.tokens or args.text} gives {tokens.numel()} token(s); evaluation needs at least 2",
              file=sys.stderr)
        return 2
    if int(tokens.max()) >= model.config.vocab_size:
        print(f"error: token id {int(tokens.max())} is outside the model's vocabulary of {model.config.vocab_size}",
              file=sys.stderr)
        return 2
    if args.clamp_len is not None:
        model.config.clamp_len = args.clamp_len
    tgt_len = args.tgt_len or model.config.tgt_len
    try:
        mem_len = model.resolve_mem_len(args.mem_len, tgt_len)          # the model's default; 0 = no memory
        result = evaluate_tokens(model, tokens, tgt_len=tgt_len, mem_len=mem_len, batch_size=args.batch_size,
                                 device=args.device, progress=None if args.json else progress_bar)
    except ValueError as err:          # ConfigError too; e.g. more streams than tokens
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {"tokens": result.n_tokens, "loss": result.loss, "perplexity": result.perplexity,
              "bits_per_token": result.bits_per_token, "tgt_len": tgt_len, "mem_len": mem_len,
              "clamp_len": model.config.clamp_len}
    if text:
        report["bits_per_character"] = result.bits_per_character(len(text))
        if args.max_tokens is None:
            report["word_perplexity"] = math.exp(min(result.nll_sum / count_words(text), 700.0))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
