"""Tokenizers: WikiText-2 parity, round trips, line independence, save/load, the training tool."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.errors import DataError
from pretrain.data.indexed import load_tokens, preprocess
from pretrain.data.textio import read_text
from pretrain.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    load_tokenizer,
    train_tokenizer,
)

from helpers import WIKITEXT2, WT2_TOKENS, WT2_VOCAB, load_tool, shakespeare_text

train_tool = load_tool("train_tokenizer")

# Text a tokenizer meets in practice: leading/double spaces, tabs, CRLF, blank lines, non-ASCII, emoji.
TRICKY = "  Leading  spaces\tand tabs\r\nCafé naïve — 🙂 ok\n\n\nlast line without newline"


def test_wikitext2_word_level_matches_published_counts(wt2_word_dir: Path) -> None:
    tok = load_tokenizer(wt2_word_dir)
    assert isinstance(tok, WordTokenizer)
    assert tok.vocab_size == WT2_VOCAB
    assert tok.itos[0] == "<eos>" and tok.eos_id == 0
    for split, expected in WT2_TOKENS.items():
        ids = tok.encode_document(read_text(WIKITEXT2 / f"{split}.txt.xz"))
        assert len(ids) == expected, split
        assert ids[-1] == tok.eos_id
    # The vocabulary comes from train only, yet valid/test need no extra <unk>: the <unk> count equals
    # the <unk> words already in the text (11,718 in valid, per the data README).
    valid = tok.encode(read_text(WIKITEXT2 / "valid.txt.xz"))
    assert valid.count(tok.unk_id) == 11_718


def test_wikitext2_token_file_has_published_count(wt2_word_dir: Path, tmp_path: Path) -> None:
    prefix = preprocess([WIKITEXT2 / "valid.txt.xz"], wt2_word_dir, tmp_path / "valid", workers=2, progress=False)
    tokens = load_tokens(prefix, verify="checksum")
    assert len(tokens) == WT2_TOKENS["valid"]
    assert tokens.dtype == np.uint16


def test_word_vocabulary_is_frequency_ordered_with_stable_ties(tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text("b a c\na c\nd\n", encoding="utf-8")
    tok = train_tokenizer("word", [corpus], None)
    # <eos> first (3 lines), then by count: a=2, c=2 (a seen first), then b=1, d=1 (b seen first).
    assert tok.itos == ["<eos>", "a", "c", "b", "d"]


def test_word_round_trip_normalizes_whitespace_only(tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text(TRICKY + "\n<unk>\n", encoding="utf-8")
    tok = train_tokenizer("word", [corpus], tmp_path / "tok")
    assert tok.decode(tok.encode(TRICKY)) == "".join(" ".join(line.split()) + "\n" for line in TRICKY.split("\n"))
    assert tok.encode("never-seen-word\n") == [tok.unk_id, tok.eos_id]


def test_word_max_size_adds_unk_and_unknown_words_without_unk_fail(tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text("x x x y y z\n", encoding="utf-8")
    small = train_tokenizer("word", [corpus], None, max_size=3)
    assert small.vocab_size == 3 and "<unk>" in small.itos
    assert small.encode("z\n") == [small.unk_id, small.eos_id]
    full = train_tokenizer("word", [corpus], None)
    assert full.unk_id is None
    with pytest.raises(DataError, match="'w' is not in the vocabulary"):
        full.encode("x w\n")


@pytest.mark.parametrize("text", [TRICKY, "", "\n", "one line\n", "x" * 5000])
def test_bpe_round_trip_is_exact(bpe_dir: Path, text: str) -> None:
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind == "bpe"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_document(text)) == text  # <eos> is a control symbol: not text


def test_bpe_layout_and_save_load_identity(bpe_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    assert tok.vocab_size == 1000
    assert tok.piece(tok.eos_id) == "<eos>"
    assert tok.encode("\n") == [tok.encode("a\n")[-1]]  # newline is one piece of its own
    info = json.loads((bpe_dir / "lamemo_tokenizer.json").read_text())
    assert info["kind"] == "bpe" and info["vocab_size"] == 1000 and info["files"] == {"model": "tokenizer.model"}
    tok.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    sample = shakespeare_text(20_000)
    assert again.encode(sample) == tok.encode(sample)
    assert again.fingerprint() == tok.fingerprint() == info["fingerprint"]


def test_unigram_round_trip_and_line_independence(tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text(shakespeare_text(150_000), encoding="utf-8")
    tok = train_tokenizer("unigram", [corpus], tmp_path / "tok", vocab_size=600, user_symbols=["<sep>"])
    assert tok.kind == "unigram" and tok.vocab_size == 600
    sample = shakespeare_text()[500_000:520_000]
    assert tok.decode(tok.encode(sample)) == sample
    # Encoding line by line is the definition; a whole-text unigram lattice would differ.
    lines = sample.split("\n")
    by_line = [i for line in lines[:-1] for i in tok.encode(line + "\n")] + tok.encode(lines[-1])
    assert tok.encode(sample) == by_line
    assert len(tok.encode("a <sep> b")) == len(tok.encode("a ")) + 1 + len(tok.encode(" b"))


def test_bpe_line_independence(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    a, b = "First line of a chunk\n", "and the next one\n"
    assert tok.encode(a + b) == tok.encode(a) + tok.encode(b)


def test_byte_tokenizer(byte_dir: Path) -> None:
    tok = load_tokenizer(byte_dir)
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.encode("é\n") == [0xC3, 0xA9, 10]
    assert tok.decode(tok.encode_document(TRICKY)) == TRICKY
    # Raw bytes are fine for byte-level data (enwik8 splits can cut a UTF-8 character).
    assert tok.encode_bytes(b"\xff\xfe") == [255, 254]


def test_train_tokenizer_tool_writes_loadable_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text(shakespeare_text(60_000), encoding="utf-8")
    assert train_tool.main(["--kind", "bpe", "--input", str(corpus), "--output", str(tmp_path / "bpe"),
                            "--vocab-size", "500", "--user-symbols", "<sep>", "--spm-option", "split_digits=true"]) == 0
    tok = load_tokenizer(tmp_path / "bpe")
    assert tok.vocab_size == 500 and len(tok.encode("<sep>")) == 1
    assert tok.encode("2024") == [tok.encode("2")[0], tok.encode("0")[0], tok.encode("2")[0], tok.encode("4")[0]]
    assert train_tool.main(["--kind", "word", "--input", str(corpus), "--output", str(tmp_path / "word")]) == 0
    assert load_tokenizer(tmp_path / "word").kind == "word"
    assert train_tool.main(["--kind", "byte", "--output", str(tmp_path / "byte")]) == 0
    assert load_tokenizer(tmp_path / "byte").vocab_size == 257
    assert "saved byte tokenizer" in capsys.readouterr().out


def test_options_that_do_not_apply_are_rejected(tmp_path: Path) -> None:
    corpus = tmp_path / "train.txt"
    corpus.write_text("a b\n", encoding="utf-8")
    with pytest.raises(DataError, match="vocab_size"):
        train_tokenizer("word", [corpus], None, vocab_size=10)
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        train_tokenizer("wordpiece", [corpus], None)


def test_directories_from_before_the_rename_still_load(bpe_dir: Path, tmp_path: Path) -> None:
    """Tokenizer directories written with the old name (``tokenizer.json``, ours) load; transformers' own
    ``tokenizer.json`` in a directory is not mistaken for ours."""
    import shutil
    old = tmp_path / "old"
    shutil.copytree(bpe_dir, old)
    (old / "lamemo_tokenizer.json").rename(old / "tokenizer.json")
    assert load_tokenizer(old).fingerprint() == load_tokenizer(bpe_dir).fingerprint()
    (old / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    with pytest.raises(DataError, match="no lamemo_tokenizer.json"):
        load_tokenizer(old)
