"""Token files: exact tokens with 1 or 2 workers, megatron-core compatibility, interruption, verification."""

from __future__ import annotations

import json
import lzma
import warnings
from pathlib import Path

import numpy as np
import pytest

from pretrain.data.demo_corpus import demo_corpus_files, stdlib_root, write_demo_corpus
from pretrain.data.errors import DataError
from pretrain.data.indexed import load_tokens, preprocess, read_meta
from pretrain.data.streams import SegmentStreams
from pretrain.data.tokenizer import load_tokenizer

from helpers import concat_documents, load_tool, shakespeare_text

preprocess_tool = load_tool("preprocess_data")


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[list[Path], list[str]]:
    """Three documents: a plain file, an .xz file and a folder holding one more file."""
    texts = [shakespeare_text()[i * 40_000 : (i + 1) * 40_000] for i in range(3)]
    plain = tmp_path / "a.txt"
    plain.write_text(texts[0], encoding="utf-8")
    packed = tmp_path / "b.txt.xz"
    with lzma.open(packed, "wt", encoding="utf-8") as f:
        f.write(texts[1])
    folder = tmp_path / "more"
    folder.mkdir()
    (folder / "c.txt").write_text(texts[2], encoding="utf-8")
    (folder / ".hidden").write_text("skipped", encoding="utf-8")
    return [plain, packed, folder], texts


def megatron_indexed_dataset(prefix: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(str(prefix), mmap=True)


def test_tokens_equal_whole_file_encoding_with_one_and_two_workers(bpe_dir: Path, corpus, tmp_path: Path) -> None:
    inputs, texts = corpus
    tok = load_tokenizer(bpe_dir)
    expected = concat_documents(tok, texts)
    # Tiny chunks: dozens of newline-aligned pieces per file, tokenized out of order by two processes.
    one = preprocess(inputs, bpe_dir, tmp_path / "out1", workers=1, chunk_bytes=3000, progress=False)
    two = preprocess(inputs, bpe_dir, tmp_path / "out2", workers=2, chunk_bytes=3000, progress=False)
    assert load_tokens(one).tolist() == expected
    assert load_tokens(two, verify="checksum").tolist() == expected
    meta = read_meta(two)
    assert meta["num_tokens"] == len(expected) and meta["num_documents"] == 3
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_fingerprint"] == tok.fingerprint()
    assert (tmp_path / "out1.bin").read_bytes() == (tmp_path / "out2.bin").read_bytes()


def test_megatron_core_reads_the_files_as_one_document_per_input(bpe_dir: Path, corpus, tmp_path: Path) -> None:
    inputs, texts = corpus
    tok = load_tokenizer(bpe_dir)
    prefix = preprocess(inputs, bpe_dir, tmp_path / "docs", workers=2, chunk_bytes=5000, progress=False)
    ds = megatron_indexed_dataset(prefix)
    bounds = ds.document_indices
    assert len(bounds) == 4
    for d, text in enumerate(texts):
        doc = np.concatenate([ds[i] for i in range(bounds[d], bounds[d + 1])])
        assert doc.tolist() == tok.encode_document(text)


def test_jsonl_lines_are_documents(bpe_dir: Path, tmp_path: Path) -> None:
    docs = ["first document\nwith two lines", "", "second", "third 🙂"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    tok = load_tokenizer(bpe_dir)
    prefix = preprocess([path], bpe_dir, tmp_path / "jsonl", workers=1, chunk_bytes=40, progress=False)
    assert load_tokens(prefix).tolist() == concat_documents(tok, [d for d in docs if d])
    assert len(megatron_indexed_dataset(prefix).document_indices) == 4  # three non-empty documents


def test_byte_level_files_keep_raw_bytes(byte_dir: Path, tmp_path: Path) -> None:
    raw = bytes(range(256)) * 3 + b"\n\xff\xfe tail"  # not UTF-8: fine for a byte-level model
    path = tmp_path / "enwik8-like"
    path.write_bytes(raw)
    prefix = preprocess([path], byte_dir, tmp_path / "bytes", workers=2, chunk_bytes=100, progress=False)
    assert load_tokens(prefix).tolist() == list(raw) + [256]


def test_rerun_keeps_an_up_to_date_output_and_rebuilds_a_stale_one(bpe_dir: Path, corpus, tmp_path: Path) -> None:
    inputs, _ = corpus
    prefix = preprocess(inputs, bpe_dir, tmp_path / "out", workers=1, progress=False)
    before = (tmp_path / "out.bin").stat().st_mtime_ns
    preprocess(inputs, bpe_dir, prefix, workers=1, progress=False)
    assert (tmp_path / "out.bin").stat().st_mtime_ns == before
    inputs[0].write_text("changed\n", encoding="utf-8")
    preprocess(inputs, bpe_dir, prefix, workers=1, progress=False)
    assert read_meta(prefix)["inputs"][0]["bytes"] == len("changed\n")


def test_interrupted_run_leaves_nothing_that_looks_complete(bpe_dir: Path, corpus, tmp_path: Path) -> None:
    inputs, texts = corpus
    prefix = preprocess(inputs, bpe_dir, tmp_path / "out", workers=2, progress=False)
    good = load_tokens(prefix).tolist()
    # A run that dies half way (the second file turns out undecodable) ...
    bad = tmp_path / "zz-bad.txt"
    bad.write_bytes(b"fine line\n" * 500 + b"\xff\xfe broken\n")
    with pytest.raises(DataError, match="undecodable"):
        preprocess([inputs[0], bad], bpe_dir, prefix, workers=2, chunk_bytes=1000, progress=False)
    # ... leaves no temporary files and the previous complete output untouched.
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx", "out.meta.json"]
    assert load_tokens(prefix, verify="checksum").tolist() == good
    # Files without the completion marker are refused, and a re-run completes them.
    (tmp_path / "out.meta.json").unlink()
    with pytest.raises(DataError, match="not a finished token file"):
        load_tokens(prefix)
    preprocess(inputs, bpe_dir, prefix, workers=2, progress=False)
    assert load_tokens(prefix).tolist() == good


def test_truncated_corrupted_or_missing_files_are_refused(byte_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "t.txt"
    source.write_text("some text\n" * 200, encoding="utf-8")
    prefix = preprocess([source], byte_dir, tmp_path / "t", workers=1, progress=False)
    bin_path = tmp_path / "t.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_tokens(prefix)
    bin_path.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    load_tokens(prefix)  # same size: the quick check passes ...
    with pytest.raises(DataError, match="sha256 does not match"):
        load_tokens(prefix, verify="checksum")  # ... the checksum does not
    (tmp_path / "t.idx").unlink()
    with pytest.raises(DataError, match=r"t\.idx is missing"):
        load_tokens(prefix)


def test_token_file_made_with_another_tokenizer_is_refused(byte_dir: Path, bpe_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / "t.txt"
    source.write_text("hello\n", encoding="utf-8")
    prefix = preprocess([source], byte_dir, tmp_path / "t", workers=1, progress=False)
    assert load_tokens(prefix, tokenizer=load_tokenizer(byte_dir)).tolist() == list(b"hello\n") + [256]
    with pytest.raises(DataError, match="different tokenizer"):
        load_tokens(prefix, tokenizer=load_tokenizer(bpe_dir))


def test_preprocess_tool(bpe_dir: Path, shakespeare_file: Path, tmp_path: Path, capsys) -> None:
    code = preprocess_tool.main(["--input", str(shakespeare_file), "--tokenizer", str(bpe_dir),
                                 "--output-prefix", str(tmp_path / "shake" / "train"), "--chunk-mb", "0.1"])
    assert code == 0
    captured = capsys.readouterr()
    assert "tokens in 1 documents" in captured.out
    assert "100%" in captured.err  # the progress bar
    tok = load_tokenizer(bpe_dir)
    assert load_tokens(tmp_path / "shake" / "train").tolist() == tok.encode_document(shakespeare_file.read_text())


@pytest.mark.slow
def test_demo_corpus_is_deterministic_stdlib_source(byte_dir: Path, tmp_path: Path) -> None:
    files = demo_corpus_files()
    assert files == demo_corpus_files()
    root = stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and all(r.endswith(".py") for r in rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/")[:-1])
    assert sum(f.stat().st_size for f in files) <= 4_000_000
    splits = write_demo_corpus(tmp_path / "demo")
    sizes = {k: v.stat().st_size for k, v in splits.items()}
    assert sizes["train"] > 10 * sizes["valid"] > 0 and sizes["test"] > 0
    assert splits["train"].read_text(encoding="utf-8").startswith("# ---- ")
    # The whole offline path: demo text -> token file -> training streams.
    prefix = preprocess([splits["valid"]], byte_dir, tmp_path / "valid", progress=False)
    streams = SegmentStreams(load_tokens(prefix), tgt_len=64, dp_size=2, dp_rank=1, micro_batches=2,
                             micro_batch_size=2)
    (inputs, targets), _ = streams.next_step()
    assert inputs.shape == targets.shape == (2, 64)
