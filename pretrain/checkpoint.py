"""Sharded checkpoints with everything exact resume needs, a completion marker written last, and fallback.

Layout of one checkpoint (one directory per step):

    <run.dir>/checkpoints/step_00000040/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   DeepSpeed's own shards
        trainer_state_rank_00000.pt ...     per rank: memory per micro-batch slot, data offset, RNG states
        trainer.json                        step, layout, split dims of tensor-parallel weights, MLflow run id
        consolidated/                       the weights (and Adam moments) merged over TP / PP / ZeRO shards in
                                            the single-device layout (config.json + model.safetensors +
                                            optimizer.safetensors + tokenizer/): what tools/export_checkpoint.py
                                            exports and what a changed layout reshards from (pretrain/reshard.py)
        config.yaml, tokenizer/             the resolved config and the tokenizer of the run
        COMPLETE.json                       written last: the manifest (every file and its size)

A crash or ``kill -9`` during a save leaves no marker; resume then takes the previous complete checkpoint.
A missing or truncated file is caught by the manifest check before anything is loaded.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lamemo_parallel import LaMemoMemory

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE.json"
TRAINER_META = "trainer.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, truncated, or made for another model / layout)."""


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def rank_state_path(ckpt: Path, rank: int) -> Path:
    return ckpt / f"trainer_state_rank_{rank:05d}.pt"


# ------------------------------------------------------------------------------------------ validation
def manifest(ckpt: Path) -> dict[str, int]:
    return {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != MARKER}


def validate(ckpt: str | Path) -> dict:
    """The checkpoint's marker, after checking that every file it lists is present with its size."""
    ckpt = Path(ckpt)
    marker = ckpt / MARKER
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete (no {MARKER}: the save was interrupted)")
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {ckpt}: {MARKER} is corrupt") from None
    for name, size in meta["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is missing {name}")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is truncated or altered "
                                  f"({path.stat().st_size} bytes, expected {size})")
    return meta


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, newest first (incomplete ones are skipped)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)
    return [p for p in found if (p / MARKER).is_file()]


def find_resume_checkpoint(run_dir: str | Path, resume: str, log=print) -> Path | None:
    """``auto``: the newest checkpoint that validates (falling back past broken ones); ``never``: None;
    otherwise the given directory, which must validate."""
    if resume == "never":
        return None
    if resume != "auto":
        validate(resume)
        return Path(resume)
    for ckpt in complete_checkpoints(run_dir):
        try:
            validate(ckpt)
            return ckpt
        except CheckpointError as err:
            log(f"warning: skipping checkpoint: {err}")
    return None


def stage_sizes(config) -> list[int]:
    """Layers per pipeline stage as this config resolves them."""
    from .layout import split_layers
    p = config.parallel
    return [len(r) for r in split_layers(config.model.n_layer, p.pipeline, p.pipeline_partition)]


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_to_state(memory: LaMemoMemory | None) -> dict | None:
    return None if memory is None else {k: v.detach().cpu() for k, v in memory.tensors().items()}


def memory_from_state(state: dict | None, device) -> LaMemoMemory | None:
    return None if state is None else LaMemoMemory.from_tensors(state).to(device=device)


# ------------------------------------------------------------------------------------------ save / load
def write_consolidated(out: Path, model_config, weights: dict[str, torch.Tensor], tokenizer_dir: str | None) -> None:
    """A from_pretrained directory (plain torch + safetensors) holding the merged weights."""
    from safetensors.torch import save_file

    from lamemo_parallel.model import CONFIG_NAME, WEIGHTS_NAME
    out.mkdir(parents=True, exist_ok=True)
    model_config.save(out / CONFIG_NAME)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "lamemo-v1"})
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)


def save_checkpoint(*, engine, streams, config, step: int, layout, tracker_run_id: str | None,
                    keep: int, log=print) -> Path:
    """Collective: every rank writes its shards and state, rank 0 writes the marker last, then prunes."""
    rank = dist.get_rank()
    root = checkpoint_root(config.run.dir)
    tag = step_tag(step)
    ckpt = root / tag
    if rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt)       # a leftover of an interrupted save of the same step
    dist.barrier()
    engine.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    full_weights = engine.full_model_state_dict()          # collective gather over TP / PP / ZeRO shards
    full_optimizer = engine.full_optimizer_state()         # collective; None where the engine cannot
    torch.save({"step": step, "memory": engine.memory_state(), "streams": streams.state_dict(), "rng": rng_state(),
                "layout": vars(layout)}, rank_state_path(ckpt, rank))
    if rank == 0:
        config.save(ckpt / "config.yaml")
        write_consolidated(ckpt / "consolidated", engine.model_config, full_weights, config.data.tokenizer)
        if full_optimizer is not None:
            from .reshard import save_full_optimizer_state
            save_full_optimizer_state(ckpt / "consolidated", full_optimizer, step)
        if config.data.tokenizer:
            shutil.copytree(config.data.tokenizer, ckpt / "tokenizer", dirs_exist_ok=True)
        (ckpt / TRAINER_META).write_text(json.dumps({
            "step": step, "layout": vars(layout), "variant": config.model.variant,
            "model": engine.model_config.to_dict(), "mlflow_run_id": tracker_run_id,
            "split_dims": engine.split_dims(), "world_size": dist.get_world_size(),
            "pipeline_partition": stage_sizes(config)}, indent=2))
    dist.barrier()
    if os.environ.get("LAMEMO_FAULT_KILL_DURING_SAVE") == str(step):
        # Fault injection for tests: a real SIGKILL after the shards are written, before the marker.
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        tmp = ckpt / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"step": step, "files": manifest(ckpt)}, indent=1))
        os.replace(tmp, ckpt / MARKER)
        for old in complete_checkpoints(config.run.dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        log(f"saved checkpoint {ckpt}")
    dist.barrier()
    return ckpt


def load_checkpoint(ckpt: Path, *, engine, streams, layout, log=print) -> dict:
    """Restore weights, optimizer, schedule (DeepSpeed), and - for the same layout - memory, data offset and
    RNG exactly. A changed layout reshards the weights and optimizer and resets the memory with a warning."""
    meta = json.loads((ckpt / TRAINER_META).read_text())
    saved_layout = meta["layout"]
    # DeepSpeed names per-layer pipeline files by position: another partition is another layout.
    same = saved_layout == vars(layout) and meta.get("pipeline_partition") == stage_sizes(engine.config)
    if meta["model"] != engine.model_config.to_dict():
        changed = sorted(k for k in meta["model"] if meta["model"][k] != engine.model_config.to_dict().get(k))
        raise CheckpointError(f"checkpoint {ckpt} was made for another model (differs in: {', '.join(changed)})")
    if same:
        engine.engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                      load_lr_scheduler_states=True)
        state = torch.load(rank_state_path(ckpt, dist.get_rank()), map_location="cpu", weights_only=False)
        engine.load_memory_state(state["memory"])
        streams.load_state_dict(state["streams"])
        set_rng_state(state["rng"])
    else:
        from .reshard import reshard_load
        log(f"warning: checkpoint layout {saved_layout} (stages {meta.get('pipeline_partition')}) differs from this "
            f"run's {vars(layout)} (stages {stage_sizes(engine.config)}): resharding "
            f"weights and optimizer state; the memory starts empty")
        reshard_load(ckpt, meta, engine)
        state = torch.load(rank_state_path(ckpt, 0), map_location="cpu", weights_only=False)
        streams.load_state_dict(state["streams"], strict=False)
    return meta
