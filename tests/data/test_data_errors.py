"""Malformed input stops early with one clear message; download_data verifies what it is given."""

from __future__ import annotations

import hashlib
import json
import lzma
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pretrain.data import download
from pretrain.data.errors import DataError
from pretrain.data.indexed import preprocess
from pretrain.data.streams import SegmentStreams
from pretrain.data.tokenizer import check_vocab_matches, load_tokenizer, train_tokenizer

from helpers import WIKITEXT2, load_tool

train_tool = load_tool("train_tokenizer")
preprocess_tool = load_tool("preprocess_data")
download_tool = load_tool("download_data")


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    """The tool's stderr: exactly one line, starting with ``error:`` (no traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- empty files -------------------------------------------------------------------------------------


def test_empty_file_stops_preprocessing_and_training(bpe_dir: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.txt"
    empty.touch()
    with pytest.raises(DataError, match="empty.txt: empty file"):
        preprocess([empty], bpe_dir, tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out*"))
    assert preprocess_tool.main(["--input", str(empty), "--tokenizer", str(bpe_dir),
                                 "--output-prefix", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "empty file" in one_error_line(capsys)
    for kind in ("word", "bpe"):
        assert train_tool.main(["--kind", kind, "--input", str(empty), "--output", str(tmp_path / kind)]) == 2
        assert "empty file" in one_error_line(capsys)
    packed = tmp_path / "empty.txt.xz"
    with lzma.open(packed, "wb"):
        pass
    with pytest.raises(DataError, match="empty file"):
        preprocess([packed], bpe_dir, tmp_path / "out", progress=False)


def test_missing_input_and_empty_folder(bpe_dir: Path, tmp_path: Path, capsys) -> None:
    assert preprocess_tool.main(["--input", str(tmp_path / "nope.txt"), "--tokenizer", str(bpe_dir),
                                 "--output-prefix", str(tmp_path / "o")]) == 2
    assert "does not exist" in one_error_line(capsys)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="contains no files"):
        preprocess([tmp_path / "folder"], bpe_dir, tmp_path / "o", progress=False)


# -- undecodable bytes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_undecodable_bytes_name_the_file_and_offset(bpe_dir: Path, byte_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"good line\n" * 3 + "café\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: undecodable bytes at byte offset 33"):
        preprocess([bad], bpe_dir, tmp_path / "out", workers=2, progress=False)
    assert preprocess_tool.main(["--input", str(bad), "--tokenizer", str(bpe_dir), "--output-prefix",
                                 str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 2
    assert "byte offset 33" in one_error_line(capsys)
    assert train_tool.main(["--kind", "bpe", "--input", str(bad), "--output", str(tmp_path / "t")]) == 2
    assert "undecodable" in one_error_line(capsys)
    with pytest.raises(DataError, match="undecodable"):
        train_tokenizer("word", [bad], None)
    # The byte-level tokenizer reads raw bytes by design (enwik8), so the same file is valid input there.
    preprocess([bad], byte_dir, tmp_path / "bytes", progress=False)


def test_bad_json_line(bpe_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2: expected a JSON object with a string field 'text'"):
        preprocess([path], bpe_dir, tmp_path / "out", progress=False)


# -- tokenizer / model mismatch --------------------------------------------------------------------------


def test_vocabulary_mismatch_with_the_model(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    check_vocab_matches(tok, 1000)
    with pytest.raises(ValueError, match="tokenizer has 1000 ids but the model's vocab_size is 1024"):
        check_vocab_matches(tok, 1024)
    check_vocab_matches(tok, 1024, allow_padding=True)  # Megatron-style padded embedding
    with pytest.raises(DataError, match="at least 1000"):
        check_vocab_matches(tok, 999, allow_padding=True)


def test_broken_tokenizer_directories(bpe_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no lamemo_tokenizer.json"):
        load_tokenizer(tmp_path)
    copy = tmp_path / "tok"
    load_tokenizer(bpe_dir).save(copy)
    info = json.loads((copy / "lamemo_tokenizer.json").read_text())
    (copy / "lamemo_tokenizer.json").write_text(json.dumps({**info, "vocab_size": 32000}))
    with pytest.raises(DataError, match="says vocab_size=32000 but the model files give 1000"):
        load_tokenizer(copy)
    (copy / "tokenizer.model").unlink()
    with pytest.raises(DataError, match="model file that is missing"):
        load_tokenizer(copy)
    # Same size, different ids: two words swapped in a word vocabulary.
    words = tmp_path / "words"
    train_tokenizer("word", [_write(tmp_path / "w.txt", "a a b\n")], words)
    vocab = (words / "vocab.txt").read_text().split("\n")
    vocab[1], vocab[2] = vocab[2], vocab[1]
    (words / "vocab.txt").write_text("\n".join(vocab))
    with pytest.raises(DataError, match="says fingerprint="):
        load_tokenizer(words)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sentencepiece_vocabulary_too_large_for_the_text(tmp_path: Path, capsys) -> None:
    small = tmp_path / "small.txt"
    small.write_text("tiny text\n", encoding="utf-8")
    assert train_tool.main(["--kind", "bpe", "--input", str(small), "--output", str(tmp_path / "t"),
                            "--vocab-size", "5000"]) == 2
    assert "Vocabulary size too high" in one_error_line(capsys)


# -- data too short for the stream layout -----------------------------------------------------------------


def test_data_shorter_than_one_segment_per_stream() -> None:
    layout = dict(tgt_len=16, dp_size=2, dp_rank=0, micro_batches=2, micro_batch_size=4)
    need = 2 * 2 * 4 * 16 + 1
    SegmentStreams(np.zeros(need, dtype=np.int64), **layout)  # exactly one segment per stream: fine
    with pytest.raises(DataError, match=f"data too short: {need - 1} tokens .* need at least {need} tokens"):
        SegmentStreams(np.zeros(need - 1, dtype=np.int64), **layout)
    with pytest.raises(DataError, match="dp_rank must be in"):
        SegmentStreams(np.zeros(need), **{**layout, "dp_rank": 2})
    with pytest.raises(DataError, match="tgt_len must be a positive integer"):
        SegmentStreams(np.zeros(need), **{**layout, "tgt_len": 0})


# -- download_data: local copies and checksums --------------------------------------------------------------


def test_verify_file_accepts_the_right_checksum_only(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"payload")
    download.verify_file(path, hashlib.sha256(b"payload").hexdigest())
    download.verify_file(path, hashlib.sha1(b"payload").hexdigest(), "sha1")
    with pytest.raises(DataError, match="sha256 checksum mismatch"):
        download.verify_file(path, hashlib.sha256(b"other").hexdigest())


def test_from_dir_rejects_an_archive_with_the_wrong_checksum(tmp_path: Path, capsys) -> None:
    local = tmp_path / "local"
    local.mkdir()
    with zipfile.ZipFile(local / "enwik8.zip", "w") as z:
        z.writestr("enwik8", b"not the real enwik8\n" * 10)
    assert download_tool.main(["enwik8", "--from", str(local), "--out-dir", str(tmp_path / "data")]) == 2
    assert "enwik8.zip: sha256 checksum mismatch" in one_error_line(capsys)
    assert not (tmp_path / "data" / "enwik8" / "SOURCE.json").exists()
    # An extracted file that is not the official one is refused the same way.
    (local / "enwik8.zip").unlink()
    (local / "enwik8").write_bytes(b"x" * 1000)
    assert download_tool.main(["enwik8", "--from", str(local), "--out-dir", str(tmp_path / "data")]) == 2
    assert "expected 100000000 bytes" in one_error_line(capsys)
    assert not list((tmp_path / "data" / "enwik8").glob("*.txt"))


def test_from_dir_with_the_real_wikitext2_files(tmp_path: Path, capsys) -> None:
    local = tmp_path / "local"
    local.mkdir()
    for split in download.SPLITS:  # the official file names, as extracted from wikitext-2-v1.zip
        (local / f"wiki.{split}.tokens").write_bytes(lzma.open(WIKITEXT2 / f"{split}.txt.xz").read())
    assert download_tool.main(["wikitext-2", "--from", str(local), "--out-dir", str(tmp_path / "data")]) == 0
    out = tmp_path / "data" / "wikitext-2"
    for split in download.SPLITS:
        assert (out / f"{split}.txt").read_bytes() == (local / f"wiki.{split}.tokens").read_bytes()
    assert json.loads((out / "SOURCE.json").read_text())["dataset"] == "wikitext-2"
    assert download_tool.main(["wikitext-2", "--from", str(local), "--out-dir", str(tmp_path / "data")]) == 0
    assert "already prepared" in capsys.readouterr().out
    # A modified copy fails verification.
    (local / "wiki.valid.tokens").write_bytes(b" = changed = \n")
    assert download_tool.main(["wikitext-2", "--from", str(local), "--out-dir", str(tmp_path / "again")]) == 2
    assert "wiki.valid.tokens: sha256 checksum mismatch" in one_error_line(capsys)


def test_unreachable_network_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"could not download x\.zip .* --from DIR"):
        download.download(("http://127.0.0.1:9/x.zip",), tmp_path / "x.zip", "0" * 64, timeout=5, progress=False)
    assert not list(tmp_path.iterdir())
