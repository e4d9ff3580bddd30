"""One decoder layer: relative attention, then the position-wise FFN on every row it produced.

``DecoderLayer.step`` is the one place that runs a layer on (hidden, that layer's memory) and returns (hidden,
that layer's new memory): the single-device model loops over it, each pipeline stage runs it once per layer.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .attention import AttentionResult, GlobalBiases, PositionEncodings, RelativeAttention
from .memory import newest_rows


class LayerStep(NamedTuple):
    """What one layer step returns (a named tuple so that ZeRO-3's and checkpoint's hooks see the tensors)."""

    hidden: torch.Tensor         # LaMemo: [B, M+N, d] (memory rows recomputed), the top layer [B, N, d]; XL: [B, N, d]
    memory: tuple                # this layer's new memory, detached (see ``DecoderLayer.step``)
    probs: dict | None = None    # attention weights, when asked for


class PositionwiseFF(nn.Module):
    """Linear + ReLU + Dropout + Linear + Dropout, then residual and LayerNorm (post-LN) or LN first (pre-LN)."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool, parallel,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.fc1 = parallel.column(d_model, d_inner, bias=True)
        self.fc2 = parallel.row(d_inner, d_model, bias=True)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.drop_inner = parallel.split_dropout(dropout)       # on this rank's inner units
        self.drop_out = nn.Dropout(dropout)
        self.pre_lnorm = pre_lnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.norm(x) if self.pre_lnorm else x
        # Not relu_: fc1's output is a view of a 2-D addmm result, and an in-place op on a view makes autograd
        # rebuild the base in backward (a clone, two copies and a zero-fill of [rows, d_ff] per layer).
        out = self.drop_out(self.fc2(self.drop_inner(torch.relu(self.fc1(inp)))))
        if out.dtype == torch.float16:
            # fp16 overflow guard (as the release does under O2): clamp infinities to the largest finite value.
            limit = torch.finfo(out.dtype).max - 1000
            out = out.clamp(-limit, limit)
        return x + out if self.pre_lnorm else self.norm(x + out)


class DecoderLayer(nn.Module):
    def __init__(self, config, parallel):
        """``parallel``: how the pieces are made for the layout (``linear.PlainParts`` and its subclasses)."""
        super().__init__()
        self.attn = RelativeAttention(
            d_model=config.d_model, n_head=config.n_head, d_head=config.d_head, dropout=config.dropout,
            dropatt=config.dropatt, pre_lnorm=config.pre_lnorm, lookahead=config.traits.looks_ahead,
            variant=config.variant, parallel=parallel, layer_norm_eps=config.layer_norm_eps)
        self.ff = PositionwiseFF(config.d_model, config.d_inner, config.dropout, config.pre_lnorm, parallel,
                                 layer_norm_eps=config.layer_norm_eps)

    def forward(self, z: torch.Tensor, **attention_inputs) -> AttentionResult:
        """LaMemo: z = [m; h] -> [m^l; h^l] (the FFN runs on memory rows too; on the current rows only when
        ``memory_rows_out=False``). XL: returns current rows only."""
        result = self.attn(z, **attention_inputs)
        return result._replace(output=self.ff(result.output))

    def step(self, hidden: torch.Tensor, memory: tuple, *, positions: PositionEncodings, biases: GlobalBiases,
             mem_len: int | None = None, return_probs: bool = False, feeds_next_layer: bool = True,
             valid: torch.Tensor | None = None) -> LayerStep:
        """One layer with its memory in and out (docs/method.md §4, §5).

        ``feeds_next_layer=False`` for the top layer: LaMemo's top-layer memory rows are discarded, so the
        step returns the current rows only and spends no W_o, FFN or backward pass on the memory rows
        (``RelativeAttention.forward``'s ``memory_rows_out``); its new memory (the cache) is unchanged.

        LaMemo: ``hidden`` = [memory rows; current rows] of this layer's input, ``memory`` = (C-bar, Z-bar) of
        its M memory rows; the new memory is the C-bar, Z-bar of every row it produced. Transformer-XL:
        ``hidden`` = the current rows, ``memory`` = (the cached input of this layer,); the new memory is that
        cache followed by this input. The new memory keeps its newest ``mem_len`` rows (None: all) and is
        detached: the next segment reads it as a constant. ``valid`` [B]: the memory's real rows per batch row
        (``LaMemoMemory.valid``; None: all), the others masked as keys; the caller advances it.
        """
        if self.attn.lookahead:
            vectors, log_normalizers = memory
            result = self(hidden, mem_len=vectors.shape[1], positions=positions, biases=biases,
                          cached_vectors=vectors, cached_log_normalizers=log_normalizers, return_probs=return_probs,
                          memory_rows_out=feeds_next_layer, memory_valid=valid)
            new = (_newest(result.vectors, mem_len), _newest(result.log_normalizers, mem_len))
        else:
            (cached_input,) = memory
            result = self(torch.cat([cached_input, hidden], dim=1), mem_len=cached_input.shape[1],
                          positions=positions, biases=biases, return_probs=return_probs, memory_valid=valid)
            rows = cached_input.shape[1] + hidden.shape[1] if mem_len is None else mem_len
            new = (newest_rows(cached_input, hidden, rows).detach(),)
        return LayerStep(result.output, new, result.probs)


def _newest(rows: torch.Tensor, mem_len: int | None) -> torch.Tensor:
    """The newest ``mem_len`` rows (dim 1; all when None), detached."""
    keep = rows.shape[1] if mem_len is None else min(mem_len, rows.shape[1])
    return rows[:, rows.shape[1] - keep:].detach()
