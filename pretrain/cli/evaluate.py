"""Perplexity and bits per character of a from_pretrained model over a token file or a text file.

    python tools/evaluate.py MODEL_DIR --tokens data/wt2/valid        # a preprocessed .bin/.idx prefix
    python tools/evaluate.py MODEL_DIR --text valid.txt              # tokenised with MODEL_DIR/tokenizer
        [--tgt-len 128] [--mem-len 256] [--clamp-len 400] [--batch-size 1] [--device cuda] [--json]

Fixed-length segments with streaming memory; every token is scored once (the last segment may be shorter).
``--text`` reads the file as one document tokenised exactly as preprocessing does (``encode_document``: its
ids and a final <eos>) after the <eos> that ends the document before it, so every id of the document is
scored; with ``--max-tokens N`` the document is the text of its first N tokens (scored the same way, so the
figures equal those of a file holding just that text). Bits per character, per byte and per word, and
``word_perplexity`` (exp(total NLL / words), words counted as lm-evaluation-harness does,
``len(re.split(r"\s+", text))``: the figure its rolling-loglikelihood tasks report for the same text) divide by
exactly the text the scored ids encode (the at most batch-size - 1 ids that do not fill the streams evenly
are left out of both). ``--tokens`` with ``--max-tokens N`` scores the first N ids of the token file. The
tokenizer must be the model's (vocabulary size, and the fingerprint its export recorded); a model directory
without tokenizer/ needs --tokenizer, or --tokens.
"""
from __future__ import annotations

import argparse
import bisect
import functools
import itertools
import json
import math
import re
import sys
from pathlib import Path

import torch

from lamemo_parallel.inference import evaluate_tokens
from pretrain.progress import progress
from pretrain.cli_args import OneLineParser, clamp_len, device, non_negative_int, positive_int
from pretrain.cli.model_inputs import check_token_file, load_model, model_tokenizer
from pretrain.data.indexed import load_tokens
from pretrain.data.tokenizer import split_lines_keepends


progress_bar = functools.partial(progress, desc="evaluate", unit="segment")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for ``word_perplexity`` (``Task.count_words``)."""
    return len(re.split(r"\s+", text))


class EncodedText:
    """A text file as preprocessing tokenises it (``encode_document``; ``Tokenizer.encode`` works line by line),
    preceded by the ``<eos>`` of the document before it, and which text any prefix of the document's ids
    encodes, so that per-character, per-byte and per-word figures divide by exactly the text that was scored
    (the batch's uneven tail cuts it short)."""

    def __init__(self, text: str, tokenizer):
        self.text = text
        self.tokenizer = tokenizer
        self.lines = split_lines_keepends(text)
        self.line_ids = [tokenizer.encode(line) for line in self.lines]
        self.ends = list(itertools.accumulate(len(ids) for ids in self.line_ids))
        body = [i for ids in self.line_ids for i in ids]
        # what encode_document adds after the lines' ids (the final <eos>; nothing for the word tokenizer)
        self.document = body + tokenizer.encode_document(text)[len(body):] if body else []

    def ids(self) -> torch.Tensor:
        """``<eos>`` then the document's ids (an empty document has nothing to score)."""
        return torch.tensor([self.tokenizer.eos_id] + self.document if self.document else [], dtype=torch.long)

    def text_of(self, n_ids: int) -> str:
        """The text the first ``n_ids`` ids of the document encode: whole lines, then the decoded start of a cut
        line (the final <eos> encodes no text)."""
        if not self.ends or n_ids >= self.ends[-1]:
            return self.text
        whole = bisect.bisect_right(self.ends, n_ids)
        start = self.ends[whole - 1] if whole else 0
        cut = self.line_ids[whole][:n_ids - start] if n_ids > start else []
        return "".join(self.lines[:whole]) + (self.tokenizer.decode(cut) if cut else "")


def load_eval_tokens(args, model_dir: Path, vocab_size: int) -> tuple[torch.Tensor, EncodedText | None]:
    """The token ids to score and, for --text, what text each prefix of them encodes."""
    if args.tokens:
        has_tokenizer = args.tokenizer or (model_dir / "tokenizer").is_dir()
        tokenizer = model_tokenizer(model_dir, args.tokenizer, vocab_size) if has_tokenizer else None
        check_token_file(args.tokens, model_dir)
        return torch.from_numpy(load_tokens(args.tokens, tokenizer=tokenizer).astype("int64")), None
    tokenizer = model_tokenizer(model_dir, args.tokenizer, vocab_size,
                                alternative=", or score a preprocessed token file with --tokens")
    encoded = EncodedText(Path(args.text).read_text(encoding="utf-8"), tokenizer)
    if args.max_tokens:          # the document cut to the text of its first N tokens, scored as a document
        encoded = EncodedText(encoded.text_of(args.max_tokens), tokenizer)
    return encoded.ids(), encoded


def text_metrics(result, encoded: EncodedText) -> dict:
    """Bits per character / byte / word and the word perplexity of the text the scored ids encode (every scored
    id is a target: the first ``n_tokens`` ids of the document)."""
    text = encoded.text_of(result.n_tokens)
    bits = result.nll_sum / math.log(2)
    metrics = {"characters": len(text), "bits_per_character": bits / max(len(text), 1),
               "bits_per_byte": bits / max(len(text.encode("utf-8")), 1)}
    words = len(text.split())
    if words:
        metrics["bits_per_word"] = bits / words
        metrics["word_perplexity"] = math.exp(min(result.nll_sum / count_words(text), 700.0))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="from_pretrained directory (config.json + model.safetensors)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="prefix of a preprocessed token file (PREFIX.bin / PREFIX.idx)")
    source.add_argument("--text", help="a UTF-8 text file: one document, tokenised with the model's tokenizer as preprocessing does")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: MODEL/tokenizer)")
    parser.add_argument("--tgt-len", type=positive_int, default=None, help="segment length (default: the model's tgt_len)")
    parser.add_argument("--mem-len", type=non_negative_int, default=None, help="memory length (default: the model's mem_len)")
    parser.add_argument("--clamp-len", type=clamp_len, default=None, help="clamp relative distances (default: model's)")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="number of parallel evaluation streams")
    parser.add_argument("--max-tokens", type=positive_int, default=None, help="score only the first N tokens (--text: the text of its first N tokens, as a document)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, device=args.device)
        tokens, encoded = load_eval_tokens(args, Path(args.model), model.config.vocab_size)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.max_tokens and encoded is None:
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
    if encoded is not None:
        report.update(text_metrics(result, encoded))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>20}: {value:.6g}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
