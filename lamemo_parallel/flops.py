"""Multiply-add and FLOP accounting for LaMemo and Transformer-XL (docs/method.md §6).

Counts are per segment step, for one sequence (one batch row) by default; a FLOP is 2 multiply-adds.
Training costs 3x the forward pass (forward + two backward matmuls), except the part of LaMemo's top layer
that only refreshes its detached cache, which needs no backward; the top layer's memory rows themselves
(W_o, FFN) are not computed at all, since nothing reads them. With whole-layer recompute
(``parallel.recompute=full``) the hardware runs the layer stack forward once more; with selective recompute
(``attention``) it runs the attention core's matmuls once more (``recomputed_core_macs``). HFU counts either,
MFU neither. The output layer and the loss sit outside the checkpointed layers, so they are not recomputed.

The relative-position projection W_R runs on the distance table, which every row of a batch shares: it
costs the same for a forward call of one sequence or of ``batch_size`` sequences. Pass ``batch_size`` (the
sequences of one forward call, i.e. the micro-batch) to count it once per call instead of once per row.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import RECOMPUTE_MODES


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


def recomputed_core_macs(shape: StepShape, *, batch_size: int = 1) -> int:
    """Multiply-adds that selective recompute (``parallel.recompute=attention``) runs again in backward: each
    layer's attention core from its projections (``RelativeAttention._attend``). torch's checkpoint stops
    recomputing once the last tensor backward needs exists (its early stop), so a core whose last kept tensor
    is the causal probabilities (Transformer-XL, a LaMemo step without memory, and LaMemo's top layer, whose
    look-ahead feeds only the detached cache) recomputes the content and position logits, 2*N*(M+N)*d, but
    not the weighted sum; a LaMemo layer with memory recomputes its whole core, 3*N*(M+N)*d + the look-ahead
    logits and sum 3*M*min(M, N)*d."""
    N, M, d, L = shape.seg_len, shape.mem_len, shape.d_model, shape.n_layer
    logits = 2 * N * (M + N) * d
    if not shape.lookahead or M == 0 or L == 0:
        return batch_size * L * logits
    whole = 3 * N * (M + N) * d + 3 * M * min(M, N) * d
    return batch_size * ((L - 1) * whole + logits)


def training_flops(shape: StepShape, *, recompute: str = "none", batch_size: int = 1) -> int:
    """FLOPs of one training step of a forward call on ``batch_size`` sequences (default one): 2 FLOPs per
    MAC, x3 for forward + backward except the top layer's cache-only look-ahead (forward only), plus what
    ``recompute`` (one of ``RECOMPUTE_MODES``) runs again: ``full`` one more forward of the layer stack (not
    the output layer), ``attention`` the attention cores (``recomputed_core_macs``). ``none`` gives the model
    FLOPs (MFU), the run's own setting its hardware FLOPs (HFU)."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    macs = 3 * forward_macs(shape, batch_size=batch_size)
    if shape.lookahead and shape.n_layer > 0:
        macs -= 2 * top_cache_only_macs(shape.seg_len, shape.mem_len, shape.d_model, shape.d_inner,
                                        batch_size=batch_size)
    if recompute == "full":
        macs += forward_macs(shape, include_output=False, batch_size=batch_size)
    elif recompute == "attention":
        macs += recomputed_core_macs(shape, batch_size=batch_size)
    return 2 * macs
