"""Saving: every rank writes only what it owns; rank 0 writes the metadata file last.

No tensor crosses ranks. A save has two halves. ``start_save`` (main thread, collective, the training loop
waits for it): DeepSpeed's ``save_checkpoint`` runs with its collectives as usual, but its checkpoint engine
(``safe_load.SafeCheckpointEngine``) takes each file's state instead of writing it; with this rank's memory
slots, data offset and RNG (``trainer_state_rank_R.pt``) and where its tensors lie in DeepSpeed's files
(``shards_rank_R.json``) that is the rank's whole part. For an asynchronous save (``run.async_save``) it is
taken as ``run.async_snapshot`` says (``snapshot.py``: copied to host memory, or kept live and written before the
next optimizer update), so the next step cannot change it. Then the ``CheckpointWriter``
(``writer.py``) writes the files, the ranks hash them (each its share, about total / world bytes), and rank 0
writes ``COMPLETE.json`` (layout, the sharding table, shapes, dtypes, every file's size and sha256) by an
atomic rename, in the background or at once. ``conclude_save`` (main thread, once the writer is done on every
rank) prunes old checkpoints or raises the failure. A synchronous save is the same save waited for at once.
Save time and extra memory per rank scale with the rank's shard, not the model.

A failed write anywhere (full disk, permission denied) is agreed on by all ranks: the half-written checkpoint
is removed, the previous ones stay as they are, and :class:`CheckpointSaveError` says which path failed and why.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from lamemo_parallel.sharding import sharding_table

from ..distributed import first_problem
from ..data.identity import data_identity
from ..layout import split_layers
from . import safe_load
from .format import (FORMAT_VERSION, MARKER, TRAINER_META, CheckpointError, checkpoint_root, complete_checkpoints,
                     rank_state_path, sealed, shard_index_path, step_tag)
from .rotation import rotate_checkpoints
from .reshard_memory import memory_index
from .shard_index import rank_pieces
from .snapshot import snapshot_for
from .state import rng_state
from .writer import CheckpointWriter, SaveJob, SaveOutcome


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


def _own_files(ckpt: Path, engine, streams, config, step, layout, tracker_run_id, written: set[str],
               snapshot) -> tuple[list[tuple[str, object]], list[tuple[Path, str]]]:
    """This rank's own files, taken now: the per-rank state (through ``snapshot``) and the shard index; rank 0
    also the config and the trainer record. ``written``: the files DeepSpeed's save took, relative to ``ckpt``."""
    rank = dist.get_rank()
    pieces = rank_pieces(engine, str(ckpt.parent), str(ckpt))
    pieces = [p for p in pieces if all(loc is None or loc[0] in written
                                       for loc in (p["master"], p["exp_avg"], p["exp_avg_sq"]))]
    coords = _coordinates(engine)
    memory = engine.memory_state()
    state = snapshot({"step": step, "memory": memory, "streams": streams.state_dict(), "rng": rng_state(),
                      "layout": vars(layout)})
    # which stream each memory row holds, and the loader's state: resharding and `lamemo-checkpoint info` read
    # these without opening a tensor file
    texts = [(shard_index_path(ckpt, rank), json.dumps({**coords, "pieces": pieces, "streams": streams.state_dict(),
                                                        "memory": memory_index(memory, streams.slot_streams())}))]
    if rank == 0:
        texts += [(ckpt / "config.yaml", config.to_yaml()), (ckpt / TRAINER_META, json.dumps({
            "step": step, "layout": vars(layout), "variant": config.model.variant,
            "model": engine.model_config.to_dict(), "mlflow_run_id": tracker_run_id,
            "world_size": dist.get_world_size(), "pipeline_partition": stage_sizes(config),
            "zero_stage": config.parallel.zero_stage, "precision": config.parallel.precision}, indent=2))]
    return [(str(rank_state_path(ckpt, rank)), state)], texts


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


def start_save(*, engine, streams, config, step: int, layout, tracker_run_id: str | None,
               writer: CheckpointWriter) -> None:
    """Collective (main thread): take this rank's part of the checkpoint of ``step`` and hand it to ``writer``
    (which must have no save in flight). A failure before anything is handed over raises at once."""
    rank = dist.get_rank()
    root = checkpoint_root(config.run.dir)
    ckpt = root / step_tag(step)
    snapshot = (snapshot_for(config.run, cuda=engine.device.type == "cuda")
                if writer.asynchronous else None)
    ds_writer = safe_load.install(engine)
    ds_writer.begin(snapshot)
    failure = None
    try:
        if rank == 0:
            if ckpt.exists():
                shutil.rmtree(ckpt)       # a leftover of an interrupted save of the same step
            root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        failure = safe_load.write_failure(root, err)
    job = None
    if _agree(failure) is None:
        try:
            engine.save_shards(root, ckpt.name)      # DeepSpeed's collectives; its files are taken, not written
            failure = ds_writer.failures[0] if ds_writer.failures else None
            if failure is None:
                written = {os.path.relpath(path, ckpt) for path, _ in ds_writer.files}
                files, texts = _own_files(ckpt, engine, streams, config, step, layout, tracker_run_id, written,
                                          snapshot.take_own if snapshot else (lambda state: state))
                job = SaveJob(ckpt, step, ds_writer.files + files, texts,
                              tokenizer=Path(config.data.tokenizer) if rank == 0 and config.data.tokenizer else None,
                              seal=functools.partial(_write_marker, ckpt, engine.model_config, config,
                                                     layout, step) if rank == 0 else None,
                              live=snapshot is not None and snapshot.live)
        except (OSError, RuntimeError) as err:   # DeepSpeed writes a few small files itself (ZeRO's recovery
            # scripts); the host copy can find shared memory (/dev/shm) full
            failure = safe_load.write_failure(getattr(err, "filename", None) or ckpt, err)
        ds_writer.files = []
    failure = _agree(failure)
    if failure is not None:
        conclude_save(SaveOutcome(ckpt, step, failure), config=config, keep=0)
    writer.submit(job)


def conclude_save(outcome: SaveOutcome, *, config, keep: int, log=print) -> Path:
    """Collective (main thread, every rank with the same outcome): after a sealed checkpoint rank 0 keeps the
    ``keep`` newest complete ones; after a failure the half-written one is gone and this raises
    :class:`CheckpointSaveError`."""
    if outcome.failure is not None:
        if dist.get_rank() == 0:
            shutil.rmtree(outcome.ckpt, ignore_errors=True)
        dist.barrier()
        previous = complete_checkpoints(config.run.dir)
        raise CheckpointSaveError(f"could not save checkpoint {outcome.ckpt}: {outcome.failure}; the half-written "
                                  f"checkpoint was removed" + (f", the newest complete one is {previous[0]}"
                                                               if previous else ""))
    if dist.get_rank() == 0:
        rotate_checkpoints(config.run.dir, keep)
        waited = (f" (the optimizer update after it waited {outcome.update_waited:.2f} s for its files)"
                  if outcome.update_waited else "")
        log(f"saved checkpoint {outcome.ckpt}{waited}")
    return outcome.ckpt


def save_checkpoint(*, engine, streams, config, step: int, layout, tracker_run_id: str | None, keep: int,
                    writer: CheckpointWriter, log=print) -> Path:
    """Collective: the whole save of ``step``, waited for (after any save already in flight)."""
    previous = writer.wait()
    if previous is not None:
        conclude_save(previous, config=config, keep=keep, log=log)
    start_save(engine=engine, streams=streams, config=config, step=step, layout=layout,
               tracker_run_id=tracker_run_id, writer=writer)
    return conclude_save(writer.wait(), config=config, keep=keep, log=log)


def _write_marker(ckpt: Path, model_config, config, layout, step: int, hashes: list[dict]) -> None:
    """Rank 0's writer, once every rank's files are written and hashed: COMPLETE.json, by an atomic rename."""
    p = config.parallel
    files = {name: record for share in hashes for name, record in share.items()}
    marker = {"format": FORMAT_VERSION, "step": step, "layout": layout_record(config, layout),
              "model": model_config.to_dict(),
              "tensors": tensor_table(ckpt, model_config, layout.tensor,
                                      split_layers(config.model.n_layer, p.pipeline, p.pipeline_partition)),
              "data": data_identity(config.data), "files": dict(sorted(files.items()))}
    tmp = ckpt / (MARKER + ".tmp")
    tmp.write_text(json.dumps(sealed(marker)))
    os.replace(tmp, ckpt / MARKER)
