"""Loading a checkpoint into a running job: the same layout restores everything exactly (DeepSpeed's own load
through the safe checkpoint engine, then each rank's memory, data offset and RNG); another layout reshards the
weights and optimizer state (``reshard``) and the memory (``reshard_memory``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from .. import faults
from . import safe_load
from .format import MARKER, TRAINER_META, CheckpointError, rank_state_path
from .reshard import reshard_load, target_parts
from .reshard_memory import MemoryReshardError, reshard_memory, saved_rank_indexes
from .save import layout_record
from .state import rng_state, set_rng_state


def load_checkpoint(ckpt: Path, *, engine, streams, layout, log=print, restore_streams: bool = True) -> dict:
    """Restore weights, optimizer, schedule, memory, data offset and RNG. The same layout restores everything
    exactly; another layout reshards the weights, the optimizer state and the memory (every stream keeps its
    position and memory while the global stream count is unchanged) and restores the RNG states that still
    mean the same thing (``restorable_rng``). ``restore_streams=False`` (the data changed,
    run.data_changed=restart_streams) keeps ``streams`` at position zero and the memory empty."""
    meta = json.loads((ckpt / TRAINER_META).read_text())
    marker = json.loads((ckpt / MARKER).read_text())
    if meta["model"] != engine.model_config.to_dict():
        changed = sorted(k for k in meta["model"] if meta["model"][k] != engine.model_config.to_dict().get(k))
        raise CheckpointError(f"checkpoint {ckpt} was made for another model (differs in: {', '.join(changed)})")
    saved, ours = marker.get("layout", {}), layout_record(engine.config, layout)
    if saved == ours:
        safe_load.install(engine)
        engine.load_shards(ckpt.parent, ckpt.name)
        state = safe_load.safe_load(rank_state_path(ckpt, dist.get_rank()))
        if not restore_streams:
            set_rng_state(state["rng"])
            return meta
        if state["streams"].get("layout") in (None, streams.layout()):
            engine.load_memory_state(state["memory"])
            streams.load_state_dict(state["streams"])
            set_rng_state(state["rng"])
            return meta
        head = "resume: the global stream count changed; "
    else:
        changed = ", ".join(f"{k} {saved.get(k)} -> {ours[k]}" for k in ours if saved.get(k) != ours[k])
        head = (f"warning: checkpoint layout differs from this run's ({changed}): resharding weights and optimizer "
                f"state from the shards; ")
        reshard_load(ckpt, marker, engine)
    note = (_continue_streams(ckpt, marker, engine, streams, layout) if restore_streams else
            "the data changed (run.data_changed=restart_streams): the streams start at position 0, the memory empty")
    rng, exact = restorable_rng(ckpt, engine, saved, ours)
    set_rng_state(rng)
    log(head + note + "; RNG " + ("restored (every generator)" if exact else
                                  "restored for python and numpy (dropout masks under another partition differ)"))
    return meta


def _continue_streams(ckpt: Path, marker: dict, engine, streams, layout) -> str:
    """The loader's position and the memory of every stream that continues, resharded onto this rank's slots;
    returns what happened, for the log line."""
    saved = safe_load.safe_load(rank_state_path(ckpt, 0), mmap=True)["streams"]     # its memory stays on disk
    old = saved.get("layout") or {}
    streams.load_state_dict(saved, strict=False)
    if {k: v for k, v in old.items() if k != "num_streams"} != \
            {k: v for k, v in streams.layout().items() if k != "num_streams"}:
        engine.reset_memory()
        return "the data changed (another token file or tgt_len): the memory starts empty"
    continuing = min(old["num_streams"], streams.num_streams)
    note = streams.change_note or f"all {streams.num_streams} streams keep their position and memory"
    if streams.num_streams > continuing:
        note += "; the added streams start with an empty memory (valid length 0, masked row by row)"
    slots = streams.slot_streams()
    if not any(s < continuing for ids in slots for s in ids):
        engine.reset_memory()
        return note
    try:
        memory = reshard_memory(ckpt, marker, model_config=engine.model_config, tp_rank=engine.tp_rank,
                                tp_size=layout.tensor, stage=int(engine.stage), parts=target_parts(engine),
                                slot_streams=slots, dtype=engine_dtype(engine), added_from=continuing)
    except MemoryReshardError as err:
        engine.reset_memory()
        return f"{note}; but {err}: the memory starts empty"
    if memory is None:
        engine.reset_memory()
        return note + "; no memory was saved yet"
    engine.load_memory_state([None if slot is None else {n: t.to(engine.device) for n, t in slot.items()}
                              for slot in memory])
    faults.drop_memory_on_resume(engine)
    return note


def engine_dtype(engine) -> torch.dtype:
    """The dtype of the engine's activations (and so of its memory): its parameters' dtype."""
    return next(engine.module.parameters()).dtype


def restorable_rng(ckpt: Path, engine, saved: dict, ours: dict) -> tuple[dict, bool]:
    """The RNG state this rank continues from after a layout change, and whether it is the whole saved state.
    Python's and numpy's generators are the same on every rank: rank 0's are restored. The torch generators
    drive dropout, whose masks depend on which rows and which stage a rank computes: they are restored (from the
    saved rank at the same tensor, pipeline and data-parallel coordinates) only when nothing but the ZeRO stage
    or the precision changed, so that the ranks compute exactly what they computed before; otherwise every rank
    keeps its fresh seed."""
    if all(saved.get(k) == ours[k] for k in ours if k not in ("zero_stage", "precision")):
        coords = (engine.tp_rank, int(engine.stage), int(engine.dp_rank))
        for index in saved_rank_indexes(ckpt):
            if (index["tp_rank"], index["stage"], index["dp_rank"]) == coords:
                return safe_load.safe_load(rank_state_path(ckpt, index["rank"]), mmap=True)["rng"], True
    first = safe_load.safe_load(rank_state_path(ckpt, 0), mmap=True)["rng"]
    return {**rng_state(), "python": first["python"], "numpy": first["numpy"]}, False
