"""Loading a checkpoint into a running job: the same layout restores everything exactly (DeepSpeed's own load
through the safe checkpoint engine, then each rank's memory, data offset and RNG); another layout reshards."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from . import safe_load
from .format import MARKER, TRAINER_META, CheckpointError, rank_state_path
from .save import layout_record
from .state import set_rng_state


def load_checkpoint(ckpt: Path, *, engine, streams, layout, log=print, restore_streams: bool = True) -> dict:
    """Restore weights, optimizer, schedule and - for the same layout - memory, data offset and RNG exactly.
    A changed layout reshards the weights and optimizer and resets the memory with a warning.
    ``restore_streams=False`` (the data changed, run.data_changed=restart_streams) keeps ``streams`` at
    position zero and the memory empty."""
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
        if restore_streams:
            engine.load_memory_state(state["memory"])
            streams.load_state_dict(state["streams"])
        set_rng_state(state["rng"])
    else:
        from .reshard import reshard_load
        changed = ", ".join(f"{k} {saved.get(k)} -> {ours[k]}" for k in ours if saved.get(k) != ours[k])
        log(f"warning: checkpoint layout differs from this run's ({changed}): resharding weights and optimizer "
            f"state from the shards; the memory starts empty")
        reshard_load(ckpt, marker, engine)
        if restore_streams:
            state = safe_load.safe_load(rank_state_path(ckpt, 0))
            streams.load_state_dict(state["streams"], strict=False)
    return meta
