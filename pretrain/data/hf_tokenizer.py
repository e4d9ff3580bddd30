"""Our tokenizers written as files that transformers reads: ``tokenizer.json`` (the schema of the ``tokenizers``
library) and ``tokenizer_config.json`` with a stock ``tokenizer_class``, so ``AutoTokenizer.from_pretrained(dir)``
works without ``trust_remote_code`` and gives the ids of ``Tokenizer.encode``.

The files are plain JSON written here (export and preprocessing never import transformers or tokenizers):

``bpe`` / ``unigram``
    sentencepiece's pieces and scores as a ``BPE`` (merges ordered by the merged piece's score, as
    sentencepiece applies them) or ``Unigram`` model with byte fallback; ``" "`` -> ``"▁"`` is the whole
    normalisation (identity rules, no dummy prefix), and every user-defined piece (``"\\n"``) is an added token,
    so each line is segmented on its own exactly as ``SentencePieceTokenizer.encode`` does. One difference:
    transformers' ``Unigram`` also matches the unknown, control and byte pieces (``<unk>``, ``<eos>``,
    ``<0x41>``) when the text spells them, where sentencepiece reads such text as ordinary characters (the
    ``tokenizers`` schema has no way to keep a piece out of the lattice and keep its id); ``BPE`` has no such
    difference (no merge makes those pieces).
``byte``
    a ``BPE`` model with no merges whose vocabulary is the 256 byte pieces: every character falls back to its
    UTF-8 bytes, ids 0..255; ``<eos>`` = 256.
``word``
    a ``WordLevel`` model over whitespace-split words (``<unk>`` for unknown words); the end of every line
    (``"\\n"`` and the end of the text) becomes ``<eos>``, as ``WordTokenizer.encode`` does.

``split_special_tokens`` is on: the text ``<eos>`` is never read as the end-of-document id, as in our
tokenizers (only the word tokenizer maps the word ``<eos>`` to its id, the same id both ways).
"""
from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb   # the proto says which pieces are user-defined

from pretrain.data.tokenizer import (EOS, UNK, ByteTokenizer, SentencePieceTokenizer, Tokenizer, WordTokenizer,
                                     atomic_write_text)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
#: The stock class that reads a ``tokenizer.json`` (no remote code).
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
SPACE = "\u2581"


def _added(token_id: int, content: str, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def _sentencepiece(tok: SentencePieceTokenizer) -> dict:
    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_proto)
    kinds = pb.ModelProto.SentencePiece
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    added = [_added(i, piece, special=kind == kinds.CONTROL) for i, (piece, _, kind) in enumerate(pieces)
             if kind in (kinds.CONTROL, kinds.USER_DEFINED)]
    unk_id = next(i for i, (_, _, kind) in enumerate(pieces) if kind == kinds.UNKNOWN)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if tok.kind == "unigram":
        model = {"type": "Unigram", "unk_id": unk_id, "vocab": [[piece, score] for piece, score, _ in pieces],
                 "byte_fallback": byte_fallback}
    else:
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id][0], "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback, "ignore_merges": False,
                 "vocab": {piece: i for i, (piece, _, _) in enumerate(pieces)}, "merges": _bpe_merges(pieces, kinds)}
    return {"added_tokens": added, "normalizer": _replace({"String": " "}, SPACE), "pre_tokenizer": None,
            "post_processor": None, "model": model,
            "decoder": {"type": "Sequence", "decoders": [_replace({"String": SPACE}, " "), {"type": "ByteFallback"},
                                                          {"type": "Fuse"}]}}


def _bpe_merges(pieces: list[tuple[str, float, int]], kinds) -> list[list[str]]:
    """sentencepiece BPE merges the adjacent pair whose merged piece scores highest; as a merge list, every
    split of a normal piece into two pieces of the vocabulary, ordered by the merged piece's score (ties by
    the ids of its parts)."""
    vocab = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind in (kinds.NORMAL, kinds.USER_DEFINED)}
    merges = []
    for piece, score, kind in pieces:
        if kind != kinds.NORMAL:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend((-score, vocab[left], vocab[right], left, right) for left, right in splits)
    return [[left, right] for *_, left, right in sorted(merges)]


def _byte(tok: ByteTokenizer) -> dict:
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab[EOS] = tok.eos_id
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": True, "ignore_merges": False,
             "vocab": vocab, "merges": []}
    return {"added_tokens": [_added(tok.eos_id, EOS, special=True)], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None, "model": model,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}}


def _word(tok: WordTokenizer) -> dict:
    # The end of the text (after an optional final newline) and every other newline become the word <eos>.
    normalizers = [_replace({"Regex": r"\n?\z"}, f" {EOS}"), _replace({"String": "\n"}, f" {EOS} ")]
    if tok.lowercase:
        normalizers.insert(0, {"type": "Lowercase"})
    model = {"type": "WordLevel", "vocab": dict(tok.stoi), "unk_token": UNK}
    return {"added_tokens": [_added(tok.eos_id, EOS, special=True)],
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "model": model, "decoder": None}


def transformers_tokenizer(tok: Tokenizer) -> tuple[dict, dict]:
    """(``tokenizer.json``, ``tokenizer_config.json``) of ``tok`` as dictionaries."""
    if isinstance(tok, SentencePieceTokenizer):
        body = _sentencepiece(tok)
    elif isinstance(tok, ByteTokenizer):
        body = _byte(tok)
    elif isinstance(tok, WordTokenizer):
        body = _word(tok)
    else:
        raise TypeError(f"no transformers form for a {type(tok).__name__}")
    tokenizer_json = {"version": "1.0", "truncation": None, "padding": None, **body}
    config = {"tokenizer_class": TOKENIZER_CLASS, "eos_token": EOS, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 60,
              "lamemo_tokenizer_kind": tok.kind, "lamemo_fingerprint": tok.fingerprint()}
    model = body["model"]
    unk = model["vocab"][model["unk_id"]][0] if model["type"] == "Unigram" else model.get("unk_token")
    if unk is not None and (not isinstance(tok, WordTokenizer) or tok.unk_id is not None):
        config["unk_token"] = unk
    return tokenizer_json, config


def write_transformers_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` for ``AutoTokenizer`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json, config = transformers_tokenizer(tok)
    atomic_write_text(directory / TOKENIZER_JSON, json.dumps(tokenizer_json, ensure_ascii=False) + "\n")
    atomic_write_text(directory / TOKENIZER_CONFIG, json.dumps(config, indent=2) + "\n")
