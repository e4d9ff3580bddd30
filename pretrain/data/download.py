"""Fetch the standard LM corpora from their official sources, verify checksums, write train/valid/test.

Each dataset ends up as ``<out_dir>/<name>/{train,valid,test}.txt`` plus ``SOURCE.json`` (archive,
URL or local path, checksums), written last as the completion marker:

=============  ===================================  ==============================================
name           official archive                     splits
=============  ===================================  ==============================================
wikitext-103   wikitext-103-v1.zip (Salesforce)     wiki.{train,valid,test}.tokens, unchanged
wikitext-2     wikitext-2-v1.zip (Salesforce)       wiki.{train,valid,test}.tokens, unchanged
enwik8         enwik8.zip (Hutter Prize, M. Mahoney) bytes [0, 90M), [90M, 95M), [95M, 100M)
text8          text8.zip (M. Mahoney)               characters [0, 90M), [90M, 95M), [95M, 100M)
=============  ===================================  ==============================================

The enwik8 / text8 splits are the standard 90M / 5M / 5M of Transformer-XL's ``prep_enwik8.py`` /
``prep_text8.py``, kept as raw bytes (the byte tokenizer reads them as they are; Transformer-XL's
space-separated-integer text form is only a different spelling of the same stream).

Checksums: the sha256 of every archive, and of the files inside it (sha256 for WikiText-2, enwik8 and
text8; sha1 for WikiText-103's three files, the digest that is published for them). With ``local_dir``
(``--from DIR``) the archive, or the already extracted files, are taken from there instead of the
network and verified the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from pretrain.data.demo_corpus import write_demo_corpus
from pretrain.data.errors import DataError
from pretrain.progress import progress as progress_display
from pretrain.data.textio import PathLike

SPLITS = ("train", "valid", "test")
_BLOCK = 1 << 22


@dataclass(frozen=True)
class Corpus:
    """One dataset: where its archive lives and how to verify and split it."""

    name: str
    archive: str
    urls: tuple[str, ...]
    archive_sha256: str
    # WikiText: one archive member per split. enwik8 / text8: one member cut at byte offsets.
    members: dict[str, str] = field(default_factory=dict)
    member_digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # split -> (algorithm, hex)
    member: str = ""
    member_digest: tuple[str, str] = ("", "")
    member_bytes: int = 0
    split_bytes: tuple[int, int, int] = (0, 0, 0)


CORPORA: dict[str, Corpus] = {
    "wikitext-103": Corpus(
        name="wikitext-103",
        archive="wikitext-103-v1.zip",
        urls=(
            "https://wikitext.smerity.com/wikitext-103-v1.zip",
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
        ),
        archive_sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        members={s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
        member_digests={
            "train": ("sha1", "b7497e2dfe77e72cfef5e3dbc61b7b53712ac211"),
            "valid": ("sha1", "c326ac59dc587676d58c422eb8a03e119582f92b"),
            "test": ("sha1", "8a5befc548865cec54ed4273cf87dbbad60d1e47"),
        },
    ),
    "wikitext-2": Corpus(
        name="wikitext-2",
        archive="wikitext-2-v1.zip",
        urls=(
            "https://wikitext.smerity.com/wikitext-2-v1.zip",
            "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
        ),
        archive_sha256="92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
        members={s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
        member_digests={
            "train": ("sha256", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
            "valid": ("sha256", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
            "test": ("sha256", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        },
    ),
    "enwik8": Corpus(
        name="enwik8",
        archive="enwik8.zip",
        urls=("https://mattmahoney.net/dc/enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
        archive_sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
        member="enwik8",
        member_digest=("sha256", "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"),
        member_bytes=100_000_000,
        split_bytes=(90_000_000, 5_000_000, 5_000_000),
    ),
    "text8": Corpus(
        name="text8",
        archive="text8.zip",
        urls=("https://mattmahoney.net/dc/text8.zip", "http://mattmahoney.net/dc/text8.zip"),
        archive_sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
        member="text8",
        member_digest=("sha256", "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"),
        member_bytes=100_000_000,
        split_bytes=(90_000_000, 5_000_000, 5_000_000),
    ),
}


# -- checksums ---------------------------------------------------------------------------------------


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: PathLike, expected: str, algorithm: str = "sha256") -> None:
    """Raise :class:`DataError` unless ``path``'s digest is ``expected``."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DataError(
            f"{path}: {algorithm} checksum mismatch (expected {expected}, got {actual}); the file is "
            "corrupted, truncated or not the official one -- delete it and fetch it again"
        )


# -- getting the archive -------------------------------------------------------------------------------


def download(urls: tuple[str, ...], target: Path, sha256: str, *, timeout: float = 60.0, progress: bool = True) -> str:
    """Download the first reachable URL to ``target`` (via ``target.part``), verify it; return the URL.

    Raises:
        DataError: no URL reachable (the message says to use ``--from DIR``), or a checksum mismatch.
    """
    failures: list[str] = []
    part = target.with_name(target.name + ".part")
    for url in urls:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "lamemo-pretrain/0.1"})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress_display(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            part.unlink(missing_ok=True)
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
            continue
        try:
            verify_file(part, sha256)
        except DataError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, target)
        return url
    raise DataError(
        f"could not download {target.name} ({'; '.join(failures)}); download it on a machine with internet "
        f"access and run again with --from DIR (the folder holding {target.name})"
    )


def _find_local(local_dir: Path, corpus: Corpus, name: str, alias: str = "") -> Path | None:
    """``name`` (an archive or member path) in ``local_dir`` or ``local_dir/<dataset>``, also by base name
    or ``alias`` (``train.txt``: a folder this tool wrote)."""
    names = [name, Path(name).name] + ([alias] if alias else [])
    for folder in (local_dir, local_dir / corpus.name):
        for candidate in names:
            if (folder / candidate).is_file():
                return folder / candidate
    return None


# -- writing the splits ---------------------------------------------------------------------------------


def _copy_verified(source: BinaryIO, target: Path, algorithm: str, expected: str, label: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    digest = hashlib.new(algorithm)
    with open(tmp, "wb") as out:
        for block in iter(lambda: source.read(_BLOCK), b""):
            digest.update(block)
            out.write(block)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{label}: {algorithm} checksum mismatch (expected {expected}, got {digest.hexdigest()})")
    os.replace(tmp, target)


def _split_bytes_verified(source: BinaryIO, out: Path, corpus: Corpus, label: str) -> None:
    algorithm, expected = corpus.member_digest
    digest = hashlib.new(algorithm)
    tmps = [out / f"{s}.txt.tmp" for s in SPLITS]
    total = 0
    for tmp, size in zip(tmps, corpus.split_bytes, strict=True):
        with open(tmp, "wb") as f:
            remaining = size
            while remaining:
                block = source.read(min(_BLOCK, remaining))
                if not block:
                    break
                digest.update(block)
                f.write(block)
                remaining -= len(block)
                total += len(block)
    rest = source.read(1)
    if total != corpus.member_bytes or rest or digest.hexdigest() != expected:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise DataError(
            f"{label}: expected {corpus.member_bytes} bytes with {algorithm} {expected}; got "
            f"{total + len(rest)}{'+' if rest else ''} bytes with {digest.hexdigest()}"
        )
    for tmp, split in zip(tmps, SPLITS, strict=True):
        os.replace(tmp, out / f"{split}.txt")


def _open_members(corpus: Corpus, archive: Path | None, local_dir: Path | None) -> Iterator[tuple[str, BinaryIO, str]]:
    """Yield (split or "", readable member, label), from the archive or from extracted local files."""
    names = corpus.members if corpus.members else {"": corpus.member}
    if archive is not None:
        try:
            with zipfile.ZipFile(archive) as z:
                for split, member in names.items():
                    if member not in z.namelist():
                        raise DataError(f"{archive} has no member {member}")
                    with z.open(member) as f:
                        yield split, f, f"{archive}:{member}"
        except zipfile.BadZipFile as exc:
            raise DataError(f"{archive} is not a valid zip file ({exc})") from None
        return
    assert local_dir is not None
    for split, member in names.items():
        path = _find_local(local_dir, corpus, member, f"{split}.txt" if split else "")
        if path is None:
            raise DataError(
                f"--from {local_dir}: found neither {corpus.archive} nor the extracted file {member} "
                f"(looked in {local_dir} and {local_dir / corpus.name})"
            )
        with open(path, "rb") as f:
            yield split, f, str(path)


def prepare(name: str, out_dir: PathLike, *, local_dir: PathLike | None = None, keep_archive: bool = True,
            progress: bool = True) -> Path:
    """Fetch (or take from ``local_dir``), verify and split dataset ``name`` into ``out_dir/name``.

    Safe to re-run: a finished dataset (``SOURCE.json`` present, files of the recorded sizes) is kept.

    Returns:
        The dataset folder holding ``train.txt``, ``valid.txt``, ``test.txt``.
    """
    if name not in CORPORA:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(CORPORA)} (or 'demo')")
    corpus = CORPORA[name]
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    if _is_prepared(out):
        print(f"{out}: already prepared", flush=True)
        return out
    (out / "SOURCE.json").unlink(missing_ok=True)

    source: str
    archive: Path | None = None
    local: Path | None = None
    if local_dir is not None:
        local = Path(local_dir)
        if not local.is_dir():
            raise DataError(f"--from {local}: not a folder")
        archive = _find_local(local, corpus, corpus.archive)
        if archive is not None:
            verify_file(archive, corpus.archive_sha256)
        source = str(archive or local)
    else:
        archive = Path(out_dir) / corpus.archive
        if archive.is_file():
            verify_file(archive, corpus.archive_sha256)
            source = str(archive)
        else:
            source = download(corpus.urls, archive, corpus.archive_sha256, progress=progress)

    for split, stream, label in _open_members(corpus, archive, local):
        if corpus.members:
            algorithm, expected = corpus.member_digests[split]
            _copy_verified(stream, out / f"{split}.txt", algorithm, expected, label)
        else:
            _split_bytes_verified(stream, out, corpus, label)

    if local is None and archive is not None and not keep_archive:
        archive.unlink(missing_ok=True)
    record = {
        "dataset": name,
        "source": source,
        "archive": corpus.archive,
        "archive_sha256": corpus.archive_sha256,
        "files": {f"{s}.txt": (out / f"{s}.txt").stat().st_size for s in SPLITS},
    }
    tmp = out / "SOURCE.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "SOURCE.json")
    return out


def _is_prepared(out: Path) -> bool:
    try:
        record = json.loads((out / "SOURCE.json").read_text(encoding="utf-8"))
        return all((out / f).is_file() and (out / f).stat().st_size == n for f, n in record["files"].items())
    except (OSError, ValueError, KeyError):
        return False


def prepare_demo(out_dir: PathLike) -> Path:
    """Write the offline demo corpus (standard-library sources, see ``demo_corpus``) to ``out_dir/demo``."""
    out = Path(out_dir) / "demo"
    write_demo_corpus(out)
    return out

