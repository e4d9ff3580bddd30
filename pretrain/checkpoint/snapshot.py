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


def _host_tensor(t: torch.Tensor, storages: dict, shared: bool, compact: bool) -> torch.Tensor:
    storage = t.untyped_storage()
    key = (storage.device, storage.data_ptr(), storage.nbytes())
    if compact:             # a storage of its own, as DeepSpeed's clone_tensors_for_torch_save gives
        nbytes, offset, key = t.numel() * t.element_size(), 0, None
        stride = torch.empty_like(t, device="meta").stride()       # clone()'s layout, nothing allocated
    else:
        nbytes, offset, stride = storage.nbytes(), t.storage_offset(), t.stride()
    if key is None or key not in storages:
        # shared: allocated in shared memory, so the writer process reads it without a copy
        copy_ = torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)
        if key is not None:
            storages[key] = copy_.copy_(storage)
    out = torch.empty(0, dtype=t.dtype).set_(copy_ if key is None else storages[key], offset, t.size(), stride)
    if key is None:
        out.copy_(t)
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad)       # torch.save keeps the flag; the copy is a leaf


def to_host(obj, storages: dict | None = None, *, shared: bool = False, compact: bool = False):
    """``obj`` with every tensor copied to host memory (see the module docstring); ``storages`` is the memo of
    copied storages within one file. ``shared``: the copies live in shared memory (for the writer process).
    ``compact``: every tensor gets a storage of its own (what DeepSpeed's ``clone_tensors_for_torch_save`` does
    to the files it clones before writing), instead of keeping storages shared."""
    storages = {} if storages is None else storages
    if isinstance(obj, torch.Tensor):
        with torch.no_grad():
            return _host_tensor(obj, storages, shared, compact)
    if isinstance(obj, dict):
        if compact:     # rebuilt as clone_tensors_for_torch_save does (a state dict's _metadata is not kept)
            return type(obj)({k: to_host(v, storages, shared=shared, compact=compact) for k, v in obj.items()})
        out = copy.copy(obj)                  # keeps the mapping's type (OrderedDict), then fresh values
        for key, value in obj.items():
            out[key] = to_host(value, storages, shared=shared, compact=compact)
        return out
    if isinstance(obj, (list, tuple)) and (compact or type(obj) in (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(to_host(v, storages, shared=shared, compact=compact)
                                                          for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)
