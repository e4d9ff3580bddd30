"""Multiply-add and FLOP accounting for LaMemo and Transformer-XL (docs/method.md §6).

Counts are per segment step, for one sequence (one batch row) by default; a FLOP is 2 multiply-adds.
Training costs 3x the forward pass (forward + two backward matmuls), except the part of LaMemo's top layer
that only refreshes its detached cache, which needs no backward; the top layer's memory rows themselves
(W_o, FFN) are not computed at all, since nothing reads them. With activation recompute the
hardware runs the layer stack forward once more (HFU counts it, MFU does not). The output layer and the
loss sit outside the checkpointed layers, so they are not recomputed.

The relative-position projection W_R runs on the distance table, which every row of a batch shares: it
costs the same for a forward call of one sequence or of ``batch_size`` sequences. Pass ``batch_size`` (the
sequences of one forward call, i.e. the micro-batch) to count it once per call instead of once per row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepShape:
    n_layer: int
    d_model: int
    d_inner: int
    vocab_size: int
    seg_len: int      # N
    mem_len: int      # M (the memory actually present)
    lookahead: bool


def xl_layer_macs(N: int, M: int, d: int, d_ff: int, *, batch_size: int = 1) -> int:
    """Transformer-XL layer for ``batch_size`` sequences: Q/O on N rows, K/V on M+N rows, FFN on N rows,
    content + position logits and the weighted sum over M+N keys; and once per call, W_R on the M+N
    distances."""
    per_row = (2 * N + 2 * (M + N)) * d * d + 2 * N * d * d_ff + 3 * N * (M + N) * d
    return batch_size * per_row + (M + N) * d * d


def lookahead_extra_macs(N: int, M: int, d: int, d_ff: int, *, batch_size: int = 1) -> int:
    """What LaMemo adds per layer for ``batch_size`` sequences: Q and O on memory rows, FFN on memory rows,
    look-ahead logits and sum over min(M, N) keys; and once per call, W_R on the M future distances.
    Linear in M once M >= N."""
    per_row = 2 * M * d * d + 2 * M * d * d_ff + 3 * M * min(M, N) * d
    return batch_size * per_row + M * d * d


def top_memory_rows_macs(N: int, M: int, d: int, d_ff: int, *, batch_size: int = 1) -> int:
    """What LaMemo's top layer skips: W_o and the FFN on its memory rows, which no later layer reads
    (``DecoderLayer.step(feeds_next_layer=False)``)."""
    return batch_size * (M * d * d + 2 * M * d * d_ff)


def top_cache_only_macs(N: int, M: int, d: int, d_ff: int, *, batch_size: int = 1) -> int:
    """The part of LaMemo's top layer that only refreshes its detached cache, so it runs forward only: Q on
    the memory rows, the look-ahead logits and sum, and W_R on the M future distances."""
    if M == 0:
        return 0
    return batch_size * (M * d * d + 3 * M * min(M, N) * d) + M * d * d


def forward_macs(shape: StepShape, include_output: bool = True, *, batch_size: int = 1) -> int:
    """Multiply-adds of one forward call on ``batch_size`` sequences (default: one sequence)."""
    N, M, d, f = shape.seg_len, shape.mem_len, shape.d_model, shape.d_inner
    per_layer = xl_layer_macs(N, M, d, f, batch_size=batch_size)
    if shape.lookahead:
        per_layer += lookahead_extra_macs(N, M, d, f, batch_size=batch_size)
    total = shape.n_layer * per_layer
    if shape.lookahead and shape.n_layer > 0:
        total -= top_memory_rows_macs(N, M, d, f, batch_size=batch_size)
    if include_output:
        total += batch_size * N * d * shape.vocab_size
    return total


def training_flops(shape: StepShape, *, recompute: bool = False, batch_size: int = 1) -> int:
    """FLOPs of one training step of a forward call on ``batch_size`` sequences (default one): 2 FLOPs per
    MAC, x3 for forward + backward except the top layer's cache-only look-ahead (forward only), plus one more
    forward of the layer stack when activations are recomputed (hardware FLOPs; the output layer is not
    recomputed)."""
    macs = 3 * forward_macs(shape, batch_size=batch_size)
    if shape.lookahead and shape.n_layer > 0:
        macs -= 2 * top_cache_only_macs(shape.seg_len, shape.mem_len, shape.d_model, shape.d_inner,
                                        batch_size=batch_size)
    if recompute:
        macs += forward_macs(shape, include_output=False, batch_size=batch_size)
    return 2 * macs
