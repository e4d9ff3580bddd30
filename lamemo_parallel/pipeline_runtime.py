"""What a pipeline stage keeps and passes on: the carry through its functions, the one tensor that
crosses a stage boundary, and the memory per micro-batch slot (``StageMemory``, ``StageRuntime``).
The stages themselves, as DeepSpeed layer specs, are in ``lamemo_parallel/pipeline.py``.

Between stages one tensor travels (DeepSpeed back-propagates through the first output tensor only):
LaMemo sends [memory rows; current rows] = [B, M+N, d]: both parts carry gradient, since the memory rows are
recomputed at every layer. Transformer-XL sends the current rows [B, N, d]: layer l reads the cached input of
layer l, which the stage holding layer l keeps itself.

Inside a stage a *carry* tuple flows through the functions (layout ``ACT .. FIRST_MEMORY`` below): the
activation, the global biases u, v, v+, u+ (``None`` where a variant has none), the position tables of the
step, then this stage's memory inputs per layer (C-bar, Z-bar for LaMemo; the cached layer input for XL).
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

Shapes: the memory length M is the same for every slot; it grows 0, N, 2N, .. up to mem_len over the first
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
from .memory import LaMemoMemory
from .positions import inverse_frequencies, position_encodings

#: Positions in the carry tuple that flows through a stage.
ACT, CONTENT, POSITION, FUTURE_POSITION, FUTURE_CONTENT, POS_CAUSAL, POS_AHEAD = range(7)
FIRST_MEMORY = 7


def layer_memory_names(layer: int, lookahead: bool) -> list[str]:
    """The memory tensors that layer ``layer`` reads and writes, in ``LaMemoMemory.tensors()`` naming."""
    if lookahead:
        return [f"vectors.{layer}", f"log_normalizers.{layer}"]
    return ["embeddings" if layer == 0 else f"hidden.{layer - 1}"]   # XL: the cached input of the layer


# ---------------------------------------------------------------------------------------------- memory
class StageMemory:
    """The memory one pipeline stage keeps, per micro-batch slot: name -> [B, M, ...] tensor (detached)."""

    def __init__(self, n_slots: int, names: list[str], mem_len: int):
        self.names = list(names)
        self.mem_len = mem_len
        self.slots: list[dict[str, torch.Tensor] | None] = [None] * n_slots

    def get(self, slot: int) -> dict[str, torch.Tensor] | None:
        return self.slots[slot]

    def length(self) -> int:
        """M, the number of memory rows: the same for every slot (0 before the first step)."""
        lengths = {0 if s is None else s[self.names[0]].shape[1] for s in self.slots}
        if len(lengths) != 1:
            raise RuntimeError(f"the micro-batch slots hold memories of different lengths {sorted(lengths)}")
        return lengths.pop()

    def commit(self, slot: int, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the newest ``mem_len`` rows of every tensor (as ``LaMemoMemory.last`` and ``detach``)."""
        if sorted(tensors) != sorted(self.names):
            raise RuntimeError(f"memory commit of {sorted(tensors)}, this stage keeps {sorted(self.names)}")
        self.slots[slot] = {name: t[:, max(0, t.shape[1] - self.mem_len):].detach().contiguous()
                            for name, t in tensors.items()}

    def reset(self) -> None:
        self.slots = [None] * len(self.slots)

    def state(self) -> list[dict[str, torch.Tensor] | None]:
        """Per slot: name -> tensor (this rank's layers and heads), or None for a slot not run yet."""
        return [None if s is None else dict(s) for s in self.slots]

    def load_state(self, state: list[dict[str, torch.Tensor] | None]) -> None:
        if len(state) != len(self.slots):
            raise ValueError(f"memory for {len(state)} micro-batch slots, this stage has {len(self.slots)}")
        for k, s in enumerate(state):
            if s is not None and sorted(s) != sorted(self.names):
                raise ValueError(f"memory of slot {k} holds {sorted(s)}; this pipeline stage keeps "
                                 f"{sorted(self.names)} (was it saved with another pipeline partition?)")
        old = self.slots
        self.slots = [None if s is None else dict(s) for s in state]
        try:
            self.length()
        except RuntimeError:
            self.slots = old
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
        self._current = (slot, pending)
        return (x, *biases.tensors(), positions.causal, positions.lookahead,
                *[old[name] for name in self.carry_names])

    def exit(self, carry: tuple) -> torch.Tensor:
        """Commit the new memory of this forward; return the stage's single output tensor."""
        slot, pending = self._current
        self._current = None
        new = dict(pending)
        new.update(zip(self.carry_names, carry[FIRST_MEMORY:]))
        self.memory.commit(slot, new)
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
