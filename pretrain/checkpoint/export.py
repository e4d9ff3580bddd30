"""Export of a training checkpoint to a single-device ``from_pretrained`` directory, offline from the shards.

Streaming: the safetensors header is computed from the sharding table first, then each parameter is merged
from its pieces (``shards.ShardReader``), cast and appended to the file, one tensor at a time, so the
peak memory is about the largest merged tensor, not the model. The weights are the optimizer's fp32 master
copy (under bf16 / fp16 training too); ``dtype`` chooses what is written, and the file's metadata and
``export.json`` say both. No process group, no GPU; the result loads with plain torch
(``lamemo_parallel.LaMemoModel.from_pretrained``).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from lamemo_parallel import LaMemoConfig

from ..progress import progress
from .format import CheckpointError, complete_checkpoints, validate
from .model_card import write_transformers_files
from .shards import ShardReader

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}
EXPORT_META = "export.json"


@dataclass
class ExportResult:
    config: LaMemoConfig
    step: int
    checkpoint: Path
    out: Path
    parameters: int
    dtype: str


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not (path / "COMPLETE.json").exists() and (path / "checkpoints").is_dir():
        found = complete_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        return found[0]
    return path


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over a file or over an existing model unless asked to."""
    from lamemo_parallel.model_files import WEIGHTS_NAME
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is a file; the export writes a directory")
    if (out / WEIGHTS_NAME).exists() and not overwrite:
        raise CheckpointError(f"{out} already holds an exported model; choose another directory or pass --force")


def write_streaming_safetensors(path: Path, names: list[str], shapes: dict[str, list[int]], dtype: str,
                                produce, metadata: dict[str, str], show_progress: bool = False) -> None:
    """safetensors without holding the tensors: the header is known up front (shapes, dtype), then
    ``produce(name)`` gives each tensor in turn and its bytes are appended (``show_progress``: a progress
    display per tensor, pretrain.progress)."""
    torch_dtype, code = DTYPES[dtype]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        nbytes = itemsize * int(torch.Size(shapes[name]).numel())
        header[name] = {"dtype": code, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)                     # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in progress(names, desc=f"export {path.name}", unit="tensor", disable=not show_progress):
            tensor = produce(name).to(torch_dtype).contiguous()
            if list(tensor.shape) != list(shapes[name]):
                raise CheckpointError(f"{name}: merged shape {list(tensor.shape)}, expected {shapes[name]}")
            f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
            del tensor


def verify_export(out: Path, reader: ShardReader) -> None:
    """The written file has exactly the model's tensors with the model's shapes (read lazily: the header
    and nothing else), so ``LaMemoModel.from_pretrained`` will accept it."""
    from safetensors import safe_open

    from lamemo_parallel.model_files import WEIGHTS_NAME
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        written = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {name: list(e.shape) for name, e in reader.table.items()}
    if written != expected:
        raise CheckpointError(f"export {out} does not hold the model's tensors")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32",
                      overwrite: bool = False, show_progress: bool = False) -> ExportResult:
    """Verify the checkpoint (sizes, sha256, pickle safety), then write config.json, model.safetensors (from
    the fp32 masters, cast to ``dtype``), export.json and tokenizer/ to ``out``."""
    from lamemo_parallel.model_files import WEIGHTS_NAME, save_model_config
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint)
    meta = validate(ckpt)
    reader = ShardReader(ckpt, meta)
    out = Path(out)
    check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": "lamemo-v1", "step": str(meta["step"]), "dtype": dtype, "weights": "fp32 master",
            "training_precision": str(meta["layout"].get("precision")), "checkpoint": str(ckpt)}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    try:
        write_streaming_safetensors(tmp, reader.names, {n: list(e.shape) for n, e in reader.table.items()},
                                    dtype, reader.full, info, show_progress)
        os.replace(tmp, out / WEIGHTS_NAME)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write {tmp}: {err.strerror or err}") from None
    save_model_config(out, reader.config)          # config.json + the transformers code
    (out / EXPORT_META).write_text(json.dumps(info, indent=2) + "\n")
    if (ckpt / "tokenizer").is_dir():
        shutil.copytree(ckpt / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    verify_export(out, reader)
    parameters = sum(int(torch.Size(e.shape).numel()) for e in reader.table.values())
    write_transformers_files(out, ckpt, meta, reader.config, parameters)     # tokenizer files, README.md
    return ExportResult(config=reader.config, step=meta["step"], checkpoint=ckpt, out=out, parameters=parameters,
                        dtype=dtype)
