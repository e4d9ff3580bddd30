"""What a checkpoint holds, read from its metadata only: no process group, no tensor loaded.

``COMPLETE.json`` gives the step, layout, model and every file's size; each rank's ``shards_rank_R.json`` gives
its loader state (the global stream count and the offset every stream has reached) and which stream each row
of its memory holds. Validation (``format.check_files``: sizes, sha256, pickle safety scan) reads the files'
bytes but unpickles nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError
from .format import check_files, read_marker
from .reshard_memory import saved_rank_indexes


def _streams(indexes: list[dict]) -> dict | None:
    """The loader's state and each data-parallel rank's streams, from the per-rank indexes."""
    state = next((i["streams"] for i in indexes if "streams" in i), None)
    if state is None:
        return None
    layout = state["layout"]
    per_rank = {}
    for index in indexes:
        if index.get("memory") and index["tp_rank"] == 0 and index["stage"] == 0:
            per_rank[int(index["dp_rank"])] = sorted(s for slot in index["memory"]["slots"] for s in slot)
    if state.get("mixture"):        # pretrain/data/mixture.py: spans of sources, no single offset
        return {"count": layout["num_streams"], "tgt_len": layout["tgt_len"], "span": layout["span"],
                "next_span": state["schedule"]["next_span"], "position": state["streams"]["pos"][0],
                "positions_differ": len(set(state["streams"]["pos"])) > 1,
                "read": {s["name"]: int(r) for s, r in zip(layout["sources"], state["read"])},
                "per_data_rank": dict(sorted(per_rank.items()))}
    pairs = (layout["num_tokens"] - 1) // layout["num_streams"]
    stream_len = pairs - pairs % layout["tgt_len"]
    return {"count": layout["num_streams"], "tgt_len": layout["tgt_len"], "num_tokens": layout["num_tokens"],
            "offset": state["offset"], "epoch": state["offset"] // stream_len, "stream_len": stream_len,
            "position": state["offset"] % stream_len, "per_data_rank": dict(sorted(per_rank.items()))}


def _memory(indexes: list[dict]) -> dict | None:
    records = [i["memory"] for i in indexes if i.get("memory")]
    if not records:
        return None
    names = sorted({n for r in records for n in r["names"]})
    return {"length": max(r["length"] for r in records), "tensors": names}


def checkpoint_info(ckpt: str | Path, *, verify: bool = True) -> dict:
    """Everything ``lamemo-checkpoint info`` shows, as plain data. A marker that cannot be read raises
    :class:`CheckpointError`; any other problem is reported in ``valid`` / ``error``."""
    ckpt = Path(ckpt)
    marker = read_marker(ckpt)
    info = {"checkpoint": str(ckpt), "step": marker["step"], "format": marker.get("format"),
            "layout": marker.get("layout"), "model": marker.get("model"),
            "files": {name: record["size"] for name, record in sorted(marker["files"].items())}}
    info["total_bytes"] = sum(info["files"].values())
    error = None
    try:
        indexes = saved_rank_indexes(ckpt)
        info["streams"], info["memory"] = _streams(indexes), _memory(indexes)
    except (ValueError, KeyError, TypeError) as err:     # a damaged index (also caught by the sha256 check)
        info["streams"] = info["memory"] = None
        error = f"checkpoint {ckpt}: a shards_rank_*.json is unreadable ({type(err).__name__})"
    if verify:
        try:
            check_files(ckpt, marker)
        except CheckpointError as err:
            error = str(err)
    info["valid"] = error is None if verify else None
    info["error"] = error
    return info


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, s in enumerate(ids):
        if start is None:
            start = s
        if i + 1 == len(ids) or ids[i + 1] != s + 1:
            out.append(f"{start}" if start == s else f"{start}-{s}")
            start = None
    return ", ".join(out)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def describe(info: dict) -> str:
    """The human-readable report."""
    lines = [f"checkpoint {info['checkpoint']} (format {info['format']})", f"step: {info['step']}"]
    lay = info.get("layout")
    if lay:
        lines.append(f"layout: tensor {lay['tensor']} x pipeline {lay['pipeline']} x data {lay['data']} (world "
                     f"{lay['world_size']}), ZeRO {lay['zero_stage']}, {lay['precision']}, pipeline partition "
                     f"{lay['pipeline_partition']}")
    m = info.get("model")
    if m:
        lines.append(f"model: variant {m['variant']}, {m['n_layer']} layers, d_model {m['d_model']}, {m['n_head']} "
                     f"heads x {m['d_head']}, d_inner {m['d_inner']}, vocabulary {m['vocab_size']}, tgt_len "
                     f"{m['tgt_len']}, mem_len {m['mem_len']}")
    s = info.get("streams")
    if s and "span" in s:
        spread = f"stream 0 {s['position']} pairs into its span of" if s.get("positions_differ") else \
            f"each {s['position']} pairs into its span of"        # streams out of step after a stream-count change
        lines.append(f"streams: {s['count']} over a mixture, {spread} {s['span']} "
                     f"(next global span {s['next_span']}, segments of {s['tgt_len']}); target tokens read: "
                     + ", ".join(f"{name} {read:,}" for name, read in s["read"].items()))
    elif s:
        lines.append(f"streams: {s['count']}, each at pair offset {s['offset']} (epoch {s['epoch']}, "
                     f"{s['position']} of {s['stream_len']} pairs per stream, segments of {s['tgt_len']})")
    if s:
        lines += [f"  data-parallel rank {r}: streams {_ranges(ids)}" for r, ids in s["per_data_rank"].items()]
    mem = info.get("memory")
    lines.append(f"memory: {mem['length']} rows per stream ({', '.join(mem['tensors'])})" if mem
                 else "memory: none recorded")
    lines.append(f"files: {len(info['files'])}, {_size(info['total_bytes'])}")
    width = max(map(len, info["files"]), default=0)
    lines += [f"  {name:<{width}}  {_size(size):>9}" for name, size in info["files"].items()]
    if info["valid"] is None:
        lines.append("valid: not checked (--no-verify)")
    else:
        lines.append("valid: yes" if info["valid"] else f"valid: NO: {info['error']}")
    return "\n".join(lines)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2)
