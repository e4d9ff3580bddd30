"""Saving: every rank writes only what it owns; rank 0 writes the metadata file last.

No tensor crosses ranks: DeepSpeed writes each rank's shards, each rank its memory slots, data offset and RNG
(``trainer_state_rank_R.pt``) and where its tensors lie in DeepSpeed's files (``shards_rank_R.json``). After a
barrier the ranks hash the files (each its share, about total / world bytes), and rank 0 writes
``COMPLETE.json`` (layout, the sharding table, shapes, dtypes, every file's size and sha256) by an atomic
rename. Save time and extra memory per rank therefore scale with the rank's shard, not the model.

A failed write anywhere (full disk, permission denied) is agreed on by all ranks: the half-written checkpoint
is removed, the previous ones stay as they are, and :class:`CheckpointSaveError` says which path failed and why.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from lamemo_parallel.sharding import sharding_table

from .. import faults
from ..distributed import first_problem
from ..data.identity import data_identity
from ..layout import split_layers
from . import safe_load
from .format import (FORMAT_VERSION, MARKER, TRAINER_META, CheckpointError, checkpoint_root, complete_checkpoints,
                     listed_files, rank_state_path, sealed, sha256_file, shard_index_path, share_of, step_tag)
from .rotation import rotate_checkpoints
from .reshard_memory import memory_index
from .shard_index import rank_pieces
from .state import rng_state


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (the message names the path and the cause)."""


def stage_sizes(config) -> list[int]:
    """Layers per pipeline stage as this config resolves them."""
    p = config.parallel
    return [len(r) for r in split_layers(config.model.n_layer, p.pipeline, p.pipeline_partition)]


def layout_record(config, layout) -> dict:
    """Everything that decides where a tensor's pieces lie: another value on resume means resharding."""
    p = config.parallel
    return {**vars(layout), "zero_stage": p.zero_stage, "precision": p.precision,
            "pipeline_partition": stage_sizes(config)}


def _coordinates(engine) -> dict:
    return {"rank": dist.get_rank(), "tp_rank": engine.tp_rank, "stage": int(engine.stage),
            "dp_rank": int(engine.dp_rank)}


def _agree(failure: str | None) -> str | None:
    return first_problem(failure)


def _write_own_files(ckpt: Path, engine, streams, config, step, layout, tracker_run_id) -> None:
    rank = dist.get_rank()
    pieces = rank_pieces(engine, str(ckpt.parent), str(ckpt))
    pieces = [p for p in pieces if all(loc is None or (ckpt / loc[0]).is_file()
                                       for loc in (p["master"], p["exp_avg"], p["exp_avg_sq"]))]
    coords = _coordinates(engine)
    memory = engine.memory_state()
    torch.save({"step": step, "memory": memory, "streams": streams.state_dict(),
                "rng": rng_state(), "layout": vars(layout)}, rank_state_path(ckpt, rank))
    # which stream each memory row holds, and the loader's state: resharding and `lamemo-checkpoint info` read
    # these without opening a tensor file
    shard_index_path(ckpt, rank).write_text(json.dumps({**coords, "pieces": pieces, "streams": streams.state_dict(),
                                                        "memory": memory_index(memory, streams.slot_streams())}))
    if rank == 0:
        config.save(ckpt / "config.yaml")
        if config.data.tokenizer:
            shutil.copytree(config.data.tokenizer, ckpt / "tokenizer", dirs_exist_ok=True)
        (ckpt / TRAINER_META).write_text(json.dumps({
            "step": step, "layout": vars(layout), "variant": config.model.variant,
            "model": engine.model_config.to_dict(), "mlflow_run_id": tracker_run_id,
            "world_size": dist.get_world_size(), "pipeline_partition": stage_sizes(config),
            "zero_stage": config.parallel.zero_stage, "precision": config.parallel.precision}, indent=2))


def _hash_share(ckpt: Path) -> dict[str, dict]:
    paths = listed_files(ckpt)
    sizes = [p.stat().st_size for p in paths]
    mine = share_of(paths, sizes, dist.get_rank(), dist.get_world_size())
    return {str(paths[i].relative_to(ckpt)): {"size": sizes[i], "sha256": sha256_file(paths[i])} for i in mine}


def tensor_table(ckpt: Path, model_config, tp_size: int, parts) -> dict[str, dict]:
    """Every parameter: full shape, TP split, owning stages and all its pieces (read from the per-rank
    indexes: rank 0 reads a few small JSON files, no tensor)."""
    table = sharding_table(model_config, tp_size, parts)
    out = {name: {"shape": list(e.shape), "split_dim": e.split_dim, "padded": e.padded, "stages": list(e.stages),
                  "pieces": []} for name, e in table.items()}
    for path in sorted(ckpt.glob("shards_rank_*.json")):
        index = json.loads(path.read_text())
        for piece in index["pieces"]:
            out[piece["name"]]["pieces"].append({**piece, "tp_rank": index["tp_rank"], "stage": index["stage"]})
    for name, entry in out.items():
        for piece in entry["pieces"]:
            del piece["name"]
    return out


def save_checkpoint(*, engine, streams, config, step: int, layout, tracker_run_id: str | None,
                    keep: int, log=print) -> Path:
    """Collective: every rank writes its shards and state, rank 0 writes the metadata file last, then prunes."""
    rank = dist.get_rank()
    root = checkpoint_root(config.run.dir)
    ckpt = root / step_tag(step)
    ds_writer = safe_load.install(engine)
    ds_writer.failures.clear()
    failure = None
    try:
        if rank == 0:
            if ckpt.exists():
                shutil.rmtree(ckpt)       # a leftover of an interrupted save of the same step
            root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        failure = safe_load.write_failure(root, err)
    if _agree(failure) is None:
        engine.save_shards(root, ckpt.name)
        failure = ds_writer.failures[0] if ds_writer.failures else None
        if failure is None:
            try:
                _write_own_files(ckpt, engine, streams, config, step, layout, tracker_run_id)
            except (OSError, RuntimeError) as err:
                failure = safe_load.write_failure(getattr(err, "filename", None) or ckpt, err)
    failure = _agree(failure)
    if failure is None:
        faults.kill_during_save(step)   # tests: a real SIGKILL after the shards, before the marker
        hashes = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, _hash_share(ckpt))
        if rank == 0:
            try:
                _write_marker(ckpt, engine, config, layout, step, hashes)
            except (OSError, RuntimeError) as err:
                failure = safe_load.write_failure(ckpt / MARKER, err)
        failure = _agree(failure)
    if failure is not None:
        if rank == 0:
            shutil.rmtree(ckpt, ignore_errors=True)
        dist.barrier()
        previous = complete_checkpoints(config.run.dir)
        raise CheckpointSaveError(f"could not save checkpoint {ckpt}: {failure}; the half-written checkpoint was "
                                  f"removed" + (f", the newest complete one is {previous[0]}" if previous else ""))
    if rank == 0:
        rotate_checkpoints(config.run.dir, keep)
        log(f"saved checkpoint {ckpt}")
    dist.barrier()
    return ckpt


def _write_marker(ckpt: Path, engine, config, layout, step: int, hashes: list[dict]) -> None:
    p = config.parallel
    files = {name: record for share in hashes for name, record in share.items()}
    marker = {"format": FORMAT_VERSION, "step": step, "layout": layout_record(config, layout),
              "model": engine.model_config.to_dict(),
              "tensors": tensor_table(ckpt, engine.model_config, layout.tensor,
                                      split_layers(config.model.n_layer, p.pipeline, p.pipeline_partition)),
              "data": data_identity(config.data), "files": dict(sorted(files.items()))}
    tmp = ckpt / (MARKER + ".tmp")
    tmp.write_text(json.dumps(sealed(marker)))
    os.replace(tmp, ckpt / MARKER)
