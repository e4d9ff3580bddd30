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
from .reshard_memory import MemoryReshardError, reshard_memory
from .save import layout_record
from .state import rng_state, set_rng_state


def load_checkpoint(ckpt: Path, *, engine, streams, layout, log=print) -> dict:
    """Restore weights, optimizer, schedule, memory, data offset and RNG. The same layout restores everything
    exactly; another layout reshards the weights, the optimizer state and the memory (every stream keeps its
    position and memory while the global stream count is unchanged) and restores the RNG states that still
    mean the same thing (``restorable_rng``)."""
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
        engine.load_memory_state(state["memory"])
        streams.load_state_dict(state["streams"])
        set_rng_state(state["rng"])
        return meta
    from .reshard import reshard_load, target_parts
    changed = ", ".join(f"{k} {saved.get(k)} -> {ours[k]}" for k in ours if saved.get(k) != ours[k])
    reshard_load(ckpt, marker, engine)
    state = safe_load.safe_load(rank_state_path(ckpt, 0), mmap=True)     # its memory stays on disk
    saved_streams = state["streams"].get("layout", {}).get("num_streams")
    streams.load_state_dict(state["streams"], strict=False)
    memory = note = None
    if saved_streams != streams.num_streams:
        note = f"the global stream count changed ({saved_streams} -> {streams.num_streams}): the memory starts empty"
    else:
        try:
            memory = reshard_memory(ckpt, marker, model_config=engine.model_config, tp_rank=engine.tp_rank,
                                    tp_size=layout.tensor, stage=int(engine.stage), parts=target_parts(engine),
                                    slot_streams=streams.slot_streams(), dtype=engine_dtype(engine))
        except MemoryReshardError as err:
            note = f"{err}: the memory starts empty"
    if memory is not None:
        engine.load_memory_state([{k: v.to(engine.device) for k, v in slot.items()} for slot in memory])
        faults.drop_memory_on_resume(engine)
    rng, exact = restorable_rng(ckpt, engine, saved, ours)
    set_rng_state(rng)
    kept = "; the memory of none of the streams was saved yet" if memory is None and note is None else ""
    log(f"warning: checkpoint layout differs from this run's ({changed}): resharding weights and optimizer "
        f"state from the shards; " + (note or f"all {streams.num_streams} streams keep their position and memory")
        + kept + "; RNG " + ("restored (every generator)" if exact else
                             "restored for python and numpy (dropout masks under another partition differ)"))
    return meta


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
    from .reshard_memory import saved_rank_indexes
    if all(saved.get(k) == ours[k] for k in ours if k not in ("zero_stage", "precision")):
        coords = (engine.tp_rank, int(engine.stage), int(engine.dp_rank))
        for index in saved_rank_indexes(ckpt):
            if (index["tp_rank"], index["stage"], index["dp_rank"]) == coords:
                return safe_load.safe_load(rank_state_path(ckpt, index["rank"]), mmap=True)["rng"], True
    first = safe_load.safe_load(rank_state_path(ckpt, 0), mmap=True)["rng"]
    return {**rng_state(), "python": first["python"], "numpy": first["numpy"]}, False
