"""The sources of ``data.train`` / ``data.valid``: parsing the config value, finding and loading their token
files, and what identifies them for resume (docs/data.md, "Mixtures of sources").

A source is a name, one or more token-file prefixes (a list, or globs matching the shards one preprocessing job
per shard wrote) read in order as one token array, and a weight. A plain prefix string is one source named
after its file stem. Nothing here imports torch: the config's validation uses :func:`parse_sources`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.errors import DataError

DEFAULT_SPAN_LEN = 512
"""``data.span_len``: tokens per span before rounding up to whole segments (pretrain.data.mixture says why)."""
SOURCE_KEYS = ("name", "path", "weight")
DATA_CHANGED_HINT = ("restore them, or set run.data_changed=restart_streams to start the streams afresh on the "
                     "new sources")
"""How a refused change of sources is resolved (issue 22's ``run.data_changed`` setting)."""
LAYOUT_CHANGED_HINT = ("restore the old layout (data.tgt_len, and the global stream count: data.streams keeps it on "
                       "another number of ranks), or set run.data_changed=restart_streams to start the streams "
                       "afresh")
"""How a loader state saved under another stream layout is resolved when it cannot be carried over."""


# ---------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``data.train`` / ``data.valid``: a name, one or more token-file prefixes (or globs of
    them, read in order as one source) and a weight (None where none was given)."""

    name: str
    paths: tuple[str, ...]
    weight: float | None


def _stem(path: str) -> str:
    return Path(path.rstrip("/")).name


def parse_sources(value: Any, key: str, *, weights_required: bool = True) -> list[SourceSpec]:
    """``data.train`` / ``data.valid`` as a list of sources: a prefix string is one source named after its
    stem with weight 1; a list holds prefixes or ``{name, path, weight}`` mappings. Raises DataError naming
    the key and the entry for an unknown field, a missing path, a negative, non-numeric or (for train) missing
    weight, all weights zero, or a duplicate name."""
    if isinstance(value, str):
        return [SourceSpec(_stem(value), (value,), 1.0)] if value else []
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{key} must be a token-file prefix or a non-empty list of sources, got {value!r}")
    specs = []
    for i, entry in enumerate(value):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be a prefix or a mapping with {', '.join(SOURCE_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise DataError(f"{where} has unknown field(s) {', '.join(map(str, unknown))} (known: "
                            f"{', '.join(SOURCE_KEYS)})")
        path = entry.get("path")
        paths = tuple(path) if isinstance(path, (list, tuple)) else (path,)
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise DataError(f"{where}.path must be a token-file prefix, a glob of them or a list, got {path!r}")
        weight = entry.get("weight", 1.0 if not weights_required else None)
        if weight is None and weights_required and len(value) > 1:
            raise DataError(f"{where} has no weight (every source of a mixture needs one)")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise DataError(f"{where}.weight must be a number, got {weight!r}")
            if weight < 0:
                raise DataError(f"{where}.weight must be >= 0, got {weight!r}")
        name = entry.get("name", _stem(paths[0]))
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise DataError(f"{where}.name must be a non-empty name without '/', got {name!r}")
        specs.append(SourceSpec(name, paths, None if weight is None else float(weight)))
    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise DataError(f"{key}: two sources are named {duplicate!r} (the name defaults to the file's stem): give "
                        "each source its own name")
    if weights_required and len(specs) > 1 and not any(s.weight for s in specs):
        raise DataError(f"{key}: all weights are zero")
    return specs


def expand_prefixes(spec: SourceSpec, key: str) -> list[str]:
    """A source's token-file prefixes in reading order: each ``path`` entry as given, or, when it holds glob
    characters, the prefixes of the finished token files (``*.meta.json``) it matches, sorted."""
    out = []
    for path in spec.paths:
        if glob.has_magic(path):
            found = sorted(m[:-len(".meta.json")] for m in glob.glob(path + ".meta.json"))
            if not found:
                raise DataError(f"{key} source {spec.name!r}: no token files match {path} (nothing named "
                                f"{path}.meta.json; run tools/preprocess_data.py)")
            out.extend(found)
        else:
            out.append(path)
    return out


# ---------------------------------------------------------------------------------------------- tokens
class TokenConcat:
    """Several token arrays read as one, in order (the shards of one source); indexing takes an integer array or
    a slice."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: np.ndarray | slice) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)), dtype=np.int64)
        index = np.asarray(index, dtype=np.int64)
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][index], dtype=np.int64)
        part = np.searchsorted(self.ends, index, side="right")
        starts = self.ends - np.array([len(p) for p in self.parts], dtype=np.int64)
        out = np.empty(index.shape, dtype=np.int64)
        for p in np.unique(part):
            mask = part == p
            out[mask] = self.parts[p][index[mask] - starts[p]]
        return out


@dataclass
class Source:
    """A loaded source: its name, weight, tokens and what identifies them (for the resume check)."""

    name: str
    weight: float
    tokens: Any
    prefixes: tuple[str, ...] = ()
    fingerprint: str = ""
    """sha256 of the token files' recorded digests (from their meta.json; nothing is re-read)."""


def load_sources(specs: list[SourceSpec], key: str, *, load) -> list[Source]:
    """Every source's shards through ``load(prefix)`` (the caller's ``load_tokens`` with its checks), after
    checking from their meta.json that all were made with one tokenizer. Errors name the key and the source."""
    # indexed imports the tokenizers (sentencepiece); the config's validation imports this module for parse_sources
    from pretrain.data.indexed import read_meta
    sources, first = [], None
    for spec in specs:
        prefixes = expand_prefixes(spec, key)
        parts, digest = [], hashlib.sha256()
        for prefix in prefixes:
            try:
                meta = read_meta(prefix)
            except (DataError, OSError) as err:
                raise DataError(f"{key} source {spec.name!r} ({prefix}): {err}") from None
            if first is None:
                first = (spec.name, meta["tokenizer_fingerprint"], meta["tokenizer_kind"], meta["vocab_size"])
            elif meta["tokenizer_fingerprint"] != first[1]:
                raise DataError(f"{key} source {spec.name!r} ({prefix}) was made with another tokenizer "
                                f"({meta['tokenizer_kind']}, vocab {meta['vocab_size']}) than source {first[0]!r} "
                                f"({first[2]}, vocab {first[3]}); preprocess every source with data.tokenizer")
            try:
                parts.append(load(prefix))
            except (DataError, OSError) as err:
                raise DataError(f"{key} source {spec.name!r} ({prefix}): {err}") from None
            digest.update(json.dumps([meta.get("bin_sha256"), meta["num_tokens"]]).encode())
        sources.append(Source(spec.name, 1.0 if spec.weight is None else spec.weight,
                              parts[0] if len(parts) == 1 else TokenConcat(parts), tuple(prefixes),
                              digest.hexdigest()[:16]))
    return sources



# ---------------------------------------------------------------------------------------------- resume
def sources_record(sources: Sequence[Source]) -> list[dict[str, Any]]:
    """What identifies the sources for resume: names, weights, sizes and token-file digests."""
    return [{"name": s.name, "weight": s.weight, "num_tokens": len(s.tokens), "fingerprint": s.fingerprint}
            for s in sources]


