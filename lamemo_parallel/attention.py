"""Relative multi-head attention: causal attention of the current rows (Transformer-XL) and, for LaMemo,
look-ahead attention of the memory rows plus the interpolation with their cached state (docs/method.md §4).

Layout is batch-major: rows are [B, T, ...] with T = M + N (memory rows first). Scores are [B, H, Q, K].
Two implementations of the softmax part share the projections and the interpolation: ``eager`` (plain torch,
the numerical reference and the CPU path) and ``flex`` (torch's FlexAttention, fused, for CUDA; see
``fused_attention``). The masks and index tables come from ``positions.step_tables`` (cached per shape).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import BASELINE_VARIANT, RECOMPUTE_MODES, ConfigError, variant_traits
from .memory import missing_rows
from .positions import PositionEncodings, lookahead_position_scores, relative_shift, step_tables
from .softmax import softmax_with_lse, statistics_dtype

__all__ = ["ATTENTION_BACKENDS", "AttentionResult", "GlobalBiases", "PositionEncodings", "RelativeAttention",
           "attention_backend_of", "statistics_dtype", "use_attention_backend", "use_selective_recompute"]

#: Added to the interpolation's denominator, exactly as in the paper's release.
INTERPOLATION_EPS = 1e-6
#: ``eager``: plain torch (reference, CPU); ``flex``: FlexAttention (CUDA; forward also runs on CPU, unfused).
ATTENTION_BACKENDS = ("eager", "flex")


def use_attention_backend(model: nn.Module, name: str) -> None:
    """Run every attention layer of ``model`` (a whole model or a pipeline stage) with backend ``name``."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {name!r}")
    for module in model.modules():
        if isinstance(module, RelativeAttention):
            module.backend = name


def use_selective_recompute(model: nn.Module, mode: str) -> None:
    """Switch every attention layer of ``model`` to recompute its core in backward when ``mode`` (one of
    ``RECOMPUTE_MODES``) is ``attention``; ``full`` is the model's or the pipeline's whole-layer checkpoint."""
    if mode not in RECOMPUTE_MODES:
        raise ConfigError(f"recompute must be one of {RECOMPUTE_MODES}, got {mode!r}")
    for module in model.modules():
        if isinstance(module, RelativeAttention):
            module.recompute_core = mode == "attention"


def attention_backend_of(model: nn.Module) -> set[str]:
    """The backends the attention layers of ``model`` run with (one, unless set layer by layer)."""
    return {module.backend for module in model.modules() if isinstance(module, RelativeAttention)}


@dataclass
class GlobalBiases:
    """The biases shared by every layer, each [H_local, d_h] (docs/method.md §2)."""

    content: torch.Tensor            # u  (r_w_bias)
    position: torch.Tensor           # v  (r_r_bias)
    future_position: torch.Tensor | None = None   # v+ (r_r_bias_future): VariantTraits.future_position_bias
    future_content: torch.Tensor | None = None    # u+ (r_w_bias_future): VariantTraits.future_content_bias


class AttentionResult(NamedTuple):
    """A named tuple (not a dataclass) so that ZeRO-3's hooks find the tensors in a layer's output."""

    output: torch.Tensor                     # [B, T, d] (LaMemo) or [B, N, d] (XL): before the FFN
    vectors: torch.Tensor | None             # [B, T, H, d_h] new C-bar rows (LaMemo)
    log_normalizers: torch.Tensor | None     # [B, T, H] new Z-bar rows, float32 (LaMemo)
    probs: dict | None = None                # attention weights, when asked for


class RelativeAttention(nn.Module):
    """Multi-head attention with relative positions; look-ahead + interpolation when ``lookahead``."""

    def __init__(self, *, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float,
                 pre_lnorm: bool, lookahead: bool, variant: int, parallel, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.n_local_heads = parallel.local(n_head)
        self.d_head = d_head
        self.scale = 1.0 / math.sqrt(d_head)
        self.pre_lnorm = pre_lnorm
        self.lookahead = lookahead
        self.variant = variant
        #: Which softmax implementation runs (one of ATTENTION_BACKENDS); the model sets it on every layer.
        self.backend = "eager"
        #: Selective recompute (training only): keep the projections, recompute the core (``_attend``: scores,
        #: softmax, look-ahead, interpolation) in backward. ``use_recompute`` sets it on every layer.
        self.recompute_core = False
        inner = n_head * d_head
        # Separate K and V projections (the release packs them) so that a column split gives each
        # tensor-parallel rank whole heads of both.
        self.q_proj = parallel.column(d_model, inner, bias=False)
        self.k_proj = parallel.column(d_model, inner, bias=False)
        self.v_proj = parallel.column(d_model, inner, bias=False)
        self.r_proj = parallel.column(d_model, inner, bias=False)
        self.o_proj = parallel.row(inner, d_model, bias=False)
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.dropatt = parallel.split_dropout(dropatt)     # on this rank's heads

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H*d_h] -> [B, H, T, d_h]."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_local_heads, self.d_head).transpose(1, 2)

    def forward(self, z: torch.Tensor, *, mem_len: int, positions: PositionEncodings, biases: GlobalBiases,
                cached_vectors: torch.Tensor | None = None, cached_log_normalizers: torch.Tensor | None = None,
                return_probs: bool = False, memory_rows_out: bool = True,
                memory_valid: torch.Tensor | None = None) -> AttentionResult:
        """``z`` = [memory rows; current rows], [B, M+N, d].

        ``memory_valid`` [B] (``LaMemoMemory.valid``): how many of the M memory rows of each batch row are real
        (the newest); the others are masked as keys for that row. None (every row real) adds no mask op.

        LaMemo: every row gets a query; returns all M+N rows. XL: memory rows are keys only; returns N rows.
        ``memory_rows_out=False`` (LaMemo's top layer, whose memory rows no later layer reads): returns the N
        current rows only. The memory rows' W_o is skipped, and their look-ahead and interpolation, which then
        feed only the detached cache (C-bar, Z-bar), run without autograd. The current rows, the cache and
        every gradient are exactly what the full computation gives.
        """
        M = mem_len
        T = z.shape[1]
        N = T - M
        tables = step_tables(M, N, self.variant if self.lookahead else BASELINE_VARIANT, z.device)
        # The fused path has no attention-probability dropout and returns no probabilities: such a call runs eager.
        dropatt_active = self.dropatt.p > 0 and self.training
        fused = self.backend == "flex" and not return_probs and not dropatt_active
        if fused and z.device.type == "cpu" and torch.is_grad_enabled() and z.requires_grad:
            raise RuntimeError("the 'flex' attention backend has no backward pass on CPU (torch 2.13): "
                               "train on CPU with attention_backend='eager'")
        zn = self.norm(z) if self.pre_lnorm else z
        cache_only_memory = self.lookahead and not memory_rows_out and M > 0
        if cache_only_memory:
            q_cur = self._heads(self.q_proj(zn[:, M:]))      # [B, H, N, d_h]
            with torch.no_grad():
                q_mem = self._heads(self.q_proj(zn[:, :M]))  # [B, H, M, d_h], feeds only the cache
        else:
            query_rows = zn if self.lookahead else zn[:, M:]
            q = self._heads(self.q_proj(query_rows))         # [B, H, Tq, d_h]
            # split, not two slices: its backward is one concatenation, not two zero-filled full-size grads
            q_mem, q_cur = q.split([M, N], dim=2) if self.lookahead else (None, q)
        k = self._heads(self.k_proj(zn))                     # [B, H, T, d_h]
        v = self._heads(self.v_proj(zn))
        r_causal = self.r_proj(positions.causal).view(T, self.n_local_heads, self.d_head)
        recorded = {} if return_probs else None
        r_table = None
        if self.lookahead and M > 0:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not cache_only_memory):
                r_table = self.r_proj(positions.lookahead).view(-1, self.n_local_heads, self.d_head)
        core = dict(mem_len=M, tables=tables, biases=biases, recorded=recorded, fused=fused,
                    cache_only_memory=cache_only_memory, key_offsets=missing_rows(memory_valid, M))
        if self.recompute_core and recorded is None and self.training and torch.is_grad_enabled():
            # Selective recompute: the linear layers' outputs above are kept; the scores, softmax, look-ahead and
            # interpolation are recomputed in backward. The cached memory enters as an explicit input, so the
            # recompute reads it as it was at forward time; checkpoint replays the dropout RNG state.
            vec_cur, vectors, lse = checkpoint(self._attend, q_cur, q_mem, k, v, r_causal, r_table,
                                               cached_vectors, cached_log_normalizers, use_reentrant=False, **core)
        else:
            vec_cur, vectors, lse = self._attend(q_cur, q_mem, k, v, r_causal, r_table, cached_vectors,
                                                 cached_log_normalizers, **core)
        if not self.lookahead:
            return AttentionResult(self._project(vec_cur, z[:, M:]), None, None, recorded)
        out = self._project(vec_cur, z[:, M:]) if cache_only_memory else self._project(vectors, z)
        return AttentionResult(out, vectors.transpose(1, 2), lse.transpose(1, 2), recorded)

    def _attend(self, q_cur, q_mem, k, v, r_causal, r_table, cached_vectors, cached_lse, *, mem_len, tables,
                biases, recorded, fused, cache_only_memory, key_offsets=None):
        """The attention core from the projections: (c_t of the current rows [B, H, N, d_h]; LaMemo: every
        row's new C-bar [B, H, M+N, d_h] and Z-bar [B, H, M+N], else None, None). What selective recompute
        (``recompute_core``) recomputes in backward; it holds no parameter except the global biases.
        ``key_offsets`` [B] (None: none): keys before it are memory rows that batch row does not have."""
        M = mem_len
        # ---- causal attention of the current rows (exactly Transformer-XL) ---------------------------
        # The scale is folded into the (small) queries rather than applied to the [N, T] scores.
        content_q = (q_cur + biases.content[:, None]) * self.scale
        position = torch.matmul((q_cur + biases.position[:, None]) * self.scale, r_causal.permute(1, 2, 0))
        if fused:
            # imported here: FlexAttention loads torch's compile stack, which the eager path never needs
            from .fused_attention import causal_attention
            vec_cur, lse_cur = causal_attention(content_q, k, v, position, M, key_offsets)
        else:
            # Each [B, H, N, M+N] tensor is dropped as soon as the next one exists (``del``): autograd keeps
            # none of them but the probabilities, so at most two are alive at once (a step's transient peak,
            # and under selective recompute the whole forward's and backward's attention peak).
            shifted = relative_shift(position)                              # the padded copy; position is free
            del position
            scores = torch.matmul(content_q, k.transpose(-1, -2)).add_(shifted)
            del shifted
            scores = scores.masked_fill_(tables.causal_blocked, float("-inf"))
            if key_offsets is not None:
                scores = scores.masked_fill_(_keys_before(key_offsets, 0, k.shape[2]), float("-inf"))
            if self.lookahead:
                # probs reach the loss only through ``probs @ v`` (a fresh gradient): its backward reuses it
                probs, lse_cur = softmax_with_lse(scores, grad_in_place=True)   # Z_t, [B, H, N]
            else:
                probs = torch.softmax(scores, dim=-1)
            del scores
            vec_cur = torch.matmul(self.dropatt(probs), v)                  # c_t, [B, H, N, d_h]
            if recorded is not None:
                recorded["causal"] = probs.detach()
            del probs                                                       # (autograd's copy, when kept)
        if not self.lookahead:
            return vec_cur, None, None

        # ---- look-ahead attention of the memory rows + interpolation ---------------------------------
        if M == 0:
            return vec_cur, vec_cur, lse_cur
        with torch.set_grad_enabled(torch.is_grad_enabled() and not cache_only_memory):
            vec_mem, lse_prev = self._lookahead(q_mem, k, v, tables.lookahead, r_table, biases,
                                                cached_vectors, cached_lse, recorded, fused, key_offsets)
        return vec_cur, torch.cat([vec_mem, vec_cur], dim=2), torch.cat([lse_prev, lse_cur], dim=2)

    def _lookahead(self, q_mem, k, v, plan, r_table, biases, cached_vectors, cached_lse, recorded, fused,
                   key_offsets):
        # Window keys a batch row does not have are masked. A real memory row never reaches one (its window is
        # strictly to its right, and the rows a batch row lacks are its oldest) except in variant 33; the rows it
        # lacks get finite junk (key p = M, the first current token, is always there) that nothing real reads.
        k_win, v_win = k[:, :, plan.start:plan.end], v[:, :, plan.start:plan.end]
        content_bias = biases.future_content if biases.future_content is not None else biases.content
        position_bias = biases.future_position if variant_traits(self.variant).future_position_bias else biases.position
        content_q = (q_mem + content_bias[:, None]) * self.scale
        position = lookahead_position_scores((q_mem + position_bias[:, None]) * self.scale, r_table, plan)
        if fused:
            from .fused_attention import lookahead_attention     # imported here: see causal_attention above
            vec_new, lse_new = lookahead_attention(content_q, k_win, v_win, position, plan, key_offsets)
        else:
            scores = torch.matmul(content_q, k_win.transpose(-1, -2)).add_(position)       # [B, H, M, W]
            del position                                      # (as in the causal part: two [B, H, M, W] at most)
            if plan.future_blocked is not None:   # 33 (full look-ahead ablation): same window, no future mask
                scores = scores.masked_fill_(plan.future_blocked, float("-inf"))
            if key_offsets is not None:
                scores = scores.masked_fill_(_keys_before(key_offsets, plan.start, plan.end), float("-inf"))
            probs, lse_new = softmax_with_lse(scores, grad_in_place=True)     # Z+, [B, H, M], not detached
            del scores
            vec_new = torch.matmul(self.dropatt(probs), v_win)                # a_i, [B, H, M, d_h]
            if recorded is not None:
                recorded["lookahead"] = probs.detach()
            del probs
        if recorded is not None:
            recorded["lookahead_window"] = (plan.start, plan.end)

        # Interpolation in float32 (docs/method.md §4, step 4): one softmax over the union of old and new keys.
        stat = lse_new.dtype
        old_vec = cached_vectors.transpose(1, 2).to(stat)                     # [B, H, M, d_h]
        old_lse = cached_lse.transpose(1, 2).to(stat)                         # [B, H, M]
        top = torch.maximum(old_lse, lse_new)
        w_old, w_new = torch.exp(old_lse - top), torch.exp(lse_new - top)
        alpha = (w_old / (w_old + w_new + INTERPOLATION_EPS)).unsqueeze(-1)
        mixed = alpha * old_vec + (1 - alpha) * vec_new.to(stat)
        mixed = torch.nan_to_num(mixed.to(vec_new.dtype))
        return mixed, torch.logaddexp(old_lse, lse_new)

    def _project(self, vectors: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = vectors.shape
        flat = vectors.transpose(1, 2).reshape(b, t, self.n_local_heads * self.d_head)
        out = self.drop(self.o_proj(flat))
        return residual + out if self.pre_lnorm else self.norm(residual + out)


def _keys_before(key_offsets: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[B, 1, 1, end - start] bool: True where key position p in [start, end) lies before the batch row's offset
    (a memory row that row does not have)."""
    keys = torch.arange(start, end, device=key_offsets.device)
    return (keys[None, :] < key_offsets[:, None])[:, None, None, :]
