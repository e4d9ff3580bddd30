"""One decoder layer: relative attention, then the position-wise FFN on every row it produced."""
from __future__ import annotations

import torch
from torch import nn

from .attention import AttentionResult, RelativeAttention


class PositionwiseFF(nn.Module):
    """Linear + ReLU + Dropout + Linear + Dropout, then residual and LayerNorm (post-LN) or LN first (pre-LN)."""

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool, linears,
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.fc1 = linears.column(d_model, d_inner, bias=True)
        self.fc2 = linears.row(d_inner, d_model, bias=True)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.drop_inner = nn.Dropout(dropout)
        self.drop_out = nn.Dropout(dropout)
        self.pre_lnorm = pre_lnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inp = self.norm(x) if self.pre_lnorm else x
        # relu in place on fc1's fresh output: one [rows, d_ff] tensor fewer per layer
        out = self.drop_out(self.fc2(self.drop_inner(self.fc1(inp).relu_())))
        if out.dtype == torch.float16:
            # fp16 overflow guard (as the release does under O2): clamp infinities to the largest finite value.
            limit = torch.finfo(out.dtype).max - 1000
            out = out.clamp(-limit, limit)
        return x + out if self.pre_lnorm else self.norm(x + out)


class DecoderLayer(nn.Module):
    def __init__(self, config, linears):
        super().__init__()
        self.attn = RelativeAttention(
            d_model=config.d_model, n_head=config.n_head, d_head=config.d_head, dropout=config.dropout,
            dropatt=config.dropatt, pre_lnorm=config.pre_lnorm, lookahead=config.uses_lookahead,
            variant=config.variant, linears=linears, layer_norm_eps=config.layer_norm_eps)
        self.ff = PositionwiseFF(config.d_model, config.d_inner, config.dropout, config.pre_lnorm, linears,
                                 layer_norm_eps=config.layer_norm_eps)

    def forward(self, z: torch.Tensor, **attention_inputs) -> AttentionResult:
        """LaMemo: z = [m; h] -> [m^l; h^l] (the FFN runs on memory rows too). XL: returns current rows only."""
        result = self.attn(z, **attention_inputs)
        return result._replace(output=self.ff(result.output))
