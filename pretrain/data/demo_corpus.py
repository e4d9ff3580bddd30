"""A demo corpus that needs no download: the Python standard library's own ``.py`` source files.

It exists wherever Python does, so the README's first command runs offline. It is code, not prose, and
depends on the Python version (the files differ between releases), so it is for smoke runs and demos,
never for numbers to compare. The selection is deterministic for a given Python installation: the
standard library's ``.py`` files sorted by relative path, without tests (``test/``, ``tests/``,
``idle_test/``), installed packages (``site-packages``) and files over 256 KB (generated data tables),
kept while the total stays under ``max_bytes``.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from pretrain.data.errors import DataError

DEFAULT_MAX_BYTES = 4_000_000
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_MAX_FILE_BYTES = 256_000
# File i of the selection goes to valid if i % 20 == 18, to test if i % 20 == 19: a 90/5/5 split by
# file that spreads all three over the whole library.
_VALID, _TEST, _PERIOD = 18, 19, 20


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (the base install, also inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"])


def demo_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The standard-library ``.py`` files of the demo corpus, sorted by path relative to the library.

    Only files that decode as UTF-8 are kept; the sum of their sizes is at most ``max_bytes``.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"the Python standard library folder {root} does not exist")
    candidates = sorted(
        (p for p in root.rglob("*.py") if not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    chosen: list[Path] = []
    total = 0
    for path in candidates:
        size = path.stat().st_size
        if size == 0 or size > _MAX_FILE_BYTES or total + size > max_bytes:
            continue
        try:
            path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        chosen.append(path)
        total += size
    if len(chosen) < _PERIOD:
        raise DataError(f"only {len(chosen)} usable .py files under {root}; the demo corpus needs {_PERIOD}")
    return chosen


def write_demo_corpus(out_dir: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, Path]:
    """Write ``train.txt`` / ``valid.txt`` / ``test.txt`` into ``out_dir`` from :func:`demo_corpus_files`.

    Each split concatenates its files, each preceded by a ``# ---- <relative path> ----`` line, so one
    split file is one document for the preprocessing. Files are written under a temporary name and
    renamed, so a re-run never sees a half-written split; an identical existing file is left alone.

    Returns:
        ``{"train": path, "valid": path, "test": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for i, path in enumerate(demo_corpus_files(max_bytes)):
        split = "valid" if i % _PERIOD == _VALID else "test" if i % _PERIOD == _TEST else "train"
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):
            text += "\n"
        parts[split].append(f"# ---- {path.relative_to(root).as_posix()} ----\n{text}")
    written: dict[str, Path] = {}
    for split, texts in parts.items():
        target = out / f"{split}.txt"
        data = "".join(texts).encode("utf-8")
        # Leave an identical file untouched: its mtime is part of what makes a later preprocessing
        # run "up to date".
        if not (target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        written[split] = target
    return written
