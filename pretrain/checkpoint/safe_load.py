"""Loading checkpoint files without running code from them.

``torch.load(weights_only=False)`` executes whatever a pickle asks for, so a ``.pt`` file planted in (or
tampered with inside) a checkpoint directory could run code on every rank at resume. Every load here uses
``weights_only=True``: tensors, plain containers and numbers, plus an allow-list of the few record types
DeepSpeed itself pickles into its shards (its loss scaler, ZeRO stage enum and fragment addresses). Our own
files hold nothing else. DeepSpeed reads its shards through a checkpoint engine; ``install`` replaces the
engine's ``TorchCheckpointEngine`` with :class:`SafeCheckpointEngine`, which loads the same way and, when saving,
does not write: it takes each file's state (through the save's ``snapshot.Snapshot`` for an asynchronous save)
for the checkpoint writer (``writer.py``), which writes it with DeepSpeed's collectives long
done. A failed directory creation is recorded instead of raised, so every rank still reaches DeepSpeed's
closing barrier and the save can be rolled back together.

Before anything is loaded, ``check_pickle_is_safe`` (called by the manifest check) lists the globals a file's
pickle references without unpickling it and refuses any outside the allow-list.
"""
from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path

import torch

from .errors import CheckpointError

# DeepSpeed's records in its shard files (DeepSpeed 0.19): module path -> class name.
DEEPSPEED_RECORDS = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)
ALLOWED_GLOBALS = {f"{module}.{name}" for module, name in DEEPSPEED_RECORDS}


class OpaqueRecord:
    """Stands in for a DeepSpeed record when a shard is read without DeepSpeed (offline export): the
    tensors are what matters there, the record is kept as its plain fields."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


def _allowed(real_classes: bool) -> list:
    if not real_classes:
        return [(OpaqueRecord, f"{module}.{name}") for module, name in DEEPSPEED_RECORDS]
    return [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_RECORDS]


def check_pickle_is_safe(path: Path) -> None:
    """Refuse a file whose pickle references anything outside tensors, containers and the allow-list
    (read from the pickle's opcodes; nothing is unpickled)."""
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - ALLOWED_GLOBALS
    except Exception as err:        # not a torch zip file: truncated, overwritten, or not ours
        raise CheckpointError(f"{path} is not a readable torch file ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'unreadable'})") from None
    if unsafe:
        raise CheckpointError(f"{path} references {', '.join(sorted(unsafe))}: refused, loading it could run code "
                              f"(checkpoint files hold only tensors and plain data)")


def safe_load(path: str | Path, *, map_location="cpu", mmap: bool = False, real_classes: bool = True):
    """``torch.load`` that cannot run code: weights_only with the allow-list; a refused or unreadable file is
    a CheckpointError naming it. ``real_classes=False`` reads DeepSpeed's records as :class:`OpaqueRecord`
    (no deepspeed import, for offline tools)."""
    try:
        with torch.serialization.safe_globals(_allowed(real_classes)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"{path}: refused to load (it holds objects that could run code: {first})") \
                from None
        raise CheckpointError(f"{path} cannot be read ({first})") from None


def write_failure(path: str | Path, err: BaseException) -> str:
    """One line naming the path and the cause of a failed write; torch.save's C++ writer does not say
    'no space left' itself, so the file system is asked."""
    path = Path(path)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename or path}: {err.strerror}"
    directory = next((p for p in [path.parent, *path.parents] if p.exists()), Path("/"))
    try:
        stats = os.statvfs(directory)
        if stats.f_bavail * stats.f_frsize < (1 << 20):
            return f"{path}: No space left on device"
    except OSError:
        pass
    if not os.access(directory, os.W_OK):
        return f"{path}: Permission denied"
    text = str(err).strip().splitlines()
    return f"{path}: {text[0] if text else type(err).__name__}"


@functools.lru_cache(maxsize=None)
def _safe_engine_class():
    # DeepSpeed loads only where an engine exists: export and `lamemo-checkpoint info` read checkpoints without it
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine with safe loads; saving takes the files' states for the writer."""

        def __init__(self, config_params=None):
            super().__init__(config_params)
            self.zipfile_serialization = True          # mmap-able, and what the safety scan reads
            self.failures: list[str] = []
            self.files: list[tuple[str, object]] = []  # (path, state) taken by ``save``, for the writer
            self.snapshot = None

        def begin(self, snapshot) -> None:
            """A new save: files are taken as ``snapshot.take(state, compact)`` gives them (``snapshot.Snapshot``),
            or as the live state itself (None: a synchronous save, written before the loop goes on)."""
            self.failures.clear()
            self.files, self.snapshot = [], snapshot

        def preserves_storage_sharing(self):
            # True makes DeepSpeed clone a model file's tensors (compacting them) before handing them over; a host
            # copy does that itself on the way to host memory, so they are not copied twice
            return self.snapshot is None or not self.snapshot.compacts

        def save(self, state_dict, path: str):
            if self.snapshot is not None:       # compacted where DeepSpeed would have cloned: all but ZeRO's files
                state_dict = self.snapshot.take(state_dict, "optim_states" not in os.path.basename(path))
            self.files.append((path, state_dict))

        def makedirs(self, path, exist_ok=False):
            try:
                os.makedirs(path, exist_ok=exist_ok)
            except OSError as err:
                self.failures.append(write_failure(path, err))

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location=map_location if map_location is not None else "cpu")

    return SafeCheckpointEngine


def install(engine):
    """Put the safe checkpoint engine into a training engine's DeepSpeed engine (idempotent); returns it."""
    return engine.install_checkpoint_engine(_safe_engine_class())
