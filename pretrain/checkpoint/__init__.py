"""Sharded checkpoints: every rank saves only what it owns, a metadata file written last marks completion,
resume is exact on the same layout and reshards on another, export reads the shards offline.

    format      what a checkpoint is; integrity (sizes, sha256), discovery and fallback
    safe_load   loading without running code (weights_only + allow-list; DeepSpeed's checkpoint engine)
    state       per-rank RNG as plain tensors
    shard_index where each rank's tensors lie in DeepSpeed's files (recorded at save time)
    save        the collective save (no gather): the snapshot, then pruning or failure (full disk, permissions)
    snapshot    a rank's state copied to host memory, so an asynchronous save cannot see later steps
    writer      writes, hashes and seals a checkpoint, in a background thread (run.async_save) or at once
    rotation    which old checkpoints go (rotation, interrupted saves) and quarantine after divergence
    load        same-layout load, or resharding (reshard: weights, optimizer; reshard_memory: the recurrent memory
                of every stream, by global stream id, TP heads and pipeline stage)
    info        what a checkpoint holds, from its metadata only (``lamemo-checkpoint info``)
    shards      the offline reader: one merged tensor at a time (export, resharding)
    export      the offline export to a single-device ``from_pretrained`` directory (import it as
                ``pretrain.checkpoint.export``; it needs only the shards)
"""
from .format import (CHECKPOINTS, MARKER, TRAINER_META, CheckpointError, checkpoint_root, complete_checkpoints,
                     find_resume_checkpoint, rank_state_path, step_tag, validate)
from .load import load_checkpoint
from .rotation import quarantine_checkpoints, rotate_checkpoints
from .save import CheckpointSaveError, conclude_save, save_checkpoint, stage_sizes, start_save
from .state import rng_state, set_rng_state
from .writer import CheckpointWriter

__all__ = ["CHECKPOINTS", "MARKER", "TRAINER_META", "CheckpointError", "CheckpointSaveError", "CheckpointWriter",
           "checkpoint_root", "complete_checkpoints", "conclude_save", "find_resume_checkpoint", "load_checkpoint",
           "quarantine_checkpoints", "rank_state_path", "rotate_checkpoints", "rng_state", "save_checkpoint",
           "set_rng_state", "stage_sizes", "start_save", "step_tag", "validate"]
