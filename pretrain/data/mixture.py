"""A weighted mixture of token sources read by segment-recurrent streams (``data.train`` as a list of sources).

Blends that sample a document per sequence (Megatron's ``BlendedDataset``) break recurrence: a row's next
segment must continue the same text or the memory carries the wrong context. Here every stream reads one source
at a time in long contiguous **spans** of ``P`` (input, target) pairs and switches source only between spans.

The global span sequence. Span ``g = 0, 1, 2, ...`` of the run gets its source from a smooth weighted round
robin (nginx's SWRR, in exact integer arithmetic): every source adds its weight to a running credit, the source
with the largest credit (lowest index on a tie) takes the span and pays the total weight. Any prefix of ``n``
spans then holds within one span of ``n * w_i / sum(w)`` spans of source ``i`` (no random draws, so no sampling
noise). The ``k``-th span of source ``i`` is its ``k mod E_i``-th span of epoch ``k // E_i``, where ``E_i`` is
how many whole spans the source holds: it starts at pair ``(j * P + shift_i(epoch)) mod (E_i * P)``, with
``shift`` drawn from ``(roll_seed, i, epoch)`` (0 without ``data.roll_seed``; Transformer-XL's roll per source).
So span ``g``'s source and position are a pure function of (seed, g) (:meth:`SpanSchedule.span_at`): ranks agree
without talking, resume is exact, and another parallel layout reads the same global sequence. Within one
epoch of a source its spans are disjoint, so no (input, target) pair is read twice; a small source with a large
weight simply goes through more epochs.

Handing spans to streams. Every rank runs the same schedule for all ``S`` streams (a few integers per stream).
Each stream holds its current span (global index, source, start) and its position in it. At a step, every
stream whose span is used up takes the next global span; when several need one in the same step they take them
in stream-id order (stream ids as in :func:`pretrain.data.streams.stream_id`). The rule, "span ``g`` goes to
whichever stream needs a new span next, in (step, stream id) order", does not depend on how many streams there
are, which is what a restart with another stream count needs (:meth:`MixtureStreams.load_state_dict` with
``strict=False``; the loader's one rule, :func:`pretrain.data.streams.stream_count_change`): the schedule (credits,
per-source cursors, the global counter) is kept; the streams that continue keep their span and position; the unread
rest of each retired stream's span joins a **pool** of pieces (source, start, length), which the streams that need
a span take first, in (step, stream id) order, before new global spans; added streams need one at once. No pair
of a span handed out is skipped, and no span is read twice.

The span boundary is a document boundary for the model; ``data.span_memory`` says what the memory does there.
``keep`` (the default) carries it across: inside one source the documents are already concatenated and the
memory crosses every ``<eos>`` (Transformer-XL's practice), so a source switch is one more such boundary, marked
by the ``<eos>`` that ends the previous span's last document only when it happens to fall there. ``reset``
empties, before every step, the memory of each row whose segment begins a new span (:func:`span_memory_reset`,
row by row through the memory's per-row valid lengths, ``lamemo_parallel.memory.LaMemoMemory.valid``). In a run
that never changed its stream count all spans are ``P`` pairs long and all streams take their first span at the
same step, so every row begins a new span at the same steps and that is the whole memory, exactly as emptying it;
after a stream-count change, pieces of retired streams' spans and the added streams' first spans put the streams
out of step, and only the rows that begin a span forget. The decision is a pure function of the loader state, so
every rank takes it alike and resume stays bitwise.

Span length. ``P`` is ``data.span_len`` rounded up to a multiple of ``tgt_len`` (a span is whole segments, so
every stream switches at a step boundary). After ``n`` steps the share of source ``i`` in the tokens read is
off its weight by at most about ``P / (S * n * tgt_len)`` (one span in the spans read): with the default 512
and 2 streams, 400 steps of 32 tokens land within 2 % (see docs/data.md).

State (:meth:`MixtureStreams.state_dict`): the schedule's credits, per-source cursors (spans taken) and global
counter, each stream's span, length and position, the pool, and the target tokens read per source; all plain
integers.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from pretrain.data.errors import DataError
from pretrain.data.sources import (DATA_CHANGED_HINT, DEFAULT_SPAN_LEN, LAYOUT_CHANGED_HINT, Source, parse_sources,
                                   sources_record)
from pretrain.data.streams import SegmentStreams, stream_count_change, stream_id


# ---------------------------------------------------------------------------------------------- schedule
def _integer_weights(weights: Sequence[float]) -> list[int]:
    """Exact integers in the weights' proportions (decimal weights as written: 0.7 / 0.3 -> 7 / 3)."""
    fractions = [Fraction(str(w)).limit_denominator(10 ** 9) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    common = math.gcd(*ints) or 1
    return [i // common for i in ints]


class SpanSchedule:
    """The global span sequence (module docstring): source by smooth weighted round robin, position from the
    source's own cursor and epoch. State: ``credit`` (per source), ``taken`` (spans of each source handed out)
    and ``next_span`` (the global counter)."""

    def __init__(self, weights: Sequence[float], spans_per_epoch: Sequence[int], span: int,
                 roll_seed: int | None = None):
        self.given = list(weights)
        self.weights = _integer_weights(weights)
        self.total = sum(self.weights)
        self.spans_per_epoch = [int(e) for e in spans_per_epoch]
        self.span = int(span)
        self.roll_seed = roll_seed
        self._shifts: dict[int, tuple[int, int]] = {}
        self.credit = [0] * len(self.weights)
        self.taken = [0] * len(self.weights)
        self.next_span = 0

    def ring(self, source: int) -> int:
        """Pairs of ``source`` that its spans cover in one epoch (``E_i * P``)."""
        return self.spans_per_epoch[source] * self.span

    def shift(self, source: int, epoch: int) -> int:
        """Where epoch ``epoch`` of ``source`` starts (the roll), drawn from (roll_seed, source, epoch)."""
        if self.roll_seed is None:
            return 0
        cached = self._shifts.get(source)
        if cached is None or cached[0] != epoch:      # a generator costs ~50 us: draw once per source epoch
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(self.roll_seed), source, epoch])))
            cached = self._shifts[source] = (epoch, int(rng.integers(0, self.ring(source))))
        return cached[1]

    def next(self) -> tuple[int, int, int]:
        """Hand out the next global span: ``(global index, source, start pair within the source)``."""
        credit = self.credit
        source = 0
        for i, w in enumerate(self.weights):
            credit[i] += w
            if credit[i] > credit[source]:      # strictly larger: the lowest index wins a tie
                source = i
        credit[source] -= self.total
        epoch, j = divmod(self.taken[source], self.spans_per_epoch[source])
        self.taken[source] += 1
        start = (j * self.span + self.shift(source, epoch)) % self.ring(source)
        g, self.next_span = self.next_span, self.next_span + 1
        return g, source, start

    def span_at(self, g: int) -> tuple[int, int]:
        """``(source, start)`` of global span ``g``: a pure function of the weights, sizes, seed and ``g``."""
        fresh = SpanSchedule(self.given, self.spans_per_epoch, self.span, self.roll_seed)
        for _ in range(g):
            fresh.next()
        return fresh.next()[1:]

    def state_dict(self) -> dict[str, Any]:
        return {"credit": list(self.credit), "taken": list(self.taken), "next_span": self.next_span}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.credit = [int(c) for c in state["credit"]]
        self.taken = [int(t) for t in state["taken"]]
        self.next_span = int(state["next_span"])


# ---------------------------------------------------------------------------------------------- streams
def span_pairs(span_len: int, tgt_len: int) -> int:
    """P: ``data.span_len`` rounded up to whole segments."""
    return max(1, math.ceil(span_len / tgt_len)) * tgt_len


class MixtureStreams:
    """``S = dp_size * micro_batches * micro_batch_size`` streams over a weighted mixture of sources, with the
    interface of :class:`pretrain.data.streams.SegmentStreams` (``next_step``, ``state_dict``,
    ``load_state_dict``, ``steps_per_epoch``) plus per-source counters (:meth:`source_metrics`).

    Raises:
        DataError: bad sizes, or a source with fewer than one span per stream (checked here, before compute).
    """

    def __init__(self, sources: Sequence[Source], *, tgt_len: int, dp_size: int, dp_rank: int, micro_batches: int,
                 micro_batch_size: int, span_len: int = DEFAULT_SPAN_LEN, roll_seed: int | None = None,
                 key: str = "data.train") -> None:
        for name, value in (("tgt_len", tgt_len), ("dp_size", dp_size), ("micro_batches", micro_batches),
                            ("micro_batch_size", micro_batch_size), ("span_len", span_len)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if not sources or not any(s.weight > 0 for s in sources):
            raise DataError(f"{key}: no source with a positive weight")
        self.sources = list(sources)
        self.tgt_len, self.dp_size, self.dp_rank = int(tgt_len), int(dp_size), int(dp_rank)
        self.micro_batches, self.micro_batch_size = int(micro_batches), int(micro_batch_size)
        self.num_streams = self.dp_size * self.micro_batches * self.micro_batch_size
        self.span = span_pairs(int(span_len), self.tgt_len)
        """P: pairs per span, a multiple of tgt_len."""
        self.span_len = int(span_len)
        spans_per_epoch = []
        for s in self.sources:
            spans = max(0, len(s.tokens) - 1) // self.span
            if spans < self.num_streams:
                raise DataError(
                    f"{key} source {s.name!r} is too short: {len(s.tokens)} tokens give {spans} span(s) of "
                    f"{self.span} tokens (data.span_len {span_len} rounded up to whole segments of tgt_len "
                    f"{tgt_len}), fewer than one per stream ({self.num_streams} = dp {dp_size} x micro-batches "
                    f"{micro_batches} x micro-batch size {micro_batch_size}); need at least "
                    f"{self.num_streams * self.span + 1} tokens: use more data, a smaller data.span_len or fewer "
                    "streams")
            spans_per_epoch.append(spans)
        self.schedule = SpanSchedule([s.weight for s in self.sources], spans_per_epoch, self.span, roll_seed)
        S = self.num_streams
        self.stream_span = np.full(S, -1, dtype=np.int64)
        """Global index of each stream's current span (-1: none yet)."""
        self.stream_source = np.zeros(S, dtype=np.int64)
        self.stream_start = np.zeros(S, dtype=np.int64)
        self.stream_size = np.full(S, self.span, dtype=np.int64)
        """Pairs of each stream's current span: ``P``, or less for a piece of a retired stream's span."""
        self.stream_pos = np.full(S, self.span, dtype=np.int64)
        """Pairs of its current span each stream has read (``stream_size``: used up, takes a new one next step)."""
        self.pool: list[list[int]] = []
        """Unread rests of retired streams' spans, ``[global index, source, start, pairs]``, handed out before new
        spans (after a change of the stream count)."""
        self.read = [0] * len(self.sources)
        """Target tokens read from each source by all streams (all data-parallel ranks) since the start."""
        self._local = np.array([[stream_id(self.dp_rank, m, r, micro_batches=self.micro_batches,
                                           micro_batch_size=self.micro_batch_size)
                                 for r in range(self.micro_batch_size)] for m in range(self.micro_batches)],
                               dtype=np.int64).reshape(-1)
        self._rings = np.array([self.schedule.ring(i) for i in range(len(self.sources))], dtype=np.int64)
        # plain ndarray views of the memmaps (still lazy): a memmap's own __getitem__ costs microseconds per call
        self._arrays = [s.tokens.view(np.ndarray) if isinstance(s.tokens, np.memmap) else s.tokens
                        for s in self.sources]
        self._reading = [0] * len(self.sources)
        """How many of the S streams read each source now (set when spans are handed out)."""
        self._due = 0
        """Pairs until the first stream's span is used up (<= 0: hand out spans before the next step)."""
        self.change_note: str | None = None
        """What the last non-strict :meth:`load_state_dict` changed (for the resume log line), else None."""

    def slot_streams(self) -> list[list[int]]:
        """The global ids of this rank's streams, per micro-batch (slot) and row (as
        :meth:`SegmentStreams.slot_streams`: the checkpoint's memory index and resharding use them)."""
        return self._local.reshape(self.micro_batches, self.micro_batch_size).tolist()

    # -- what a run will see ------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Steps until the whole mixture has been read once at the weights' pace (the largest source epoch)."""
        share = self.shares()
        longest = max(self._rings[i] / share[i] for i in range(len(self.sources)) if share[i] > 0)
        return max(1, int(longest // (self.num_streams * self.tgt_len)))

    def shares(self) -> list[float]:
        """Expected share of each source in the tokens read (its weight over the total)."""
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def epochs(self) -> list[float]:
        """Epochs of each source read so far (target tokens read over the tokens its spans cover)."""
        return [self.read[i] / int(self._rings[i]) for i in range(len(self.sources))]

    def source_metrics(self) -> dict[str, float]:
        """``data/tokens/<name>`` and ``data/epoch/<name>`` for every source, over all data-parallel ranks."""
        out: dict[str, float] = {}
        for s, read, epoch in zip(self.sources, self.read, self.epochs()):
            out[f"data/tokens/{s.name}"] = read
            out[f"data/epoch/{s.name}"] = epoch
        return out

    # -- stepping -----------------------------------------------------------------------------------------
    def _hand_out_spans(self) -> None:
        """Streams whose span is used up take the next global spans, in stream-id order."""
        due = np.flatnonzero(self.stream_pos >= self.stream_size)
        if len(due):
            spans = np.array([self.pool.pop(0) if self.pool else [*self.schedule.next(), self.span] for _ in due],
                             dtype=np.int64)
            self.stream_span[due], self.stream_source[due], self.stream_start[due], self.stream_size[due] = spans.T
            self.stream_pos[due] = 0
        self._reading = np.bincount(self.stream_source, minlength=len(self.sources)).tolist()
        self._due = int((self.stream_size - self.stream_pos).min())

    def new_span_rows(self) -> list[list[bool]] | None:
        """Which of this rank's rows (per micro-batch slot) begin a new span with the segment the next
        :meth:`next_step` returns, or None when none does (``data.span_memory``). A pure function of the loader
        state, so every rank answers alike without communicating."""
        if self._due > 0:                       # no span used up (python ints: this runs every step)
            return None
        due = (self.stream_pos >= self.stream_size)[self._local]
        return due.reshape(self.micro_batches, self.micro_batch_size).tolist() if due.any() else None

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The next segment of this rank's streams (as ``SegmentStreams.next_step``), then advance every stream."""
        T = self.tgt_len
        if self._due <= 0:                      # some span is used up (python ints: this runs every step)
            self._hand_out_spans()
        ids = self._local
        inputs = np.empty((len(ids), T), dtype=np.int64)
        targets = np.empty((len(ids), T), dtype=np.int64)
        rows = zip(self.stream_source[ids].tolist(), (self.stream_start[ids] + self.stream_pos[ids]).tolist())
        for row, (source, first) in enumerate(rows):
            tokens, ring = self._arrays[source], int(self._rings[source])
            first %= ring
            if first + T <= ring:               # contiguous: two slices (ring <= tokens - 1, so first + T fits)
                inputs[row] = tokens[first:first + T]
                targets[row] = tokens[first + 1:first + T + 1]
            else:                               # the segment crosses the rolled ring's end
                index = (first + np.arange(T)) % ring
                inputs[row] = tokens[index]
                targets[row] = tokens[index + 1]
        for i, streams in enumerate(self._reading):
            self.read[i] += streams * T
        self.stream_pos += T
        self._due -= T
        shape = (self.micro_batches, self.micro_batch_size, T)
        inputs_t = torch.from_numpy(inputs.reshape(shape))
        targets_t = torch.from_numpy(targets.reshape(shape))
        return [(inputs_t[m], targets_t[m]) for m in range(self.micro_batches)]

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        while True:
            yield self.next_step()

    # -- resume -------------------------------------------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """What the state's meaning depends on: the stream layout, the span and the sources."""
        return {"num_streams": self.num_streams, "tgt_len": self.tgt_len, "span": self.span,
                "sources": sources_record(self.sources)}

    def state_dict(self) -> dict[str, Any]:
        """The schedule, each stream's span and position, tokens read per source; ``layout`` for checking."""
        return {"mixture": True, "schedule": self.schedule.state_dict(),
                "streams": {"span": self.stream_span.tolist(), "source": self.stream_source.tolist(),
                            "start": self.stream_start.tolist(), "size": self.stream_size.tolist(),
                            "pos": self.stream_pos.tolist()},
                "pool": [list(piece) for piece in self.pool],
                "read": list(self.read), "epochs": self.epochs(), "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Restore exactly (the sources and weights are the start-up's to check: ``pretrain/data/identity.py``).
        Another stream count or segment length raises with ``strict``. Otherwise another stream count alone
        follows the loader's one rule (:func:`pretrain.data.streams.stream_count_change`; the module docstring
        says how spans are handed out then) and sets :attr:`change_note`; another segment or span length keeps
        the schedule and per-source counts and starts every stream on a fresh span (a warning: the token order
        then differs from an uninterrupted run)."""
        if not isinstance(state, dict) or not state.get("mixture"):
            raise DataError("the checkpoint's loader state is a single-source one but data.train is a mixture; "
                            + DATA_CHANGED_HINT)
        saved = state.get("layout") or {}
        self.schedule.load_state_dict(state["schedule"])
        self.read = [int(r) for r in state["read"]]
        ours = self.layout()
        self.change_note = None
        changed = [k for k in ("num_streams", "tgt_len", "span") if saved.get(k) != ours[k]]
        detail = ", ".join(f"{k} {saved.get(k)} -> {ours[k]}" for k in changed)
        if changed and strict:
            raise DataError(f"the data layout changed since the checkpoint ({detail}); the saved spans no longer "
                            "fit the streams; " + LAYOUT_CHANGED_HINT)
        self._due = 0                           # recount which streams read what before the next step
        if changed and changed != ["num_streams"]:
            self.stream_pos[:] = self.stream_size[:] = self.span      # every stream takes a fresh span next step
            self.pool = []
            self.change_note = f"every stream starts a fresh span from global span {self.schedule.next_span} ({detail})"
            warnings.warn(f"data layout changed ({detail}): every stream starts a fresh span from global span "
                          f"{self.schedule.next_span}; the token order differs from an uninterrupted run", stacklevel=2)
            return
        streams = state["streams"]
        old = len(streams["span"])
        columns = {name: np.asarray(streams.get(name, [self.span] * old), dtype=np.int64)
                   for name in ("span", "source", "start", "size", "pos")}      # "size": older states hold P
        pool = [list(map(int, piece)) for piece in state.get("pool", [])]
        keep = min(old, self.num_streams)
        self.stream_pos[:] = self.stream_size[:] = self.span   # added streams: take a span at the next step
        for name, column in columns.items():
            getattr(self, f"stream_{name}")[:keep] = column[:keep]
        for j in range(keep, old):              # retired: the unread rest of the span joins the pool
            rest = int(columns["size"][j] - columns["pos"][j])
            if rest > 0:
                pool.append([int(columns["span"][j]), int(columns["source"][j]),
                             int(columns["start"][j] + columns["pos"][j]), rest])
        self.pool = pool
        if changed:
            self.change_note = stream_count_change(
                old, self.num_streams, f"at global span {self.schedule.next_span}",
                f"{sum(p[3] for p in pool)} unread pairs of retired streams' spans ({len(pool)} pieces) go first to "
                "the streams that need a span; no span is skipped")


# ---------------------------------------------------------------------------------------------- the trainer's use
def build_streams(train: Any, data, *, dp_size: int, dp_rank: int):
    """The training loader for ``data.train`` as loaded by the start-up checks: :class:`SegmentStreams` for one
    token array (unchanged single-source behaviour), :class:`MixtureStreams` for a list of :class:`Source`.
    ``data`` is the config's data section."""
    common = dict(tgt_len=data.tgt_len, dp_size=dp_size, dp_rank=dp_rank, micro_batches=data.micro_batches,
                  micro_batch_size=data.micro_batch_size, roll_seed=data.roll_seed)
    if isinstance(train, list):
        return MixtureStreams(train, span_len=data.span_len, **common)
    return SegmentStreams(train, **common)


def span_memory_reset(streams, data) -> list[list[bool]] | None:
    """``data.span_memory: reset``: the rows (per micro-batch slot of this rank) whose memory is emptied before
    the step ``streams`` is about to read, because their segments begin new spans
    (:meth:`MixtureStreams.new_span_rows`; at the first step the memory is empty anyway); None: no row. A pure
    function of the loader state that every rank (every pipeline stage, every data-parallel rank) steps alike and
    a checkpoint restores, so ranks agree without communicating and resume stays bitwise. ``data`` is the
    config's data section."""
    if data.span_memory != "reset" or not isinstance(streams, MixtureStreams):
        return None
    return streams.new_span_rows()


def data_metrics(streams, train: Any) -> dict[str, float]:
    """``data/tokens/<name>`` (target tokens read, all data-parallel ranks) and ``data/epoch/<name>`` of every
    source; a single prefix is one source named after its stem."""
    if isinstance(streams, MixtureStreams):
        return streams.source_metrics()
    name = parse_sources(train, "data.train")[0].name
    return {f"data/tokens/{name}": streams.offset * streams.num_streams,
            f"data/epoch/{name}": streams.offset / streams.stream_len}


def mixture_report(streams: MixtureStreams, steps: int) -> str:
    """``--dry-run``'s lines per source: tokens, weight, expected share, epochs the run will see."""
    tokens_run = steps * streams.num_streams * streams.tgt_len
    lines = [f"mixture: {len(streams.sources)} sources, spans of {streams.span} tokens (data.span_len "
             f"{streams.span_len}), {streams.num_streams} streams, {tokens_run:,} target tokens in run.steps {steps}"]
    for s, share, ring in zip(streams.sources, streams.shares(), streams._rings):
        lines.append(f"  source {s.name}: {len(s.tokens):,} tokens, weight {s.weight:g}, expected share "
                     f"{share:.3f}, {tokens_run * share / int(ring):.2f} epochs in this run")
    return "\n".join(lines)
