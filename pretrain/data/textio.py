"""Reading input corpora: folders expanded, ``.xz`` / ``.gz`` read transparently, newline-aligned chunks.

Everything works on bytes and splits only at ``b"\\n"``. That matters twice: a UTF-8 multi-byte sequence
never contains the byte 0x0A, so a chunk boundary never cuts a character; and every tokenizer here
encodes lines independently (see :mod:`pretrain.data.tokenizer`), so tokenizing chunk by chunk gives
exactly the tokens of the whole file. That is what lets preprocessing use several processes.
"""

from __future__ import annotations

import gzip
import lzma
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from pretrain.data.errors import DataError

PathLike = str | os.PathLike


def decompressing(raw: BinaryIO, path: PathLike) -> BinaryIO:
    """A decompressing reader over the open file ``raw`` if ``path`` ends in ``.xz`` / ``.gz``, else ``raw``.

    Closing the returned reader leaves ``raw`` open (the caller reads ``raw.tell()`` for progress).
    """
    suffix = Path(path).suffix
    if suffix == ".xz":
        return lzma.open(raw, "rb")  # type: ignore[return-value]
    if suffix == ".gz":
        return gzip.open(raw, "rb")  # type: ignore[return-value]
    return raw


def open_binary(path: PathLike) -> BinaryIO:
    """Open ``path`` for reading bytes, decompressing ``.xz`` / ``.gz`` on the fly."""
    path = Path(path)
    if path.suffix == ".xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def logical_name(path: PathLike) -> str:
    """The name of ``path`` without a compression suffix (``train.jsonl.xz`` -> ``train.jsonl``)."""
    name = Path(path).name
    for suffix in (".xz", ".gz"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Files named directly, plus every non-hidden file under each named folder (sorted, recursive).

    The order is deterministic (the given order, folders sorted by relative path) because it is the
    order of the tokens in the output. Raises :class:`DataError` for a missing path or when nothing is
    found.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise DataError(f"input folder {path} contains no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    if not files:
        raise DataError("no input files given")
    return files


def check_not_empty(path: PathLike) -> None:
    """Raise :class:`DataError` if ``path`` holds no bytes (after decompression)."""
    with open_binary(path) as f:
        try:
            first = f.read(1)
        except (lzma.LZMAError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read ({exc})") from None
    if not first:
        raise DataError(f"{path}: empty file (no text to tokenize)")


def decode_utf8(data: bytes, source: str, offset: int = 0) -> str:
    """Decode strictly; on failure name the file and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 4]
        raise DataError(
            f"{source}: undecodable bytes at byte offset {offset + exc.start} ({bad!r} is not UTF-8); "
            "convert the file to UTF-8 or use the byte-level tokenizer"
        ) from None


def read_text(path: PathLike) -> str:
    """Whole file as text (UTF-8, strict); empty files and bad bytes raise :class:`DataError`."""
    with open_binary(path) as f:
        data = f.read()
    if not data:
        raise DataError(f"{path}: empty file (no text to tokenize)")
    return decode_utf8(data, str(path))


def iter_line_chunks(stream: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    """Yield consecutive pieces of ``stream`` of about ``chunk_bytes`` that end at a newline.

    Only the final piece may lack a trailing newline. A single line longer than ``chunk_bytes`` is
    kept whole (a piece always ends at a line boundary).
    """
    carry = b""
    while True:
        block = stream.read(chunk_bytes)
        if not block:
            break
        data = carry + block
        cut = data.rfind(b"\n")
        if cut < 0:
            carry = data
            continue
        carry = data[cut + 1 :]
        yield data[: cut + 1]
    if carry:
        yield carry


def iter_lines(path: PathLike, chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """Lines of a UTF-8 text file without their newline (``"\\n"`` only, like every tokenizer here)."""
    offset = 0
    with open_binary(path) as f:
        for piece in iter_line_chunks(f, chunk_bytes):
            text = decode_utf8(piece, str(path), offset)
            offset += len(piece)
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            yield from lines
