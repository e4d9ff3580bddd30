"""The fused softmax part of the attention: torch's FlexAttention, returning the log-sum-exp (CUDA path).

The content term goes in as the query-key product (queries already carry the bias u / u+ and the 1/sqrt(d_h)
scale); the relative-position term is precomputed (the same [rows, distances] product the eager path uses) and
added by a ``score_mod`` that reads it at each (query, key)'s distance; the causal / strictly-future masks are
block masks, cached per (M, N, device) like the eager tables. FlexAttention never materialises the softmax and
returns the log-sum-exp (natural log, float32) that LaMemo caches (Z) and differentiates (Z+).

On CUDA the kernel is ``torch.compile``d (a Triton kernel, backward included). Elsewhere FlexAttention runs its
unfused reference implementation, forward only (torch 2.13 has no CPU backward): the eager path in
``attention`` is the numerical reference and the CPU training path. Attention-probability dropout has no fused
form: a layer with active ``dropatt`` runs the eager path (see ``RelativeAttention.forward``).
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

from .positions import LookaheadPlan


@functools.lru_cache(maxsize=None)
def _kernel(device_type: str):
    """The compiled FlexAttention on CUDA; the plain (reference) function elsewhere."""
    if device_type == "cuda":
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


@functools.lru_cache(maxsize=128)
def causal_block_mask(mem_len: int, seg_len: int, device: torch.device):
    """Current row t (absolute M + t) attends keys j <= M + t: the block mask of one (M, N, device)."""
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + mem_len
    return create_block_mask(causal, None, None, seg_len, mem_len + seg_len, device=device)


@functools.lru_cache(maxsize=128)
def lookahead_block_mask(mem_len: int, start: int, width: int, strict: bool, device: torch.device):
    """Memory row i attends window key start + w when start + w > i (strict), or every window key (33)."""
    def future(b, h, q_idx, kv_idx):
        return kv_idx + start > q_idx
    def everything(b, h, q_idx, kv_idx):
        return kv_idx >= 0
    return create_block_mask(future if strict else everything, None, None, mem_len, width, device=device)


def _with_missing_rows(mask_mod, key_start: int, key_offsets: torch.Tensor, q_len: int, kv_len: int):
    """A per-batch-row block mask (not cached: the offsets are data): ``mask_mod`` and key ``key_start + kv``
    not before the row's ``key_offsets`` (memory rows that batch row does not have, ``LaMemoMemory.valid``)."""
    def masked(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (kv_idx + key_start >= key_offsets[b])
    return create_block_mask(masked, key_offsets.shape[0], None, q_len, kv_len, device=key_offsets.device)


def _run(query, key, value, score_mod, block_mask):
    out, aux = _kernel(query.device.type)(query, key, value, score_mod=score_mod, block_mask=block_mask,
                                          scale=1.0, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def causal_attention(content_q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor,
                     mem_len: int, key_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """content_q [B, H, N, d_h] (scaled, with u), k / v [B, H, T, d_h], position [B, H, N, T]: row r of the
    distance table (distance T-1-r) for each current row, scaled, as in ``relative_shift``'s input.
    ``key_offsets`` [B]: keys before it are masked for that batch row (None: none).
    Returns the attention vectors [B, H, N, d_h] and Z [B, H, N] (float32)."""
    N, T = content_q.shape[2], k.shape[2]

    def add_position(score, b, h, q_idx, kv_idx):
        # distance (M + q) - kv is table row N - 1 - q + kv; clamped where the mask discards the entry anyway
        return score + position[b, h, q_idx, torch.clamp(N - 1 - q_idx + kv_idx, max=T - 1)]

    mask = causal_block_mask(mem_len, N, content_q.device)
    if key_offsets is not None:
        mask = _with_missing_rows(mask.mask_mod, 0, key_offsets, N, T)
    return _run(content_q, k, v, add_position, mask)


def lookahead_attention(content_q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                        position: torch.Tensor, plan: LookaheadPlan, key_offsets: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """content_q [B, H, M, d_h] (scaled, with u / u+), k_win / v_win [B, H, W, d_h], position [B, H, M, W]
    (``positions.lookahead_position_scores``, scaled); ``key_offsets`` as in ``causal_attention``. Returns a_i
    [B, H, M, d_h] and Z+ [B, H, M] (float32, differentiable)."""
    def add_position(score, b, h, q_idx, kv_idx):
        return score + position[b, h, q_idx, kv_idx]

    mask = lookahead_block_mask(plan.mem_len, plan.start, plan.width, plan.future_blocked is not None,
                                content_q.device)
    if key_offsets is not None:
        mask = _with_missing_rows(mask.mask_mod, plan.start, key_offsets, plan.mem_len, plan.width)
    return _run(content_q, k_win, v_win, add_position, mask)
