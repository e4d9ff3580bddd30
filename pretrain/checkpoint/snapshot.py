"""A consistent copy of a rank's state in host memory, so training can go on while a background writer saves it.

``to_host`` copies every tensor of a nested state (dicts, lists, tuples, DeepSpeed's records) into fresh CPU
storage: a clone, never a view of a live tensor, so the next optimizer step cannot change what is written.
Storage sharing is kept (tensors that are views of one storage stay views of one copied storage, as
``torch.save`` would have written them), so an asynchronous checkpoint's files hold exactly what a synchronous
one's do. Containers are rebuilt (a live list of the loader's offsets cannot change underneath either);
anything else (numbers, strings, DeepSpeed's small records) is deep-copied.
"""
from __future__ import annotations

import copy

import torch


def _host_tensor(t: torch.Tensor, storages: dict, shared: bool) -> torch.Tensor:
    storage = t.untyped_storage()
    key = (storage.device, storage.data_ptr(), storage.nbytes())
    if key not in storages:
        if shared:      # allocated in shared memory, so another process can write it without a copy
            storages[key] = torch.UntypedStorage._new_shared(storage.nbytes()).copy_(storage)
        else:           # a CUDA storage's .cpu() is a copy; a CPU storage's is itself, so it is cloned
            storages[key] = storage.cpu() if storage.device.type != "cpu" else storage.clone()
    out = torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad)       # torch.save keeps the flag; the copy is a leaf


def to_host(obj, storages: dict | None = None, *, shared: bool = False):
    """``obj`` with every tensor copied to host memory (see the module docstring); ``storages`` is the memo of
    copied storages within one file. ``shared``: the copies live in shared memory (for the writer process)."""
    storages = {} if storages is None else storages
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            return _host_tensor(obj, storages, shared)
    if isinstance(obj, dict):
        out = copy.copy(obj)                  # keeps the mapping's type (OrderedDict), then fresh values
        for key, value in obj.items():
            out[key] = to_host(value, storages, shared=shared)
        return out
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(to_host(v, storages, shared=shared) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)
