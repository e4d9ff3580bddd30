"""Export of a training checkpoint to a single-device from_pretrained directory (plain torch + safetensors)."""
from __future__ import annotations

import shutil
from pathlib import Path

from lamemo_parallel import LaMemoModel

from .checkpoint import CheckpointError, complete_checkpoints, validate


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if not (path / "trainer.json").exists() and (path / "checkpoints").is_dir():
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        return found[0]
    return path


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> tuple[LaMemoModel, dict, Path]:
    """Verify the checkpoint's manifest, load the weights it merged over TP / PP / ZeRO shards when it was
    saved (strictly: every tensor named on mismatch), write config.json + model.safetensors + tokenizer/ to
    ``out`` and reload the result to prove it loads. Returns (model, checkpoint marker, checkpoint path)."""
    ckpt = resolve_checkpoint(checkpoint)
    meta = validate(ckpt)
    source = ckpt / "consolidated"
    model = LaMemoModel.from_pretrained(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if (source / "tokenizer").is_dir():
        shutil.copytree(source / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    LaMemoModel.from_pretrained(out)
    return model, meta, ckpt
