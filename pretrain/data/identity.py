"""What data a run trained on, as a checkpoint records it and a resume compares it.

One token-file prefix is identified by its ``.meta.json`` (pretrain/data/indexed.py): the sha256 of its ``.bin``,
the fingerprint of the tokenizer that made it and its token count. A source of ``data.train`` / ``data.valid``
(pretrain/data/sources.py: a plain prefix, or a named, weighted list of prefixes or globs) is identified by the
same fields over its prefixes, plus its weight. A run's data is a dict per split (``train``, ``valid``) keyed by
source name (a plain prefix is named after its file stem). The paths are recorded for messages only: a token file
that moved is the same data.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from .indexed import read_meta
from .sources import expand_prefixes, parse_sources

#: The fields that decide whether two sources are the same data (``path`` is only for the messages).
COMPARED = ("sha256", "tokenizer", "tokens", "weight")


def source_identity(prefix: str | Path) -> dict:
    """The identity of one token-file prefix (read from its ``.meta.json``; raises DataError if it has none)."""
    meta = read_meta(prefix)
    return {"path": str(prefix), "sha256": meta["bin_sha256"], "tokenizer": meta["tokenizer_fingerprint"],
            "tokens": meta["num_tokens"]}


def sources_identity(prefixes: list[str], weight: float | None) -> dict:
    """One source read from several prefixes in order (shards): one sha256 over theirs, the summed size."""
    parts = [source_identity(p) for p in prefixes]
    sha = parts[0]["sha256"] if len(parts) == 1 else \
        hashlib.sha256(" ".join(p["sha256"] for p in parts).encode()).hexdigest()
    return {"path": ", ".join(prefixes), "sha256": sha, "tokenizer": parts[0]["tokenizer"],
            "tokens": sum(p["tokens"] for p in parts), "weight": weight}


def data_identity(data) -> dict[str, dict[str, dict]]:
    """``{"train": {name: identity}, "valid": {...}}`` of a ``DataSection`` (``valid`` empty when unset)."""
    identity = {}
    for split, value in (("train", data.train), ("valid", data.valid)):
        key = f"data.{split}"
        specs = parse_sources(value, key, weights_required=split == "train") if value else []
        identity[split] = {spec.name: sources_identity(expand_prefixes(spec, key), spec.weight) for spec in specs}
    return identity


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
                differ = [f"{key} {_short(before.get(key))} -> {_short(after.get(key))}"
                          for key in COMPARED if before.get(key) != after.get(key)]
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
