"""The state carried between segments (docs/method.md §3), as one typed object.

LaMemo (variants 3, 31, 32, 33) keeps
  * ``embeddings``      [B, M, d]        FIFO of the input embeddings (after embedding dropout),
  * ``vectors[l]``      [B, M, H, d_h]   C-bar: per-head attention vectors before W_o,
  * ``log_normalizers[l]`` [B, M, H]     Z-bar: log-sum-exp of every logit the position attended (float32).
Transformer-XL (variant 0) keeps the hidden states entering each layer instead:
  * ``embeddings``      [B, M, d]        level 0 (input embeddings),
  * ``hidden[l]``       [B, M, d]        the output of layer l, i.e. the input of layer l + 1 (l < L - 1).
All rows are aligned: row i of every tensor describes the same token. Nothing here carries gradient once
``detach`` has been called (the model detaches what it returns).

Per-row validity. The memory has one length M per batch, but a batch row may hold fewer real memory rows: a
stream added by a restart with more streams starts empty in a micro-batch whose other rows continue with their
memory. ``valid`` [B] (long) then says how many of the M rows of each batch row are real; the real ones are the
newest (the memory is left-padded: rows 0 .. M - valid - 1 of that batch row are zeros and masked as keys, like
an attention mask over the memory). ``valid = None`` means every row is real (the usual case, and the only one a
segment-by-segment run produces), and the model then runs exactly as without this field. Each step adds N real
rows to every batch row (``advance_valid``); once every row holds M real rows, ``valid`` is None again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_FORMAT = "lamemo-memory-v1"
#: The name of the per-row valid lengths among the memory's tensors (``LaMemoMemory.tensors``), when present.
VALID = "valid"


def compact_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and owns its whole storage, else a compact copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def newest_rows(old: torch.Tensor, new: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The newest ``n_rows`` rows (dim 1) of [old; new] without building the whole concatenation."""
    if n_rows <= new.shape[1]:
        return new[:, new.shape[1] - n_rows:]
    return torch.cat([old[:, max(0, old.shape[1] - (n_rows - new.shape[1])):], new], dim=1)


def advance_valid(valid: torch.Tensor | None, added: int, length: int) -> torch.Tensor | None:
    """The valid lengths after a step that appended ``added`` real rows to every batch row and kept the newest
    ``length`` rows: ``min(valid + added, length)``; None (every row real) once all rows are real."""
    if valid is None:
        return None
    valid = (valid + added).clamp_(max=length)
    return None if bool((valid == length).all()) else valid


def missing_rows(valid: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Per batch row, how many of the ``length`` oldest memory rows are not real (``length - valid``): the
    keys before that offset are masked for that row. None when every row is real."""
    return None if valid is None else length - valid


def clear_invalid(t: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``t`` [B, M, ...] with the rows that are not real (the oldest ``M - valid`` of each batch row) zeroed,
    out of place (the input may be saved for backward); ``t`` itself when every row is real."""
    if valid is None:
        return t
    M = t.shape[1]
    real = torch.arange(M, device=t.device)[None, :] >= (M - valid.to(t.device))[:, None]      # [B, M]
    return torch.where(real.view(*real.shape, *([1] * (t.dim() - 2))), t, torch.zeros((), dtype=t.dtype,
                                                                                       device=t.device))


class MemoryMismatchError(ValueError):
    """A memory that does not fit the model or the batch it is used with."""


@dataclass
class LaMemoMemory:
    embeddings: torch.Tensor
    vectors: list[torch.Tensor] = field(default_factory=list)
    log_normalizers: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    #: [B] long: how many of the M rows of each batch row are real (the newest ones); None: all of them.
    valid: torch.Tensor | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def empty(cls, *, batch_size: int, n_layer: int, d_model: int, n_head: int, d_head: int, lookahead: bool,
              device=None, dtype=torch.float32) -> "LaMemoMemory":
        """A memory with M = 0 rows (the first segment)."""
        emb = torch.zeros(batch_size, 0, d_model, device=device, dtype=dtype)
        if lookahead:
            return cls(
                embeddings=emb,
                vectors=[torch.zeros(batch_size, 0, n_head, d_head, device=device, dtype=dtype)
                         for _ in range(n_layer)],
                log_normalizers=[torch.zeros(batch_size, 0, n_head, device=device,
                                             dtype=torch.promote_types(dtype, torch.float32))
                                 for _ in range(n_layer)],
            )
        return cls(embeddings=emb,
                   hidden=[torch.zeros(batch_size, 0, d_model, device=device, dtype=dtype)
                           for _ in range(n_layer - 1)])

    # ------------------------------------------------------------------ properties
    @property
    def length(self) -> int:
        """M: number of memory rows."""
        return self.embeddings.shape[1]

    @property
    def batch_size(self) -> int:
        return self.embeddings.shape[0]

    @property
    def is_lookahead(self) -> bool:
        return bool(self.vectors)

    def layer(self, index: int) -> tuple[torch.Tensor, ...]:
        """What layer ``index`` reads (``DecoderLayer.step``): LaMemo (C-bar, Z-bar); XL (its cached input,)."""
        if self.is_lookahead:
            return self.vectors[index], self.log_normalizers[index]
        return ((self.embeddings, *self.hidden)[index],)

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, ...]], embeddings: torch.Tensor | None = None,
                    ) -> "LaMemoMemory":
        """Inverse of ``layer``: every layer's memory, plus the embedding FIFO for LaMemo (for XL the cached
        input of layer 0 is the embeddings)."""
        if embeddings is not None:
            return cls(embeddings=embeddings, vectors=[v for v, _ in layers], log_normalizers=[z for _, z in layers])
        return cls(embeddings=layers[0][0], hidden=[h for (h,) in layers[1:]])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor view (the on-disk layout)."""
        out = {"embeddings": self.embeddings}
        out.update({f"vectors.{i}": t for i, t in enumerate(self.vectors)})
        out.update({f"log_normalizers.{i}": t for i, t in enumerate(self.log_normalizers)})
        out.update({f"hidden.{i}": t for i, t in enumerate(self.hidden)})
        if self.valid is not None:
            out[VALID] = self.valid
        return out

    # ------------------------------------------------------------------ transformations
    def _map(self, fn, valid=lambda v: v) -> "LaMemoMemory":
        """``fn`` on every [B, M, ...] tensor, ``valid`` on the valid lengths (when there are any)."""
        return LaMemoMemory(
            embeddings=fn(self.embeddings),
            vectors=[fn(t) for t in self.vectors],
            log_normalizers=[fn(t) for t in self.log_normalizers],
            hidden=[fn(t) for t in self.hidden],
            valid=None if self.valid is None else valid(self.valid),
        )

    def detach(self) -> "LaMemoMemory":
        return self._map(lambda t: t.detach())

    def _all_real_as_none(self) -> "LaMemoMemory":
        if self.valid is not None and bool((self.valid >= self.length).all()):
            self.valid = None
        return self

    def with_valid(self, valid: torch.Tensor | None) -> "LaMemoMemory":
        """This memory with the per-row valid lengths ``valid`` [B] (None: every row real): the rows that are
        not real are zeroed, and ``valid`` becomes None when every row is real."""
        if valid is not None:
            valid = valid.to(device=self.embeddings.device, dtype=torch.long)
            if bool((valid >= self.length).all()):
                valid = None
        memory = LaMemoMemory(embeddings=self.embeddings, vectors=self.vectors, log_normalizers=self.log_normalizers,
                              hidden=self.hidden, valid=valid)
        return memory._map(lambda t: clear_invalid(t, valid))

    def to(self, device=None, dtype=None) -> "LaMemoMemory":
        """Move to a device; ``dtype`` converts the activation tensors but keeps Z-bar in float32 (or float64)."""
        stat = None if dtype is None else torch.promote_types(dtype, torch.float32)
        out = LaMemoMemory(
            embeddings=self.embeddings.to(device=device, dtype=dtype),
            vectors=[t.to(device=device, dtype=dtype) for t in self.vectors],
            log_normalizers=[t.to(device=device, dtype=stat) for t in self.log_normalizers],
            hidden=[t.to(device=device, dtype=dtype) for t in self.hidden],
            valid=None if self.valid is None else self.valid.to(device=device),
        )
        return out

    def select_rows(self, rows) -> "LaMemoMemory":
        """The memory of a subset of batch rows (an index, a slice, a list or a LongTensor)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        return self._map(lambda t: t[rows], lambda v: v[rows])._all_real_as_none()

    __getitem__ = select_rows

    def last(self, n_rows: int) -> "LaMemoMemory":
        """Keep the newest ``n_rows`` memory rows (all of them if there are fewer)."""
        start = max(0, self.length - n_rows)
        return self._map(lambda t: t[:, start:], lambda v: v.clamp(max=self.length - start))._all_real_as_none()

    def clone(self) -> "LaMemoMemory":
        return self._map(lambda t: t.clone())

    def compact(self) -> "LaMemoMemory":
        """Every tensor in storage of its own size: a view into a larger tensor (the M+N rows of a step) is
        copied, so that a memory of M rows keeps M rows alive, not M+N."""
        return self._map(compact_tensor)

    @staticmethod
    def concat_rows(parts: list["LaMemoMemory"]) -> "LaMemoMemory":
        """Stack the memories of several batch slices back into one (inverse of ``select_rows``)."""
        first = parts[0]
        valid = None
        if any(p.valid is not None for p in parts):
            valid = torch.cat([p.full_valid() for p in parts])
        return LaMemoMemory(
            embeddings=torch.cat([p.embeddings for p in parts]),
            vectors=[torch.cat([p.vectors[i] for p in parts]) for i in range(len(first.vectors))],
            log_normalizers=[torch.cat([p.log_normalizers[i] for p in parts])
                             for i in range(len(first.log_normalizers))],
            hidden=[torch.cat([p.hidden[i] for p in parts]) for i in range(len(first.hidden))],
            valid=valid,
        )

    def full_valid(self) -> torch.Tensor:
        """The valid length of every batch row [B] (M for every row when ``valid`` is None)."""
        if self.valid is not None:
            return self.valid
        return torch.full((self.batch_size,), self.length, dtype=torch.long, device=self.embeddings.device)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LaMemoMemory":
        """Inverse of ``tensors()``: rebuild the memory from its flat name -> tensor layout."""
        if "embeddings" not in tensors:
            raise MemoryMismatchError("not a LaMemo memory: no 'embeddings' tensor")

        def series(prefix: str) -> list[torch.Tensor]:
            items = []
            while f"{prefix}.{len(items)}" in tensors:
                items.append(tensors[f"{prefix}.{len(items)}"])
            return items

        return cls(embeddings=tensors["embeddings"], vectors=series("vectors"),
                   log_normalizers=series("log_normalizers"), hidden=series("hidden"), valid=tensors.get(VALID))

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain CPU tensors by name (``tensors()``), loadable with ``torch.load(weights_only=True)``."""
        return {name: t.detach().cpu() for name, t in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], device=None) -> "LaMemoMemory":
        """Inverse of ``state_dict``, on ``device``."""
        memory = cls.from_tensors(state)
        return memory.to(device=device) if device is not None else memory

    def save(self, path: str | Path) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.tensors().items()}
        save_file(tensors, str(path), metadata={"format": _FORMAT})

    @classmethod
    def load(cls, path: str | Path, device=None) -> "LaMemoMemory":
        tensors = load_file(str(path), device="cpu")
        if "embeddings" not in tensors:
            raise MemoryMismatchError(f"{path} is not a LaMemo memory file (no 'embeddings' tensor)")
        memory = cls.from_tensors(tensors)
        return memory.to(device=device) if device is not None else memory

    # ------------------------------------------------------------------ checks
    def check_compatible(self, *, batch_size: int, n_layer: int, d_model: int, n_head: int, d_head: int,
                         lookahead: bool) -> None:
        """Raise a clear error if this memory cannot be used with the given model and batch."""
        if self.batch_size != batch_size:
            raise MemoryMismatchError(f"memory holds {self.batch_size} batch rows but the input has {batch_size}")
        if self.embeddings.shape[2] != d_model:
            raise MemoryMismatchError(f"memory embeddings have width {self.embeddings.shape[2]}, the model {d_model}")
        M = self.length
        if self.valid is not None and (tuple(self.valid.shape) != (batch_size,) or self.valid.dtype != torch.long
                                       or bool(((self.valid < 0) | (self.valid > M)).any())):
            raise MemoryMismatchError(f"memory valid lengths must be a long tensor of {batch_size} values in "
                                      f"[0, {M}], got {self.valid.dtype} {tuple(self.valid.shape)}")
        if lookahead:
            if len(self.vectors) != n_layer or len(self.log_normalizers) != n_layer or self.hidden:
                raise MemoryMismatchError(f"memory is not a LaMemo memory for {n_layer} layers "
                                   f"({len(self.vectors)} vector / {len(self.log_normalizers)} normaliser tensors)")
            for i, (c, z) in enumerate(zip(self.vectors, self.log_normalizers)):
                if tuple(c.shape) != (batch_size, M, n_head, d_head):
                    raise MemoryMismatchError(f"memory vectors.{i} has shape {tuple(c.shape)}, "
                                       f"expected {(batch_size, M, n_head, d_head)}")
                if tuple(z.shape) != (batch_size, M, n_head):
                    raise MemoryMismatchError(f"memory log_normalizers.{i} has shape {tuple(z.shape)}, "
                                       f"expected {(batch_size, M, n_head)}")
                if z.dtype not in (torch.float32, torch.float64):
                    raise MemoryMismatchError(f"memory log_normalizers.{i} must be float32, got {z.dtype}")
        else:
            if len(self.hidden) != n_layer - 1 or self.vectors:
                raise MemoryMismatchError(f"memory is not a Transformer-XL memory for {n_layer} layers")
            for i, h in enumerate(self.hidden):
                if tuple(h.shape) != (batch_size, M, d_model):
                    raise MemoryMismatchError(f"memory hidden.{i} has shape {tuple(h.shape)}, "
                                       f"expected {(batch_size, M, d_model)}")
