"""What a pipeline stage keeps and passes on: the carry through its functions, the one tensor that
crosses a stage boundary, and the memory per micro-batch slot (``StageMemory``, ``StageRuntime``).
The stages themselves, as DeepSpeed layer specs, are in ``lamemo_parallel/pipeline.py``.

Between stages one tensor travels (DeepSpeed back-propagates through the first output tensor only):
LaMemo sends [memory rows; current rows] = [B, M+N, d]: both parts carry gradient, since the memory rows are
recomputed at every layer. Transformer-XL sends the current rows [B, N, d]: layer l reads the cached input of
layer l, which the stage holding layer l keeps itself.

Inside a stage a *carry* tuple flows through the functions (layout ``ACT .. FIRST_MEMORY`` below): the
activation, the global biases u, v, v+, u+ (``None`` where a variant has none), the position tables of the
step, the memory's per-row valid lengths (``LaMemoMemory.valid``: None when every row is real), then this
stage's memory inputs per layer (C-bar, Z-bar for LaMemo; the cached layer input for XL).
A decoder layer replaces its own memory entries with the new rows it produced (detached). So with activation
checkpointing (DeepSpeed's ``activation_checkpoint_interval``; only ``DecoderLayerPipe`` is checkpointable)
a recompute reads the memory it was given at forward time (an explicit input of the checkpointed function,
saved by it), never the store; the store is read by ``enter`` and written by ``exit``, which run once per
forward and are never recomputed.

Memory (``StageMemory``): per micro-batch slot, this stage's layers' C-bar / Z-bar (local heads under tensor
parallelism) or XL's cached layer inputs, plus the embedding FIFO on the first stage of a LaMemo model. The
slot is the forward count within the step: DeepSpeed's schedules run the forwards of a step in micro-batch
order on every stage. Names follow ``LaMemoMemory.tensors()`` with global layer indices, so the union of the
stages' memories (heads gathered) is the single-device memory.

Shapes: the memory length M is the same for every slot (a slot whose rows have no memory yet, e.g. streams added by
a restart, holds M zero rows marked not real: ``StageMemory.valid``); it grows 0, N, 2N, .. up to mem_len over the first
steps and is constant after that. The trainer calls DeepSpeed's ``reset_activation_shape()`` on the steps
where the inter-stage shape changes (see pretrain/engines/pipeline.py), so steady-state steps use DeepSpeed's
static-shape path and the first segments are exactly the single-device model's (no padded, masked rows).

Dropout: every dropout acts on the default generator of its stage (seed stages differently), except the
dropout of the position table, which the method shares between all layers (docs/method.md §2): each stage
redraws the same mask from a seed that is a function of (seed, data-parallel rank, step, slot) only.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PositionEncodings
from .config import LaMemoConfig
from .memory import VALID, LaMemoMemory, advance_valid, clear_invalid
from .positions import inverse_frequencies, position_encodings

#: Positions in the carry tuple that flows through a stage.
ACT, CONTENT, POSITION, FUTURE_POSITION, FUTURE_CONTENT, POS_CAUSAL, POS_AHEAD, MEMORY_VALID = range(8)
FIRST_MEMORY = 8


def layer_memory_names(layer: int, lookahead: bool) -> list[str]:
    """The memory tensors that layer ``layer`` reads and writes, in ``LaMemoMemory.tensors()`` naming."""
    if lookahead:
        return [f"vectors.{layer}", f"log_normalizers.{layer}"]
    return ["embeddings" if layer == 0 else f"hidden.{layer - 1}"]   # XL: the cached input of the layer


# ---------------------------------------------------------------------------------------------- memory
class StageMemory:
    """The memory one pipeline stage keeps, per micro-batch slot: name -> [B, M, ...] tensor (detached), and
    the slot's per-row valid lengths (``LaMemoMemory.valid``; None: every row real). Every stage advances the
    valid lengths alike (N real rows per step), so the stages agree without talking."""

    def __init__(self, n_slots: int, names: list[str], mem_len: int):
        self.names = list(names)
        self.mem_len = mem_len
        self.slots: list[dict[str, torch.Tensor] | None] = [None] * n_slots
        self.valid: list[torch.Tensor | None] = [None] * n_slots

    def get(self, slot: int) -> dict[str, torch.Tensor] | None:
        return self.slots[slot]

    def length(self) -> int:
        """M, the number of memory rows: the same for every slot (0 before the first step)."""
        lengths = {0 if s is None else s[self.names[0]].shape[1] for s in self.slots}
        if len(lengths) != 1:
            raise RuntimeError(f"the micro-batch slots hold memories of different lengths {sorted(lengths)}")
        return lengths.pop()

    def commit(self, slot: int, tensors: dict[str, torch.Tensor], valid: torch.Tensor | None = None,
               added: int = 0) -> None:
        """Keep the newest ``mem_len`` rows of every tensor (as ``LaMemoMemory.last`` and ``detach``); ``valid``
        (the slot's valid lengths before this step) gains the ``added`` new rows, and rows not real are zeroed."""
        if sorted(tensors) != sorted(self.names):
            raise RuntimeError(f"memory commit of {sorted(tensors)}, this stage keeps {sorted(self.names)}")
        kept = {name: t[:, max(0, t.shape[1] - self.mem_len):].detach() for name, t in tensors.items()}
        valid = advance_valid(valid, added, next(iter(kept.values())).shape[1])
        self.slots[slot] = {name: clear_invalid(t, valid).contiguous() for name, t in kept.items()}
        self.valid[slot] = valid

    def reset(self) -> None:
        self.slots = [None] * len(self.slots)
        self.valid = [None] * len(self.slots)

    def forget(self, rows: list[list[bool]] | None = None) -> None:
        """``reset`` when ``rows`` is None or marks every row; else the marked rows (per slot, per batch row) get
        valid length 0 (zeroed, masked) and the others keep their memory. Every stage does it alike."""
        if rows is None or all(all(r) for r in rows) or all(s is None for s in self.slots):
            self.reset()
            return
        for slot, (tensors, mask) in enumerate(zip(self.slots, rows)):
            if tensors is None or not any(mask):
                continue
            first = tensors[self.names[0]]
            valid = self.valid[slot]
            valid = torch.full((first.shape[0],), first.shape[1], dtype=torch.long, device=first.device) \
                if valid is None else valid
            valid = torch.where(torch.tensor(mask, device=first.device), 0, valid)
            self.slots[slot] = {n: clear_invalid(t, valid) for n, t in tensors.items()}
            self.valid[slot] = valid

    def state(self) -> list[dict[str, torch.Tensor] | None]:
        """Per slot: name -> tensor (this rank's layers and heads, plus ``valid`` [B] when some row of the slot
        is not real), or None for a slot not run yet."""
        return [None if s is None else {**s, **({} if v is None else {VALID: v})}
                for s, v in zip(self.slots, self.valid)]

    def load_state(self, state: list[dict[str, torch.Tensor] | None]) -> None:
        """Restore ``state()``'s per-slot memory. A slot without memory (None) next to slots with some gets M zero
        rows, none of them real (one memory length for all slots; e.g. a slot of streams a restart added)."""
        if len(state) != len(self.slots):
            raise ValueError(f"memory for {len(state)} micro-batch slots, this stage has {len(self.slots)}")
        for k, s in enumerate(state):
            if s is not None and sorted(set(s) - {VALID}) != sorted(self.names):
                raise ValueError(f"memory of slot {k} holds {sorted(s)}; this pipeline stage keeps "
                                 f"{sorted(self.names)} (was it saved with another pipeline partition?)")
        old = self.slots, self.valid
        self.slots = [None if s is None else {n: t for n, t in s.items() if n != VALID} for s in state]
        self.valid = [None if s is None else s.get(VALID) for s in state]
        shape = next((s for s in self.slots if s is not None), None)
        for k, s in enumerate(self.slots):
            if s is None and shape is not None:
                self.slots[k] = {n: torch.zeros_like(t) for n, t in shape.items()}
                rows = next(iter(shape.values())).shape[0]
                self.valid[k] = torch.zeros(rows, dtype=torch.long, device=next(iter(shape.values())).device)
        try:
            self.length()
        except RuntimeError:
            self.slots, self.valid = old
            raise


class StageRuntime:
    """What one stage knows between its functions: the memory store, the step, the slot being forwarded."""

    def __init__(self, config: LaMemoConfig, *, stage: int, num_stages: int, layers: range, micro_batches: int,
                 mem_len: int, n_local_heads: int, seed: int = 0, dp_rank: int = 0):
        self.config = config
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.layers = layers
        self.micro_batches = micro_batches
        self.lookahead = config.traits.looks_ahead
        self.only_top_layer = list(layers) == [config.n_layer - 1]
        self.n_local_heads = n_local_heads
        self.seed, self.dp_rank = seed, dp_rank
        self.carry_names = [n for i in layers for n in layer_memory_names(i, self.lookahead)]
        fifo = ["embeddings"] if (self.lookahead and self.first) else []
        self.memory = StageMemory(micro_batches, fifo + self.carry_names, mem_len)
        self.inv_freq = inverse_frequencies(config.d_model)
        self.step = 0
        self.forwards = 0
        self._current = None      # (slot, pending commits) between enter and exit of one forward

    # ------------------------------------------------------------------ step bookkeeping
    def begin_step(self, step: int) -> None:
        """Call before every ``train_batch``: ``step`` seeds the shared position-dropout masks."""
        self.step = step
        self.forwards = 0

    def end_step(self) -> None:
        if self.forwards != self.micro_batches:
            raise RuntimeError(f"stage {self.stage} ran {self.forwards} forward passes in a step of "
                               f"{self.micro_batches} micro-batches")

    def memory_length(self) -> int:
        return self.memory.length()

    @contextmanager
    def evaluation(self, mem_len: int):
        """Forward passes of an evaluation inside the block: one micro-batch slot per step whose memory (rows =
        this rank's evaluation streams) starts empty and is dropped at the end; the training memory, slot
        count and step are restored untouched."""
        saved = (self.memory, self.micro_batches, self.step, self.forwards)
        self.memory = StageMemory(1, saved[0].names, mem_len)
        self.micro_batches = 1
        try:
            yield self
        finally:
            self.memory, self.micro_batches, self.step, self.forwards = saved

    # ------------------------------------------------------------------ the stage's first and last functions
    def enter(self, biases: nn.Module, x: torch.Tensor) -> tuple:
        """Stage input (embeddings on the first stage, the received activation elsewhere) -> the carry.
        ``biases`` is the stage's ``GlobalBiasesPipe`` (pipeline.py), whose forward calls this."""
        slot = self.forwards
        if slot >= self.micro_batches:
            raise RuntimeError(f"stage {self.stage}: more forward passes than the {self.micro_batches} "
                               f"micro-batches of a step (call runtime.begin_step before every train_batch)")
        self.forwards += 1
        old = self.memory.get(slot) or self._empty_memory(x)
        valid = self.memory.valid[slot]
        M = old[self.memory.names[0]].shape[1]
        pending = {}
        if self.lookahead and self.first:
            x = torch.cat([old["embeddings"], x], dim=1)        # [memory rows; current rows]
            pending["embeddings"] = x.detach()                  # the new FIFO (truncated on commit)
        N = x.shape[1] - M if self.lookahead else x.shape[1]
        # The look-ahead biases get no gradient while the memory is empty, nor on a stage whose only layer is
        # the top one (its look-ahead only refreshes the detached cache: DecoderLayer.step). Tie them into the
        # graph with a zero so that every tied parameter gets a gradient on every stage: DeepSpeed's
        # tied-gradient all-reduce reads a gradient that exists only for parameters that received one (a
        # stage without it would leave the others waiting in the all-reduce).
        if (M == 0 or self.only_top_layer) and biases.training:
            unused = [b for b in (biases.future_position_bias, biases.future_content_bias) if b is not None]
            if unused and torch.is_grad_enabled():
                x = x + sum(b.sum() for b in unused) * 0.0
        positions = self._positions(M, N, x.dtype, x.device, slot, biases.training)
        self._current = (slot, pending, valid, N)
        return (x, *biases.tensors(), positions.causal, positions.lookahead, valid,
                *[old[name] for name in self.carry_names])

    def exit(self, carry: tuple) -> torch.Tensor:
        """Commit the new memory of this forward; return the stage's single output tensor."""
        slot, pending, valid, added = self._current
        self._current = None
        new = dict(pending)
        new.update(zip(self.carry_names, carry[FIRST_MEMORY:]))
        self.memory.commit(slot, new, valid, added)
        return carry[ACT]       # the top layer returns its current rows only (DecoderLayer.step)

    # ------------------------------------------------------------------ helpers
    def _empty_memory(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c, B = self.config, x.shape[0]
        empty = LaMemoMemory.empty(batch_size=B, n_layer=c.n_layer, d_model=c.d_model, n_head=self.n_local_heads,
                                   d_head=c.d_head, lookahead=self.lookahead, device=x.device, dtype=x.dtype)
        tensors = empty.tensors()
        return {name: tensors[name] for name in self.memory.names}

    def _positions(self, M: int, N: int, dtype, device, slot: int, training: bool) -> PositionEncodings:
        """``positions.position_encodings`` (one table for all layers), with a dropout mask every stage of
        the pipeline redraws identically."""
        if self.inv_freq.device != torch.device(device):
            self.inv_freq = self.inv_freq.to(device)
        p = self.config.dropout

        def shared_dropout(table: torch.Tensor) -> torch.Tensor:
            if not training or p == 0.0:
                return table
            seed = hash((self.seed, self.dp_rank, self.step, slot)) & ((1 << 63) - 1)   # ints: not salted
            devices = [table.device] if table.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return F.dropout(table, p, training=True)

        return position_encodings(self.config, M, N, self.inv_freq, dtype, shared_dropout)
