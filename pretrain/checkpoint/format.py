"""What a checkpoint directory is, and how to tell a usable one from a broken one.

    <run.dir>/checkpoints/step_00000040/
        mp_rank_*_model_states.pt, *zero_pp_rank_*_optim_states.pt, layer_*   DeepSpeed's own shards
        trainer_state_rank_00000.pt ...   per rank: memory per micro-batch slot, data offset, RNG states
        shards_rank_00000.json ...        per rank: where each of its tensors lies in DeepSpeed's files
        trainer.json, config.yaml, tokenizer/
        COMPLETE.json                     written LAST by rank 0: layout, the sharding table (every tensor:
                                          full shape, dtype, TP split, where its pieces lie), the identity of
                                          the data (pretrain/data/identity.py), the size and sha256 of every
                                          file, and the sha256 of its own content (``manifest_sha256``). Its
                                          presence is the completion marker.

A checkpoint is usable when COMPLETE.json parses, matches its own ``manifest_sha256`` (an edited model,
layout or file list is a damaged manifest, not another model), lists every file with the size and sha256 the file has now,
and no pickle in it names anything but tensors, plain containers and the few DeepSpeed records allow-listed
in ``safe_load``. Anything else (interrupted save, truncated or corrupted file, damaged manifest, a planted
pickle payload) is a :class:`CheckpointError` naming the problem; ``run.resume=auto`` skips such a
checkpoint with a warning and takes the previous one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from ..distributed import first_problem
from .errors import CheckpointError
from .safe_load import check_pickle_is_safe

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
TRAINER_META = "trainer.json"
FORMAT_VERSION = 3                 # 3: COMPLETE.json carries its own sha256 and the data's identity
SELF_HASH = "manifest_sha256"


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"trainer_state_rank_{rank:05d}.pt"


def shard_index_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"shards_rank_{rank:05d}.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def manifest_hash(meta: dict) -> str:
    """sha256 of a manifest's content without its own hash field (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in meta.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(meta: dict) -> dict:
    """The manifest with its own hash added (what is written as COMPLETE.json)."""
    return {**meta, SELF_HASH: manifest_hash(meta)}


def listed_files(ckpt: Path) -> list[Path]:
    """Every file of a checkpoint directory except the marker, sorted."""
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name not in (MARKER, MARKER + ".tmp"))


def share_of(paths: list[Path], sizes: list[int], rank: int, world: int) -> list[int]:
    """Indices of the files rank ``rank`` of ``world`` hashes: largest first to the least-loaded rank, so each
    rank reads about total / world bytes (every rank computes the same assignment)."""
    load, owner = [0] * world, {}
    for i in sorted(range(len(paths)), key=lambda i: (-sizes[i], str(paths[i]))):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return [i for i in range(len(paths)) if owner[i] == rank]


def read_marker(ckpt: Path) -> dict:
    """The parsed COMPLETE.json, checked for the fields everything else relies on."""
    marker = ckpt / MARKER
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MARKER}: the save was interrupted)")
    try:
        meta = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {ckpt}: {MARKER} is damaged (not JSON)") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, dict) and files and all(isinstance(v, int) for v in files.values()):
        raise CheckpointError(f"checkpoint {ckpt} was written by an older version (format 1: a consolidated copy, "
                              f"no sha256); resume or export it with that version")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(files, dict) \
            or not files or not all(isinstance(v, dict) and isinstance(v.get("size"), int)
                                    and isinstance(v.get("sha256"), str) for v in files.values()):
        raise CheckpointError(f"checkpoint {ckpt}: {MARKER} is damaged (it needs 'step' and 'files' with the size "
                              f"and sha256 of every file; format {FORMAT_VERSION})")
    if SELF_HASH not in meta and meta.get("format") == 2:
        raise CheckpointError(f"checkpoint {ckpt} was written by an older version (format 2: no {SELF_HASH}, so "
                              f"an edit of {MARKER} cannot be told from the original); resume or export it with "
                              f"that version")
    if meta.get(SELF_HASH) != manifest_hash(meta):
        raise CheckpointError(f"checkpoint {ckpt}: {MARKER} was edited or damaged (its content does not match its "
                              f"{SELF_HASH}" + ("" if SELF_HASH in meta else ": none recorded") + ")")
    return meta


def check_files(ckpt: Path, meta: dict, *, rank: int = 0, world: int = 1) -> None:
    """Every listed file present with its size (all of them), and sha256 plus the pickle safety scan for this
    rank's share of them (``share_of``)."""
    names = sorted(meta["files"])
    for name in names:
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        size = path.stat().st_size
        if size != meta["files"][name]["size"]:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is truncated or altered ({size} bytes, expected "
                                  f"{meta['files'][name]['size']})")
    paths = [ckpt / n for n in names]
    for i in share_of(paths, [meta["files"][n]["size"] for n in names], rank, world):
        if sha256_file(paths[i]) != meta["files"][names[i]]["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: {names[i]} is corrupted (sha256 differs from the manifest)")
        if names[i].endswith(".pt"):
            check_pickle_is_safe(paths[i])
    trainer = ckpt / TRAINER_META
    if TRAINER_META in meta["files"] and rank == 0:
        try:
            t = json.loads(trainer.read_text())
            if not isinstance(t, dict) or not {"step", "layout", "model"} <= set(t):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint {ckpt}: {TRAINER_META} is damaged") from None


def validate(ckpt: str | Path) -> dict:
    """The checkpoint's marker, after checking every file it lists (presence, size, sha256, pickle safety)."""
    ckpt = Path(ckpt)
    meta = read_marker(ckpt)
    check_files(ckpt, meta)
    return meta


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with a marker, newest first (interrupted saves are left out)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    return [p for p in found if (p / MARKER).is_file()]


def _agreed_error(ckpt: Path) -> str | None:
    """Validate on every rank of the job (each hashes its share of the files); the first problem any rank
    found, the same on all ranks (None: usable)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    error = None
    try:
        check_files(ckpt, read_marker(ckpt), rank=rank, world=world)
    except CheckpointError as err:
        error = str(err)
    return first_problem(error)


def find_resume_checkpoint(run_dir: str | Path, resume: str, log=print) -> Path | None:
    """``auto``: the newest checkpoint that validates (falling back past broken ones with a warning);
    ``never``: None; otherwise the given directory, which must validate. Collective when a process group
    exists (the sha256 work is split over the ranks)."""
    if resume == "never":
        return None
    if resume != "auto":
        error = _agreed_error(Path(resume))
        if error:
            raise CheckpointError(error)
        return Path(resume)
    found = complete_checkpoints(run_dir)
    for ckpt in found:
        error = _agreed_error(ckpt)
        if error is None:
            return ckpt
        log(f"warning: skipping checkpoint: {error}")
    if found:
        # Starting fresh here would mix two runs in one directory and let checkpoint rotation delete the old
        # run's checkpoints (perhaps readable by an older version, or repairable): refuse and change nothing.
        raise CheckpointError(
            f"none of the {len(found)} checkpoints in {checkpoint_root(run_dir)} can be resumed (newest: "
            f"{found[0].name}); nothing was changed: repair or remove them, resume one with run.resume=PATH, or "
            f"start fresh with run.resume=never run.overwrite=true (moves the old run aside)")
    return None
