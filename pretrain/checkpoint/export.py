"""Export of a training checkpoint to a single-device ``from_pretrained`` directory, offline from the shards.

Streaming: the safetensors header is computed from the sharding table first, then each parameter is merged
from its pieces (``shards.ShardReader``), cast and appended to the file, one tensor at a time, so the
peak memory is about the largest merged tensor, not the model. The weights are the optimizer's fp32 master
copy (under bf16 / fp16 training too); ``dtype`` chooses what is written, and the file's metadata and
``export.json`` say both. No process group, no GPU; the result loads with plain torch
(``lamemo_parallel.LaMemoModel.from_pretrained``).

Atomic: everything is written into a hidden staging directory beside OUT (``config.json`` last, so a staging
directory left by a kill never loads) and moved into place by one rename; with ``overwrite`` the old export
and the new one trade places in one ``renameat2(RENAME_EXCHANGE)``. OUT is therefore always either the old
model or the new one, never a mix, and ``export.json`` names the source checkpoint's manifest hash and the
tokenizer's fingerprint so the weights, their record and the tokenizer can be checked against each other.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lamemo_parallel import LaMemoConfig
from lamemo_parallel.model_files import CONFIG_NAME, WEIGHTS_NAME, code_files, save_model_config

from .. import faults
from ..data.errors import DataError
from ..data.tokenizer import load_tokenizer
from ..progress import progress
from ..run_lock import pid_alive
from .format import SELF_HASH, CheckpointError, complete_checkpoints, validate
from .model_card import write_transformers_files
from .shards import ShardReader

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}
EXPORT_META = "export.json"
#: What an export directory holds when its export.json does not list its files (exports before the list).
EXPORT_FILES = ("config.json", "model.safetensors", EXPORT_META, "tokenizer")
RENAME_EXCHANGE = 2                # linux/fs.h: swap two paths atomically


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


def exported_files(out: Path) -> set[str]:
    """The names an existing export directory is made of (its export.json's list, or the fixed set)."""
    try:
        listed = json.loads((out / EXPORT_META).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    return set(listed) if isinstance(listed, list) else set(EXPORT_FILES)


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to write over a file, over an existing model unless asked to, and over a directory holding
    anything an export did not write (it is replaced as a whole)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is a file; the export writes a directory")
    if not out.is_dir():
        return
    entries = {p.name for p in out.iterdir()}
    if WEIGHTS_NAME in entries and not overwrite:
        raise CheckpointError(f"{out} already holds an exported model; choose another directory or pass --force")
    foreign = sorted(entries - exported_files(out))
    if foreign:
        raise CheckpointError(f"{out} holds files an export did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); the export replaces the whole directory: "
                              f"choose a new or empty directory")


def staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (same file system, so the final rename is atomic); staging
    directories of earlier exports to ``out`` whose process is gone are removed first."""
    prefix = f".{out.name}.export-"
    for old in out.parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    staging = out.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):             # ENOSYS, EINVAL, EOPNOTSUPP: this system or file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(b))


def put_in_place(staging: Path, out: Path) -> None:
    """Make ``staging`` be ``out`` in one rename; an old ``out`` ends up in ``staging`` (removed by the caller)."""
    if out.is_dir() and any(out.iterdir()):
        if _exchange(staging, out):
            return
        # Without an atomic swap: a kill between these two renames leaves no OUT (nothing loads) and the old
        # export complete in a hidden directory beside it, never a mix.
        aside = staging.with_name(staging.name + ".old")
        os.rename(out, aside)
        os.rename(staging, out)
        os.rename(aside, staging)
        return
    os.replace(staging, out)            # a missing or empty OUT


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
        f.flush()
        os.fsync(f.fileno())


def verify_export(out: Path, reader: ShardReader) -> None:
    """The written file has exactly the model's tensors with the model's shapes (read lazily: the header
    and nothing else), so ``LaMemoModel.from_pretrained`` will accept it."""
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        written = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = {name: list(e.shape) for name, e in reader.table.items()}
    if written != expected:
        raise CheckpointError(f"export {out} does not hold the model's tensors")


def _copy_or_raise(src: str, dst: str) -> None:
    try:
        shutil.copy2(src, dst)
    except OSError as err:
        raise _CopyFailed(err) from None


class _CopyFailed(Exception):
    """An OSError inside copytree, carried out of it unwrapped (copytree collects OSErrors only)."""

    def __init__(self, err: OSError):
        super().__init__(str(err))
        self.err = err


def tokenizer_record(ckpt: Path) -> dict:
    """The checkpoint's tokenizer as export.json records it (what the tools check a tokenizer against)."""
    if not (ckpt / "tokenizer").is_dir():
        return {}
    try:
        tokenizer = load_tokenizer(ckpt / "tokenizer")
    except DataError as err:
        raise CheckpointError(f"checkpoint {ckpt}: its tokenizer cannot be read ({err})") from None
    return {"tokenizer_fingerprint": tokenizer.fingerprint(), "tokenizer_vocab_size": tokenizer.vocab_size}


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: str = "float32",
                      overwrite: bool = False, show_progress: bool = False) -> ExportResult:
    """Verify the checkpoint (manifest hash, sizes, sha256, pickle safety), then write model.safetensors (from
    the fp32 masters, cast to ``dtype``), tokenizer/, export.json and config.json into a staging directory
    and move it into place as ``out`` in one rename. Every failure is a :class:`CheckpointError` (one line)
    and leaves ``out`` as it was."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    ckpt = resolve_checkpoint(checkpoint)
    meta = validate(ckpt)
    reader = ShardReader(ckpt, meta)
    out = Path(out)
    check_output(out, overwrite)
    info = {"format": "lamemo-v1", "step": str(meta["step"]), "dtype": dtype, "weights": "fp32 master",
            "training_precision": str(meta["layout"].get("precision")), "checkpoint": str(ckpt),
            "checkpoint_manifest_sha256": meta[SELF_HASH]}      # in the weights' metadata and in export.json
    record = {**info, **tokenizer_record(ckpt)}
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(out)
        write_streaming_safetensors(staging / WEIGHTS_NAME, reader.names,
                                    {n: list(e.shape) for n, e in reader.table.items()}, dtype, reader.full, info,
                                    show_progress)
        faults.kill_during_export("weights")
        if (ckpt / "tokenizer").is_dir():
            # file by file: copytree gathers its failures into one shutil.Error whose text is a list
            shutil.copytree(ckpt / "tokenizer", staging / "tokenizer", copy_function=_copy_or_raise)
        parameters = sum(int(torch.Size(e.shape).numel()) for e in reader.table.values())
        write_transformers_files(staging, ckpt, meta, reader.config, parameters)     # tokenizer files, README.md
        names = sorted({p.name for p in staging.iterdir()} | {EXPORT_META, CONFIG_NAME}
                       | {source.name for source in code_files()})
        (staging / EXPORT_META).write_text(json.dumps({**record, "files": names}, indent=2) + "\n")
        verify_export(staging, reader)
        faults.kill_during_export("record")
        save_model_config(staging, reader.config)   # config.json (+ the transformers code) last: without it nothing loads
        faults.kill_during_export("staged")
        put_in_place(staging, out)
        faults.kill_during_export("swapped")
    except (OSError, _CopyFailed) as failure:
        err = failure.err if isinstance(failure, _CopyFailed) else failure
        where = err.filename2 or err.filename or (staging or out)
        raise CheckpointError(f"cannot write the export to {out}: {where}: {err.strerror or err}; {out} was left "
                              f"as it was") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)      # the failed attempt, or the replaced old export
    return ExportResult(config=reader.config, step=meta["step"], checkpoint=ckpt, out=out, parameters=parameters,
                        dtype=dtype)
