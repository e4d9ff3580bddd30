"""The segment-recurrent loader (Transformer-XL style) with exact resume.

Layout. The token array is cut into ``S = dp_size * micro_batches * micro_batch_size`` contiguous
streams. Stream ``s`` owns the ``L`` (input, target) pairs ``(t[i], t[i+1])`` for
``i in [s*L, (s+1)*L)``, i.e. it reads tokens ``t[s*L] .. t[(s+1)*L]`` (neighbouring streams share the
boundary token, once as a target and once as an input). ``L`` is ``(len(t) - 1) // S`` rounded down to a
multiple of ``tgt_len`` so every step has the same shape (static shapes keep the memory layout fixed);
the unused tail is fewer than ``S * tgt_len + S`` tokens at the very end of the split.

Step ``k`` gives every stream its pairs ``[k*tgt_len, (k+1)*tgt_len)`` modulo ``L``: one segment per
stream, the continuation of the stream's previous segment, so the model's memory carries over. Row
``row`` of micro-batch ``m`` on data-parallel rank ``r`` is stream ``stream_id(r, m, row)``; that mapping
is a pure function, so each DP rank reads a disjoint, contiguous block of the data and the memory of
each (micro-batch, row) slot always belongs to the same stream.

State. The whole state is ``offset`` = pairs consumed per stream = ``steps * tgt_len`` (it keeps growing
across epochs; the epoch is ``offset // L``). Restoring the offset restores the exact token sequence.

Roll. With ``roll_seed`` set, each stream is rotated at the start of every epoch by a shift drawn from
``(roll_seed, epoch)`` -- Transformer-XL's ``--roll``, deterministic so resume stays exact. Pairs are
rotated, not tokens, so every target is still the true next token; only the context is cut once per
stream at the rotation point, as at a document boundary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pretrain.data.errors import DataError
from pretrain.data.sources import DATA_CHANGED_HINT, LAYOUT_CHANGED_HINT

def stream_id(dp_rank: int, micro_batch: int, row: int, *, micro_batches: int, micro_batch_size: int) -> int:
    """The stream read by ``row`` of micro-batch ``micro_batch`` on data-parallel rank ``dp_rank``.

    Rank-major, so DP rank ``r`` owns streams ``[r * micro_batches * micro_batch_size, (r + 1) * ...)``.
    """
    return (dp_rank * micro_batches + micro_batch) * micro_batch_size + row


def stream_count_change(old: int, new: int, where: str, unread: str) -> str:
    """The one rule of a changed global stream count, for every loader (one token file: :class:`SegmentStreams`;
    a mixture: ``pretrain.data.mixture.MixtureStreams``), as the one log line that says what happened. Streams
    ``0 .. min(old, new) - 1`` continue: the same id keeps its position, its memory and what it was reading.
    Streams from ``old`` on (more streams) are added: they start on data nobody has read, with an empty memory.
    Streams from ``new`` on (fewer streams) are retired: their unread data goes to the streams that continue, so
    it is not lost from the epoch. ``where`` says where the change falls, ``unread`` what stays unread, in the
    loader's own units (pairs of an epoch, spans of a schedule)."""
    return (f"data: streams {old} -> {new} {where}: {min(old, new)} continue with their position and memory, "
            f"{max(0, new - old)} start on unread data, {max(0, old - new)} retired (their unread data goes to "
            f"the others); {unread}")


def _as_numpy(tokens: Any) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"tokens must be a 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"tokens must be integers, got dtype {arr.dtype}")
    return arr


def _positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


class SegmentStreams:
    """S contiguous streams, one ``tgt_len`` segment per stream per step (see the module docstring).

    Args:
        tokens: the training split, 1-D integer array (a ``numpy.memmap`` from ``load_tokens`` is read
            lazily: a step touches only the tokens it returns).
        tgt_len: tokens per segment (the model's N).
        dp_size, dp_rank: data-parallel world size and this rank.
        micro_batches: micro-batches per step (gradient accumulation / pipeline micro-batches).
        micro_batch_size: rows per micro-batch.
        roll_seed: ``None`` for no roll, else the seed of the per-epoch stream rotation.

    Raises:
        DataError: bad sizes, or fewer than ``tgt_len + 1`` tokens per stream (checked here, before any
            compute).
    """

    def __init__(
        self,
        tokens: Any,
        *,
        tgt_len: int,
        dp_size: int,
        dp_rank: int,
        micro_batches: int,
        micro_batch_size: int,
        roll_seed: int | None = None,
    ) -> None:
        _positive(tgt_len=tgt_len, dp_size=dp_size, micro_batches=micro_batches, micro_batch_size=micro_batch_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        self.tokens = _as_numpy(tokens)
        self.tgt_len = int(tgt_len)
        self.dp_size = int(dp_size)
        self.dp_rank = int(dp_rank)
        self.micro_batches = int(micro_batches)
        self.micro_batch_size = int(micro_batch_size)
        self.roll_seed = roll_seed
        self.num_streams = self.dp_size * self.micro_batches * self.micro_batch_size
        pairs = max(0, (len(self.tokens) - 1) // self.num_streams)
        if pairs < self.tgt_len:
            need = self.num_streams * self.tgt_len + 1
            raise DataError(
                f"data too short: {len(self.tokens)} tokens cannot give {self.num_streams} streams "
                f"(dp {self.dp_size} x micro-batches {self.micro_batches} x micro-batch size "
                f"{self.micro_batch_size}) one segment of tgt_len {self.tgt_len} (+1 target) each; "
                f"need at least {need} tokens: use more data or reduce tgt_len / the batch layout"
            )
        self.stream_len = pairs - pairs % self.tgt_len
        """L: (input, target) pairs per stream and epoch, a multiple of tgt_len."""
        self.steps_per_epoch = self.stream_len // self.tgt_len
        """Steps until every stream has delivered all of its pairs once."""
        self.offset = 0
        """Pairs consumed per stream since the start (all epochs): with ``origin`` and ``plan``, the whole state."""
        self.origin = [0, 0]
        """[epoch, offset] where regular epochs are counted from (moved past an epoch changed by ``plan``)."""
        self.plan: dict | None = None
        """After a change of the global stream count: the rest of that epoch as ``{"epoch", "begin", "end",
        "spans"}``, ``spans[s]`` the [first pair, count] runs stream ``s`` reads from offset ``begin`` to ``end``."""
        self.change_note: str | None = None
        """What ``load_state_dict`` did with a changed stream count (one line for the log), else None."""
        # This rank's streams in (micro-batch, row) order, and where each starts in the token array.
        self._ids = np.array(
            [[self.stream_id(self.dp_rank, m, r) for r in range(self.micro_batch_size)]
             for m in range(self.micro_batches)],
            dtype=np.int64,
        )
        self._base = self._ids * self.stream_len
        self._shift_epoch: int | None = None
        self._shift = np.zeros_like(self._ids)

    # -- layout ---------------------------------------------------------------------------------------
    def stream_id(self, dp_rank: int, micro_batch: int, row: int) -> int:
        """Pure function of (dp rank, micro-batch index, row); see the module-level :func:`stream_id`."""
        return stream_id(dp_rank, micro_batch, row, micro_batches=self.micro_batches,
                         micro_batch_size=self.micro_batch_size)

    def slot_streams(self) -> list[list[int]]:
        """The global ids of this rank's streams, per micro-batch (slot) and row."""
        return self._ids.tolist()

    @property
    def epoch(self) -> int:
        """Epochs completed so far (derived from the offset)."""
        return self._where(self.offset)[0]

    def _where(self, offset: int) -> tuple[int, int, dict | None]:
        """(epoch, pairs read of it, the plan when ``offset`` falls in an epoch changed by ``plan``)."""
        if self.plan is not None and offset < self.plan["end"]:
            return self.plan["epoch"], offset - self.plan["begin"], self.plan
        epoch, position = divmod(offset - self.origin[1], self.stream_len)
        return self.origin[0] + epoch, position, None

    def _epoch_rest(self) -> list[list[list[int]]]:
        """Every stream's unread pairs of the current epoch, in reading order, as [first pair, count] runs."""
        epoch, position, plan = self._where(self.offset)
        if plan is not None:
            return [_runs(spans, position, None) for spans in plan["spans"]]
        L, rest = self.stream_len, []
        for s, shift in enumerate(self.roll_shifts(epoch).tolist()):
            first, count = (position + shift) % L, L - position
            rest.append([[s * L + first, min(count, L - first)]] + ([[s * L, count - (L - first)]]
                                                                     if count > L - first else []))
        return rest

    def _continue_from(self, old: "SegmentStreams") -> None:
        """Take over a loader of another stream count mid-epoch (docs/checkpoints.md, "A changed global stream
        count", :func:`stream_count_change`): the rest of the epoch is ``U`` pairs per stream, then regular epochs;
        the continuing streams read their own rest first, the others share the pool of what is left over."""
        rests, S, S2 = old._epoch_rest(), old.num_streams, self.num_streams
        unread = sum(n for _, n in rests[0])
        share = unread * S // S2 // self.tgt_len * self.tgt_len
        own = [_runs(rests[s], 0, min(unread, share)) for s in range(min(S, S2))]
        pool = [run for s in range(S) for run in (_runs(rests[s], share, None) if s < S2 else rests[s])]
        spans, taken = [], 0
        for j in range(S2):
            mine = own[j] if j < S else []
            need = share - sum(n for _, n in mine)
            spans.append(mine + _runs(pool, taken, need))
            taken += need
        epoch, position, _ = old._where(old.offset)
        self.offset = old.offset
        self.plan = {"epoch": epoch, "begin": old.offset, "end": old.offset + share, "spans": spans}
        self.origin = [epoch + 1, old.offset + share]
        self._shift_epoch = None
        self.change_note = stream_count_change(S, S2, f"at pair {position} of epoch {epoch}",
                                               f"{unread * S - share * S2} pairs of the epoch stay unread")

    def roll_shifts(self, epoch: int) -> np.ndarray:
        """Rotation of every stream (all S, indexed by stream id) in ``epoch``; zeros without a roll."""
        if self.roll_seed is None:
            return np.zeros(self.num_streams, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.roll_seed), int(epoch)])))
        return rng.integers(0, self.stream_len, size=self.num_streams, dtype=np.int64)

    # -- stepping -------------------------------------------------------------------------------------
    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next segment of this rank's streams, then advance the offset by ``tgt_len``.

        Returns:
            One ``(inputs, targets)`` per micro-batch, each ``LongTensor [micro_batch_size, tgt_len]``;
            ``targets[b, i]`` is the token after ``inputs[b, i]``.
        """
        epoch, position, plan = self._where(self.offset)
        if plan is not None:                          # the epoch of a stream-count change: explicit runs
            index = np.array([[[i for first, n in _runs(plan["spans"][s], position, self.tgt_len)
                                for i in range(first, first + n)] for s in row] for row in self._ids.tolist()],
                             dtype=np.int64)
        else:
            if self._shift_epoch != epoch:
                self._shift = self.roll_shifts(epoch)[self._ids]
                self._shift_epoch = epoch
            steps = np.arange(self.tgt_len, dtype=np.int64)
            # [M, B, T] indices of the inputs; the targets are the next tokens.
            pair = (position + self._shift[..., None] + steps) % self.stream_len
            index = self._base[..., None] + pair
        inputs = torch.from_numpy(np.asarray(self.tokens[index], dtype=np.int64))
        targets = torch.from_numpy(np.asarray(self.tokens[index + 1], dtype=np.int64))
        self.offset += self.tgt_len
        return [(inputs[m], targets[m]) for m in range(self.micro_batches)]

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Endless: ``next_step()`` forever (epochs wrap around)."""
        while True:
            yield self.next_step()

    # -- resume ---------------------------------------------------------------------------------------
    def layout(self) -> dict[str, int]:
        """What the offset's meaning depends on; stored next to it to refuse a silent mismatch."""
        return {"num_streams": self.num_streams, "tgt_len": self.tgt_len, "num_tokens": len(self.tokens)}

    def state_dict(self) -> dict[str, Any]:
        """``{"offset", "epoch", "layout"}`` (plus ``origin`` and ``plan`` after a stream-count change);
        ``epoch`` and ``layout`` are for checking and logging."""
        state = {"offset": self.offset, "epoch": self.epoch, "layout": self.layout()}
        if self.plan is not None:
            state.update(origin=list(self.origin), plan=self.plan)
        return state

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore the offset; the next ``next_step()`` repeats exactly what followed the save.

        If the saved ``layout`` differs (another DP size, micro-batching, tgt_len or data), ``strict``
        raises :class:`DataError`; ``strict=False`` warns and resumes at the same epoch and the same
        fraction of it, rounded down to a whole step (the token sequence then differs from an
        uninterrupted run; the caller should reset the model's memory).
        """
        if state.get("mixture"):
            raise DataError("the checkpoint's loader state is a mixture's but data.train is one token file; "
                            + DATA_CHANGED_HINT)
        offset = state.get("offset")
        if not isinstance(offset, (int, np.integer)) or isinstance(offset, bool) or offset < 0:
            raise DataError(f"invalid loader state: offset {offset!r} is not a non-negative integer")
        saved = state.get("layout")
        self.change_note = None
        if saved is None or saved == self.layout():
            if offset % self.tgt_len:
                raise DataError(f"loader offset {offset} is not a multiple of tgt_len {self.tgt_len}")
            self.offset = int(offset)
            self.origin, self.plan, self._shift_epoch = list(state.get("origin", [0, 0])), state.get("plan"), None
            return
        changed = {k: (saved.get(k), v) for k, v in self.layout().items() if saved.get(k) != v}
        detail = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        if not strict and set(changed) == {"num_streams"}:
            # the same data cut into another number of streams: rebuild the saved loader, take over its epoch
            old = SegmentStreams(self.tokens, tgt_len=self.tgt_len, dp_size=1, dp_rank=0, micro_batches=1,
                                 micro_batch_size=int(saved["num_streams"]), roll_seed=self.roll_seed)
            old.load_state_dict(state)
            self._continue_from(old)
            return
        if strict:
            raise DataError(
                f"the data layout changed since the checkpoint ({detail}); the saved offset no longer "
                "names the same tokens; " + LAYOUT_CHANGED_HINT)
        old_len = (saved["num_tokens"] - 1) // saved["num_streams"]
        old_len -= old_len % saved["tgt_len"]
        epoch, position = divmod(int(offset), max(old_len, 1))
        fraction = position / max(old_len, 1)
        step = math.floor(fraction * self.steps_per_epoch)
        self.offset = epoch * self.stream_len + step * self.tgt_len
        warnings.warn(
            f"data layout changed ({detail}): resuming at epoch {epoch}, step {step} of {self.steps_per_epoch}; "
            "the token order differs from an uninterrupted run",
            stacklevel=2,
        )


def _runs(runs: list[list[int]], skip: int, count: int | None) -> list[list[int]]:
    """``count`` pairs (None: all the rest) of the [first pair, count] runs ``runs`` after the first ``skip``."""
    out = []
    for first, n in runs:
        if skip >= n:
            skip -= n
            continue
        take = n - skip if count is None else min(n - skip, count - sum(m for _, m in out))
        if take > 0:
            out.append([first + skip, take])
        skip = 0
        if count is not None and sum(m for _, m in out) >= count:
            break
    return out
