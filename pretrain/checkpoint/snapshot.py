"""How an asynchronous save takes a consistent copy of a rank's state, so training can go on while a background
writer saves it (``run.async_snapshot``; :func:`snapshot_for` chooses, :class:`Snapshot` is the choice).

``host_copy`` (the default on a GPU, where the state must come to host memory to be written anyway): ``to_host``
copies every tensor of one file's nested state (dicts, lists, tuples, DeepSpeed's records) into one block of shared
memory and gives a :class:`HostCopy`: the block, and the state's structure with a :class:`HostTensor` record where
each tensor was. A copy, never a view of a live tensor, so the next optimizer step cannot change what is written,
and the writer may take as long as it needs. One block per file, not one per tensor: the writer process maps it
through one file descriptor, where one per tensor (hundreds per rank) each took a round trip through a thread of
the trainer (torch.multiprocessing's resource sharer): 0.3-0.8 s for 300 tensors of 333 MB in all, against 0.05 s
for 10. In the writer, ``HostCopy.materialize`` gives the state back with real tensors over the block, each
storage its own, as ``torch.save`` must see them.

``live`` (the default on CPU, where host memory is the training memory and a host copy would be a second copy of
the rank's share): nothing is copied. Each file's state keeps the live tensors (:func:`live_state`: containers
rebuilt and small records deep-copied at the save, so a list or a loss scaler the next step changes stays as it
was), the writer's thread writes them during the next step's forward and backward, and that step's optimizer
update waits until every file is written (``CheckpointWriter.fence``, a hook before the update): nothing a
checkpoint holds changes before then (CheckFreq's pipelined snapshot). The trainer's own small state (memory slots,
which the next forward replaces) is deep-copied at the save. No memory beyond a synchronous save's; the loop waits
only if writing takes longer than a forward and backward.

Storage sharing is kept (tensors that are views of one storage stay views of one copied storage, as
``torch.save`` would have written them), so an asynchronous checkpoint's files hold exactly what a synchronous
one's do. Containers are rebuilt (a live list of the loader's offsets cannot change underneath either);
anything else (numbers, strings, DeepSpeed's small records) is deep-copied.
"""
from __future__ import annotations

import copy
import errno
from dataclasses import dataclass
from typing import Callable

import torch

#: Each copied storage starts at a multiple of this many bytes in the block (any dtype's alignment), and takes at
#: least this many: two storages never start at one address, which torch.save would take for one storage.
_ALIGN = 64


@dataclass(frozen=True)
class HostTensor:
    """Where a tensor's copy lies in its file's block: its storage's bytes, and the tensor over them."""
    offset: int                 # the storage's first byte in the block
    nbytes: int                 # the storage's size
    dtype: torch.dtype
    storage_offset: int         # the tensor within its storage, in elements
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool         # torch.save keeps the flag; the copy is a leaf
    parameter: bool             # a torch.nn.Parameter


@dataclass
class HostCopy:
    """One file's state copied to host memory: ``block`` (uint8, shared memory) and ``state`` with HostTensor
    records in place of tensors."""
    block: torch.Tensor
    state: object

    def materialize(self):
        """The state with real tensors over the block (no copy); tensors that shared a storage share one."""
        data = self.block.numpy()
        storages: dict[int, torch.UntypedStorage] = {}

        def tensor(record: HostTensor) -> torch.Tensor:
            if record.offset not in storages:      # an empty one at address 0, as torch.save expects it
                storages[record.offset] = (torch.from_numpy(data[record.offset:record.offset + record.nbytes])
                                           .untyped_storage() if record.nbytes else torch.UntypedStorage(0))
            out = torch.empty(0, dtype=record.dtype).set_(storages[record.offset], record.storage_offset,
                                                          record.size, record.stride)
            if record.parameter:
                return torch.nn.Parameter(out, requires_grad=record.requires_grad)
            return out.requires_grad_(record.requires_grad)

        return _rebuild(self.state, tensor)        # every tensor of the state is a HostTensor record now


def _rebuild(obj, leaf, compact: bool = False):
    """``obj`` with ``leaf`` applied to every tensor / record, containers rebuilt, anything else deep-copied."""
    if isinstance(obj, (torch.Tensor, HostTensor)):
        return leaf(obj)
    if isinstance(obj, dict):
        if compact:     # rebuilt as clone_tensors_for_torch_save does (a state dict's _metadata is not kept)
            return type(obj)({k: _rebuild(v, leaf, compact) for k, v in obj.items()})
        out = copy.copy(obj)                  # keeps the mapping's type (OrderedDict), then fresh values
        for key, value in obj.items():
            out[key] = _rebuild(value, leaf, compact)
        return out
    if isinstance(obj, (list, tuple)) and (compact or type(obj) in (list, tuple)):
        return (list if isinstance(obj, list) else tuple)(_rebuild(v, leaf, compact) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    return copy.deepcopy(obj)


def to_host(obj, *, compact: bool = False) -> HostCopy:
    """``obj`` (one file's state) copied into one block of shared memory (see the module docstring).
    ``compact``: every tensor gets a storage of its own, laid out as ``clone()`` lays it out (what DeepSpeed's
    ``clone_tensors_for_torch_save`` does to the files it clones before writing), instead of keeping storages
    shared."""
    slots: dict[tuple, int] = {}             # a source storage -> its offset in the block (storage sharing)
    copies: list[tuple[int, torch.Tensor, tuple | None]] = []   # (offset, source, compacted: clone()'s stride)
    end = 0

    def place(t: torch.Tensor) -> HostTensor:
        nonlocal end
        storage = t.untyped_storage()
        if compact:
            nbytes, storage_offset, key = t.numel() * t.element_size(), 0, None
            stride = tuple(torch.empty_like(t, device="meta").stride())     # clone()'s layout, nothing allocated
        else:
            nbytes, storage_offset, stride = storage.nbytes(), t.storage_offset(), tuple(t.stride())
            # empty storages all have address 0: each stays its own, as torch.save sees them
            key = (storage.device, storage.data_ptr(), storage.nbytes()) if storage.nbytes() else None
        if key in slots:
            offset = slots[key]
        else:
            offset, end = end, end + -(-max(nbytes, 1) // _ALIGN) * _ALIGN
            copies.append((offset, t, stride if compact else None))
            if key is not None:
                slots[key] = offset
        kept = not compact                   # clone_tensors_for_torch_save detaches: a plain tensor, no grad
        return HostTensor(offset, nbytes, t.dtype, storage_offset, tuple(t.size()), stride,
                          kept and t.requires_grad, kept and isinstance(t, torch.nn.Parameter))

    state = _rebuild(obj, place, compact)
    try:
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(end, 1)))
    except RuntimeError as err:     # torch names a file of its own; say what it was for and the way out
        full = "No space left" in str(err)
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      f"{'No space left on device' if full else 'cannot allocate'} for the asynchronous save's "
                      f"host copy ({end} bytes; run.async_snapshot=live or run.async_save=false saves without one)",
                      "/dev/shm") from err
    with torch.no_grad():
        for offset, source, stride in copies:
            if stride is None:             # the whole storage, byte for byte
                storage = source.untyped_storage()
                raw = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                block[offset:offset + storage.nbytes()].copy_(raw)
            else:                          # the tensor alone, in clone()'s layout
                torch.empty(0, dtype=source.dtype).set_(block.untyped_storage(), offset // source.element_size(),
                                                        source.size(), stride).copy_(source)
    return HostCopy(block, state)


def live_state(obj):
    """``obj`` (one file's state) for a ``live`` snapshot: its tensors as they are, containers rebuilt, anything
    else deep-copied now. The writer must be done with it before the next optimizer update."""
    return _rebuild(obj, lambda tensor: tensor)


@dataclass(frozen=True)
class Snapshot:
    """How an asynchronous save takes each file's state (see the module docstring)."""
    take: Callable                  # (state, compact) -> what the writer gets for one of DeepSpeed's files
    take_own: Callable              # state -> the same for the trainer's own per-rank state
    live: bool                      # True: ``take`` keeps live tensors, written before the next optimizer update

    @property
    def compacts(self) -> bool:
        """Whether ``take`` lays tensors out as DeepSpeed's clone would (else DeepSpeed clones them itself)."""
        return not self.live


SNAPSHOTS = {
    "host_copy": Snapshot(lambda state, compact: to_host(state, compact=compact), to_host, live=False),
    "live": Snapshot(lambda state, compact: live_state(state), copy.deepcopy, live=True),
}


def snapshot_for(run, cuda: bool) -> Snapshot:
    """The :class:`Snapshot` that ``run.async_snapshot`` (``run``: the config's run section) names for a run on a
    GPU (``cuda``) or on CPU."""
    return SNAPSHOTS[run.snapshot_kind(cuda)]


def save_file(state, path: str) -> None:
    """``torch.save`` of one file's state: a :class:`HostCopy` (the writer process) or the live state itself."""
    torch.save(state.materialize() if isinstance(state, HostCopy) else state, path)
