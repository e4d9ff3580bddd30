"""Resharding the recurrent memory on a layout change: every stream keeps its memory.

At save time every rank writes its memory slots (``trainer_state_rank_R.pt``: per micro-batch slot, name ->
tensor, this rank's pipeline stage and TP heads) and records in its ``shards_rank_R.json`` which stream each
row of each slot holds (``memory_index``). On another layout, each rank

1. computes the streams it now reads (the loader's ``stream_id``: a pure function of the global stream id, so
   a stream keeps its data whatever the data-parallel size, micro-batches or rows per micro-batch) and the
   memory tensors and heads it keeps (``lamemo_parallel.memory_sharding.memory_table``: the stage and head
   split of the layer that reads each tensor, derived from the weights' sharding table);
2. opens only the saved rank files that hold some of those rows (memory-mapped: nothing is read until sliced)
   and copies, one row at a time, the overlap of the saved heads with its own heads into its slots.

A rank therefore reads and holds its own memory plus one row in flight: never the memory of all streams.
Replicated tensors (LaMemo's embedding FIFO, XL's hidden levels) are read from the saved TP rank 0's copy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lamemo_parallel import LaMemoConfig
from lamemo_parallel.memory import VALID
from lamemo_parallel.memory_sharding import HEAD_DIM, memory_table, stage_memory_names

from .format import rank_state_path, shard_index_path
from .safe_load import safe_load


def memory_index(memory: list[dict | None], slot_streams: list[list[int]]) -> dict:
    """What ``shards_rank_R.json`` records of a rank's memory: the global stream id of every row of every slot,
    the tensors it holds and the memory length (no tensor data; a slot's per-row valid lengths, when it has
    rows without memory, are in the rank's state file next to its tensors)."""
    filled = [s for s in memory if s is not None]
    names = sorted(n for n in filled[0] if n != VALID) if filled else []
    length = int(filled[0][names[0]].shape[1]) if filled and names else 0
    return {"slots": [list(map(int, ids)) for ids in slot_streams], "names": names, "length": length}


def _parts(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out


class MemoryReshardError(ValueError):
    """The saved memory does not cover the streams this rank reads (the caller starts with an empty memory)."""


def reshard_memory(ckpt: Path, marker: dict, *, model_config: LaMemoConfig, tp_rank: int, tp_size: int,
                   stage: int, parts: list[range], slot_streams: list[list[int]], dtype: torch.dtype | None = None,
                   added_from: int | None = None) -> list[dict[str, torch.Tensor] | None] | None:
    """This rank's memory per micro-batch slot (name -> [rows, M, ...], plus ``valid`` [rows] when some row of
    the slot has fewer than M real memory rows: ``LaMemoMemory.valid``) from a checkpoint saved under another
    layout, or None when the checkpoint holds no memory (saved before the first step). Streams from
    ``added_from`` on (added by a restart with more streams) start with no memory: zero rows, valid length 0; a
    slot of added streams only is None. A row saved with fewer rows than its slot's M is left-padded. ``dtype``
    converts the activations (Z-bar stays float32 or wider), for a precision change."""
    saved = marker["layout"]
    source_table = memory_table(model_config, saved["tensor"], _parts(saved["pipeline_partition"]))
    target_table = memory_table(model_config, tp_size, parts)
    names = stage_memory_names(target_table, stage)
    where = {stream: (slot, row) for slot, ids in enumerate(slot_streams) for row, stream in enumerate(ids)}
    out: list[dict[str, torch.Tensor]] = [{} for _ in slot_streams]
    valid = [torch.zeros(len(ids), dtype=torch.long) for ids in slot_streams]
    found = [[added_from is not None and s >= added_from for s in ids] for ids in slot_streams]
    covered: dict[tuple[int, str], torch.Tensor] = {}
    any_memory = False
    for index in saved_rank_indexes(ckpt):
        record = index.get("memory")
        if record is None:
            raise MemoryReshardError(f"{shard_index_path(ckpt, index['rank']).name} records no memory index "
                                     f"(written by an older version)")
        any_memory |= bool(record["names"])
        hits = [(k, i, where[s]) for k, ids in enumerate(record["slots"]) for i, s in enumerate(ids) if s in where]
        wanted = [n for n in record["names"] if n in names
                  and (source_table[n].head_split or index["tp_rank"] == 0)]   # a replicated tensor: TP rank 0's
        if not hits or not wanted:
            continue
        state = safe_load(rank_state_path(ckpt, index["rank"]), mmap=True)["memory"]
        for k, i, (slot, row) in hits:
            found[slot][row] = True                  # a slot saved before its first step: no memory (valid 0)
            if state[k] is not None:
                saved_valid = state[k].get(VALID)   # older checkpoints have none: every row real
                valid[slot][row] = int(state[k][record["names"][0]].shape[1] if saved_valid is None
                                       else saved_valid[i])
        for name in wanted:
            src, dst = source_table[name].heads(index["tp_rank"]), target_table[name].heads(tp_rank)
            lo, hi = max(src.start, dst.start), min(src.stop, dst.stop)
            if lo >= hi:
                continue
            for k, i, (slot, row) in hits:
                if state[k] is None:
                    continue
                piece = state[k][name][i]                               # one row of one slot: [M, ...]
                if source_table[name].head_split:
                    piece = piece.narrow(HEAD_DIM - 1, lo - src.start, hi - lo)
                shape = list(state[k][name].shape)
                shape[0] = len(slot_streams[slot])
                if target_table[name].head_split:
                    shape[HEAD_DIM] = len(dst)
                if name not in out[slot] or out[slot][name].shape[1] < shape[1]:
                    out[slot][name] = _left_pad(out[slot].get(name), shape, piece.dtype)
                    covered[slot, name] = covered.get((slot, name), torch.zeros(shape[0], len(dst), dtype=torch.bool))
                target = out[slot][name][row]
                target = target[target.shape[0] - piece.shape[0]:]             # a shorter row: left-padded
                if target_table[name].head_split:
                    target = target.narrow(HEAD_DIM - 1, lo - dst.start, hi - lo)
                target.copy_(piece)
                covered[slot, name][row, lo - dst.start:hi - dst.start] = True
        del state
    if not any_memory:
        return None
    for slot, ids in enumerate(slot_streams):
        for row, stream in enumerate(ids):
            if not found[slot][row]:
                raise MemoryReshardError(f"the checkpoint holds no memory for stream {stream}")
        for name in names:
            mask = covered.get((slot, name))
            held = valid[slot] > 0
            if mask is not None and not bool(mask[held].all()) or mask is None and bool(held.any()):
                bad = [r for r in range(len(ids)) if held[r] and (mask is None or not bool(mask[r].all()))]
                raise MemoryReshardError(f"the checkpoint holds no {name} memory for stream {ids[bad[0]]}")
    length = max((t.shape[1] for slot in out for t in slot.values()), default=0)
    result: list[dict[str, torch.Tensor] | None] = []
    for slot, rows in zip(out, valid):
        if not slot or length == 0:
            result.append(None)
            continue
        slot = {n: _left_pad(t, [t.shape[0], length, *t.shape[2:]], t.dtype) for n, t in slot.items()}
        if dtype is not None:
            wide = torch.promote_types(dtype, torch.float32)
            slot = {n: t.to(wide if n.startswith("log_normalizers") else dtype) for n, t in slot.items()}
        if bool((rows < length).any()):
            slot[VALID] = rows
        result.append(slot)
    return result


def _left_pad(t: torch.Tensor | None, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``t`` (None: nothing) as the newest rows (dim 1) of a zero tensor of ``shape``."""
    out = torch.zeros(shape, dtype=dtype)
    if t is not None:
        out[:, shape[1] - t.shape[1]:] = t
    return out


def saved_rank_indexes(ckpt: Path) -> list[dict]:
    """Every rank's ``shards_rank_R.json`` of a checkpoint, in rank order (small JSON files, no tensor)."""
    indexes, rank = [], 0
    while shard_index_path(ckpt, rank).is_file():
        indexes.append(json.loads(shard_index_path(ckpt, rank).read_text()))
        rank += 1
    return indexes
