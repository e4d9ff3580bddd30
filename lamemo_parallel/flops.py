"""Multiply-add and FLOP accounting for LaMemo and Transformer-XL (spec §6).

Counts are per sequence (one batch row) and per segment step; a FLOP is 2 multiply-adds. Training costs
3x the forward pass (forward + two backward matmuls); with full activation recompute the hardware does one
more forward (HFU counts it, MFU does not).
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


def xl_layer_macs(N: int, M: int, d: int, d_ff: int) -> int:
    """Transformer-XL layer: Q/O on N rows, K/V on M+N rows, FFN on N rows, content + position logits and
    the weighted sum over M+N keys, and W_R on the M+N distances."""
    return (2 * N + 2 * (M + N)) * d * d + 2 * N * d * d_ff + 3 * N * (M + N) * d + (M + N) * d * d


def lookahead_extra_macs(N: int, M: int, d: int, d_ff: int) -> int:
    """What LaMemo adds per layer: Q and O on memory rows, FFN on memory rows, look-ahead logits and sum over
    min(M, N) keys, and W_R on the M future distances. Linear in M."""
    return 2 * M * d * d + 2 * M * d * d_ff + 3 * M * min(M, N) * d + M * d * d


def forward_macs(shape: StepShape, include_output: bool = True) -> int:
    N, M, d, f = shape.seg_len, shape.mem_len, shape.d_model, shape.d_inner
    per_layer = xl_layer_macs(N, M, d, f) + (lookahead_extra_macs(N, M, d, f) if shape.lookahead else 0)
    total = shape.n_layer * per_layer
    if include_output:
        total += N * d * shape.vocab_size
    return total


def training_flops(shape: StepShape, *, recompute: bool = False) -> int:
    """FLOPs of one training step for one sequence: 2 FLOPs per MAC, x3 for forward + backward,
    +1 forward when activations are recomputed (hardware FLOPs)."""
    passes = 4 if recompute else 3
    return 2 * passes * forward_macs(shape)
