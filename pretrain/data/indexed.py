"""Text -> memory-mapped token files in megatron-core's indexed-dataset format, and reading them back.

Output of :func:`preprocess` for a prefix ``P``:

``P.bin``
    All token ids, one document after another, each document ending with ``<eos>``; dtype uint16 when
    the vocabulary has fewer than 65,500 ids, int32 otherwise (megatron-core's ``DType.optimal_dtype``).
``P.idx``
    megatron-core's ``MMIDIDX`` index written by ``megatron.core.datasets.indexed_dataset.
    IndexedDatasetBuilder``; ``IndexedDataset(P)`` reads the pair. A "sequence" is one tokenized chunk
    (or one JSON-lines document) and the document boundaries are recorded, but the trainer only needs
    the flat token array (:func:`load_tokens`).
``P.meta.json``
    What the megatron format has no room for: sha256 of ``.bin`` and ``.idx``, token and document
    counts, dtype, vocabulary size, the tokenizer's fingerprint and the inputs (path, size, mtime). It
    is written last and is the completion marker.

Documents: a plain text file is one document; a ``.jsonl`` file holds one document per line (the
``json_key`` field, ``"text"`` by default, as in Megatron-LM). ``.xz`` / ``.gz`` inputs are read
transparently.

Interrupt safety: the ``.bin`` / ``.idx`` are written under temporary names and renamed at the end, the
old ``meta.json`` is removed before the rename and the new one written after it, so an interrupted run
never leaves files that look complete; re-running redoes the work, and a finished output whose inputs and
tokenizer have not changed is kept as is.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import struct
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.errors import DataError
from pretrain.progress import progress as progress_display
from pretrain.data.textio import (
    PathLike,
    check_not_empty,
    decode_utf8,
    decompressing,
    expand_inputs,
    iter_line_chunks,
    logical_name,
)
from pretrain.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

META_VERSION = 1
_IDX_MAGIC = b"MMIDIDX\x00\x00"
# megatron-core's dtype codes (DType enum); only the two token dtypes it picks are ever written.
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


def _paths(prefix: PathLike) -> tuple[Path, Path, Path]:
    prefix = Path(prefix)
    return (prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx"),
            prefix.with_name(prefix.name + ".meta.json"))


# -- work items and the worker side -------------------------------------------------------------------


@dataclass(frozen=True)
class _Chunk:
    """A newline-aligned piece of one input file, tokenized by one worker call."""

    source: str
    offset: int  # byte offset in the (decompressed) file, for error messages
    first_line: int  # 1-based line number of the first line, for JSON-lines errors
    data: bytes
    jsonl: bool
    is_last: bool  # the last chunk of a plain-text file gets the document's final <eos>


_WORKER_TOKENIZER: Tokenizer | None = None
_WORKER_JSON_KEY = "text"
_WORKER_DTYPE: type = np.int32


def _init_worker(tokenizer_dir: str, json_key: str, dtype: type, in_pool: bool) -> None:
    global _WORKER_TOKENIZER, _WORKER_JSON_KEY, _WORKER_DTYPE
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)
    if in_pool and isinstance(_WORKER_TOKENIZER, SentencePieceTokenizer):
        _WORKER_TOKENIZER.num_threads = 1  # the processes share the cores; threads on top oversubscribe
    _WORKER_JSON_KEY = json_key
    _WORKER_DTYPE = dtype  # results travel back between processes in the file's dtype: half of int32


def _tokenize_chunk(chunk: _Chunk) -> tuple[np.ndarray, list[int] | None]:
    """Token ids of ``chunk`` (in the output dtype) and, for JSON lines, the length of each document."""
    tok = _WORKER_TOKENIZER
    assert tok is not None, "worker not initialized"
    if not chunk.jsonl:
        if isinstance(tok, ByteTokenizer):
            ids = np.frombuffer(chunk.data, dtype=np.uint8).astype(_WORKER_DTYPE)
            if chunk.is_last:
                ids = np.append(ids, _WORKER_DTYPE(tok.eos_id))
            return ids, None
        text = decode_utf8(chunk.data, chunk.source, chunk.offset)
        out = tok.encode_document(text) if chunk.is_last else tok.encode(text)
        return np.asarray(out, dtype=_WORKER_DTYPE), None
    lengths: list[int] = []
    parts: list[list[int]] = []
    text = decode_utf8(chunk.data, chunk.source, chunk.offset)
    for n, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        where = f"{chunk.source}:{chunk.first_line + n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not a JSON object ({exc.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get(_WORKER_JSON_KEY), str):
            raise DataError(f"{where}: expected a JSON object with a string field {_WORKER_JSON_KEY!r}")
        if not doc[_WORKER_JSON_KEY]:
            continue  # an empty document has no tokens, not even <eos>
        ids = tok.encode_document(doc[_WORKER_JSON_KEY])
        parts.append(ids)
        lengths.append(len(ids))
    flat = np.fromiter((i for p in parts for i in p), dtype=_WORKER_DTYPE, count=sum(lengths))
    return flat, lengths


# -- the driver ------------------------------------------------------------------------------------------


def _iter_chunks(files: Sequence[Path], chunk_bytes: int, progress: Any) -> Iterator[_Chunk]:
    for path in files:
        jsonl = logical_name(path).endswith(".jsonl")
        with open(path, "rb") as raw:
            stream = decompressing(raw, path)
            offset, line, consumed = 0, 1, 0
            pending: _Chunk | None = None
            for piece in iter_line_chunks(stream, chunk_bytes):
                if pending is not None:
                    yield pending
                pending = _Chunk(str(path), offset, line, piece, jsonl, is_last=False)
                offset += len(piece)
                line += piece.count(b"\n")
                # Progress in on-disk bytes: a compressed file advances by what was read from disk.
                now = raw.tell()
                progress.update(now - consumed)
                consumed = now
            if stream is not raw:
                stream.close()
            if pending is None:
                raise DataError(f"{path}: empty file (no text to tokenize)")
            yield _Chunk(pending.source, pending.offset, pending.first_line, pending.data, jsonl, is_last=True)


def _ordered_results(chunks: Iterator[_Chunk], workers: int, init_args: tuple[str, str, type]
                     ) -> Iterator[tuple[_Chunk, tuple[np.ndarray, list[int] | None]]]:
    """Tokenize chunks in order, with ``workers`` processes (in-process for 1).

    At most ``2 * workers`` chunks are in flight, so memory stays bounded on a corpus of any size
    (``Pool.imap`` would read the whole input ahead).
    """
    if workers <= 1:
        _init_worker(*init_args, False)
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk)
        return
    # fork where it exists: spawn re-imports the caller's __main__, which breaks (and respawns workers
    # forever) for `python -` or an unguarded script. The workers only run the tokenizer and numpy, never
    # torch's thread pools, so forking a parent that imported torch is safe here.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(*init_args, True)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_tokenize_chunk, (chunk,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _inputs_record(files: Sequence[Path]) -> list[dict[str, Any]]:
    return [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in files]


def preprocess(
    inputs: Sequence[PathLike],
    tokenizer_dir: PathLike,
    output_prefix: PathLike,
    workers: int = 2,
    *,
    chunk_bytes: int = 1 << 20,
    json_key: str = "text",
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Tokenize text files / folders into ``<prefix>.bin`` + ``<prefix>.idx`` + ``<prefix>.meta.json``.

    Args:
        inputs: files or folders (folders: every non-hidden file below, sorted); ``.jsonl`` files hold
            one ``{"text": ...}`` document per line, any other file is one document.
        tokenizer_dir: a directory saved by :meth:`Tokenizer.save`.
        output_prefix: output path without extension; its folder is created.
        workers: tokenizing processes (1 = in this process, where sentencepiece still encodes with one
            thread per core; word-level tokenization is pure Python and needs the processes).
            Byte-level tokenization of plain files is a memory copy, so it always runs in this
            process: worker processes would only add shipping every chunk there and back.
        chunk_bytes: newline-aligned piece size handed to a worker.
        json_key: the document field of ``.jsonl`` inputs.
        progress: show a tqdm progress bar (bytes read).
        force: rebuild even when an up-to-date output exists.

    Returns:
        The prefix, as given to :func:`load_tokens`.

    Raises:
        DataError: missing or empty input, undecodable bytes, bad JSON line, unusable tokenizer.
    """
    tokenizer_dir = Path(tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    files = expand_inputs(inputs)
    for path in files:  # cheap checks first, so a bad file stops the run before any tokenizing
        check_not_empty(path)
    bin_path, idx_path, meta_path = _paths(output_prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    job = {"inputs": _inputs_record(files), "tokenizer_fingerprint": tokenizer.fingerprint(), "json_key": json_key}
    if not force and _is_up_to_date(output_prefix, job):
        print(f"{output_prefix}: up to date (same inputs and tokenizer); use --force to rebuild", file=sys.stderr)
        return Path(output_prefix)

    # torch and megatron-core (seconds to import) only to write token files: reading them needs numpy alone
    import torch

    with warnings.catch_warnings():  # megatron-core warns about optional CUDA extensions on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder   # (see above)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin = bin_path.with_name(bin_path.name + ".tmp")
    tmp_idx = idx_path.with_name(idx_path.name + ".tmp")
    digest = hashlib.sha256()
    num_tokens = num_documents = 0
    builder = None
    total_bytes = sum(p.stat().st_size for p in files)
    bar = progress_display(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {bin_path.name}",
               disable=not progress, file=sys.stderr)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
        if isinstance(tokenizer, ByteTokenizer) and not any(logical_name(p).endswith(".jsonl") for p in files):
            workers = 1
        results = _ordered_results(_iter_chunks(files, chunk_bytes, bar), workers,
                                   (str(tokenizer_dir), json_key, dtype))
        for chunk, (ids, doc_lengths) in results:
            digest.update(ids.tobytes())
            num_tokens += int(ids.size)
            if doc_lengths is None:
                builder.add_item(torch.from_numpy(ids))
                if chunk.is_last:
                    builder.end_document()
                    num_documents += 1
            elif doc_lengths:
                for part in np.split(ids, np.cumsum(doc_lengths)[:-1]):
                    builder.add_item(torch.from_numpy(part))
                    builder.end_document()
                num_documents += len(doc_lengths)
        builder.finalize(str(tmp_idx))
        if num_tokens == 0:
            raise DataError("the inputs produced no tokens (only empty documents)")
        meta = {
            "meta_version": META_VERSION,
            "format": "megatron-core IndexedDataset (MMIDIDX v1) + this sidecar",
            "dtype": np.dtype(dtype).name,
            "num_tokens": num_tokens,
            "num_documents": num_documents,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_kind": tokenizer.kind,
            "bin_sha256": digest.hexdigest(),
            "idx_sha256": _file_sha256(tmp_idx),
            **job,
        }
        meta_path.unlink(missing_ok=True)  # from here until the end, the output is visibly incomplete
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
        tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_meta, meta_path)
    finally:
        bar.close()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return Path(output_prefix)


def _is_up_to_date(prefix: PathLike, job: dict[str, Any]) -> bool:
    try:
        meta = read_meta(prefix)
        _check_files(prefix, meta, checksum=True)   # a same-size corruption must be rebuilt, not kept
    except (DataError, KeyError, TypeError, ValueError):
        return False
    return all(meta.get(k) == v for k, v in job.items())


# -- reading ---------------------------------------------------------------------------------------------


_META_FIELDS = {"dtype": str, "num_tokens": int, "vocab_size": int, "bin_sha256": str, "idx_sha256": str,
                "tokenizer_fingerprint": str, "tokenizer_kind": str}


def read_meta(prefix: PathLike) -> dict[str, Any]:
    """The ``<prefix>.meta.json`` of a finished preprocessing run (see the module docstring)."""
    _, _, meta_path = _paths(prefix)
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path} is missing: {prefix} is not a finished token file (preprocessing never ran, "
            "was interrupted, or the prefix is wrong); run tools/preprocess_data.py"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path} is corrupt ({exc}); re-run tools/preprocess_data.py") from None
    if not isinstance(meta, dict) or meta.get("meta_version") != META_VERSION:
        version = meta.get("meta_version") if isinstance(meta, dict) else None
        raise DataError(f"{meta_path} has version {version}, expected {META_VERSION}; re-run preprocessing")
    wrong = [key for key, kind in _META_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if wrong or meta["dtype"] not in ("uint16", "int32") or meta["num_tokens"] < 0:
        raise DataError(f"{meta_path} is corrupt (missing or bad: {', '.join(wrong) or 'dtype / num_tokens'}); "
                        "re-run tools/preprocess_data.py")
    return meta


def _check_files(prefix: PathLike, meta: dict[str, Any], checksum: bool = False) -> None:
    bin_path, idx_path, _ = _paths(prefix)
    for path in (bin_path, idx_path):
        if not path.is_file():
            raise DataError(f"{path} is missing; re-run tools/preprocess_data.py")
    itemsize = np.dtype(meta["dtype"]).itemsize
    expected = meta["num_tokens"] * itemsize
    actual = bin_path.stat().st_size
    if actual != expected:
        raise DataError(
            f"{bin_path} is truncated or was changed: {actual} bytes, expected {expected} "
            f"({meta['num_tokens']} {meta['dtype']} tokens); re-run tools/preprocess_data.py"
        )
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _IDX_MAGIC:
        raise DataError(f"{idx_path} is not a megatron-core index (bad header); re-run tools/preprocess_data.py")
    _version, code, n_seq, _n_doc = struct.unpack("<QBQQ", head[9:34])
    if _DTYPE_CODES.get(code) is not np.dtype(meta["dtype"]).type:
        raise DataError(f"{idx_path}: dtype code {code} disagrees with {meta['dtype']} in meta.json")
    lengths = np.fromfile(idx_path, dtype=np.int32, count=n_seq, offset=34)
    if lengths.size != n_seq or int(lengths.sum(dtype=np.int64)) != meta["num_tokens"]:
        raise DataError(f"{idx_path} is truncated or disagrees with {bin_path}; re-run tools/preprocess_data.py")
    if checksum:
        for path, key in ((bin_path, "bin_sha256"), (idx_path, "idx_sha256")):
            if _file_sha256(path) != meta[key]:
                raise DataError(f"{path}: sha256 does not match {key} in meta.json (file corrupted or replaced)")


def load_tokens(prefix: PathLike, *, verify: str = "size", tokenizer: Tokenizer | None = None) -> np.memmap:
    """All tokens of a preprocessed split as a read-only 1-D ``numpy.memmap`` (documents concatenated,
    each ending with ``<eos>``).

    Args:
        prefix: the output prefix given to :func:`preprocess`.
        verify: ``"size"`` (default; file sizes and the index header, instant) or ``"checksum"``
            (also sha256 of both files; reads everything once).
        tokenizer: if given, the token file must have been made with exactly this tokenizer.

    Raises:
        DataError: missing, truncated or corrupted files, or a different tokenizer.
    """
    if verify not in ("size", "checksum"):
        raise ValueError(f"verify must be 'size' or 'checksum', not {verify!r}")
    meta = read_meta(prefix)
    _check_files(prefix, meta, checksum=verify == "checksum")
    if tokenizer is not None and tokenizer.fingerprint() != meta["tokenizer_fingerprint"]:
        raise DataError(
            f"{prefix} was tokenized with a different tokenizer ({meta['tokenizer_kind']}, vocab "
            f"{meta['vocab_size']}) than the one given ({tokenizer.kind}, vocab {tokenizer.vocab_size}); "
            "re-run preprocessing with this tokenizer or use the original one"
        )
    bin_path, _, _ = _paths(prefix)
    return np.memmap(bin_path, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
