"""What data a run trained on, as a checkpoint records it and a resume compares it.

One token-file prefix is identified by its ``.meta.json`` (pretrain/data/indexed.py): the sha256 of its ``.bin``,
the fingerprint of the tokenizer that made it and its token count. A run's data is a dict per split
(``train``, ``valid``) keyed by source name (for a single prefix, the file's stem), so that a run with several
weighted sources extends it without changing its shape. The path is recorded for messages only: a token file
that moved is the same data.
"""
from __future__ import annotations

from pathlib import Path

from .indexed import read_meta

#: The fields that decide whether two sources are the same data (``path`` is only for the messages).
COMPARED = ("sha256", "tokenizer", "tokens")


def source_identity(prefix: str | Path) -> dict:
    """The identity of one token-file prefix (read from its ``.meta.json``; raises DataError if it has none)."""
    meta = read_meta(prefix)
    return {"path": str(prefix), "sha256": meta["bin_sha256"], "tokenizer": meta["tokenizer_fingerprint"],
            "tokens": meta["num_tokens"]}


def data_identity(data) -> dict[str, dict[str, dict]]:
    """``{"train": {name: identity}, "valid": {...}}`` of a ``DataSection`` (``valid`` empty when unset)."""
    return {split: ({Path(prefix).name: source_identity(prefix)} if prefix else {})
            for split, prefix in (("train", data.train), ("valid", data.valid))}


def changed_sources(saved: dict, current: dict) -> dict[str, list[str]]:
    """Per split, a description of every source that was added, removed or is other data now. One source on
    each side under different names is compared as one (a token file that was renamed is the same data)."""
    changes: dict[str, list[str]] = {}
    for split in sorted(set(saved) | set(current)):
        old, new = saved.get(split) or {}, current.get(split) or {}
        if len(old) == len(new) == 1:
            pairs = [(next(iter(new)), next(iter(old.values())), next(iter(new.values())))]
        else:
            pairs = [(name, old.get(name), new.get(name)) for name in sorted(set(old) | set(new))]
        lines = []
        for name, before, after in pairs:
            if after is None:
                lines.append(f"{name} ({before.get('path')}) is no longer given")
            elif before is None:
                lines.append(f"{name} ({after['path']}) is new")
            else:
                differ = [f"{key} {_short(before.get(key))} -> {_short(after[key])}"
                          for key in COMPARED if before.get(key) != after[key]]
                if differ:
                    where = after["path"] if before.get("path") == after["path"] else \
                        f"{before.get('path')} -> {after['path']}"
                    lines.append(f"{name} ({where}): {', '.join(differ)}")
        if lines:
            changes[split] = lines
    return changes


def describe(changes: dict[str, list[str]]) -> str:
    return "; ".join(f"data.{split}: {', '.join(lines)}" for split, lines in changes.items())


def _short(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) > 12 else str(value)
