"""Relative positions: sinusoids, the look-ahead window and the distance tables (docs/method.md §2-§5).

Everything here is index bookkeeping; the learned parts (W_R, the biases) live in the attention module.
"""
from __future__ import annotations

import torch


def inverse_frequencies(d_model: int) -> torch.Tensor:
    """omega_k = 10000^(-2(k-1)/d) for k = 1..d/2 (the release's ``pos_emb.inv_freq`` buffer)."""
    return 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))


def sinusoid(distances: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """phi(delta) = [sin(delta * omega), cos(delta * omega)], the two halves concatenated: [n, d]."""
    angles = torch.outer(distances.to(inv_freq.dtype), inv_freq)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def clamp_distances(distances: torch.Tensor, clamp_len: int) -> torch.Tensor:
    """Clamp distances to at most ``clamp_len`` (future ones too); negative ones are left alone, as in the release."""
    return distances.clamp(max=clamp_len) if clamp_len > 0 else distances


def lookahead_window(mem_len: int, seg_len: int) -> tuple[int, int]:
    """Key positions [start, end) that memory rows may attend to in the look-ahead step.

    Positions of a step are 0..M-1 (memory) and M..M+N-1 (current). The window is the last N-1 tokens of
    the previous segment plus the first current token: max(1, M-N+1) <= p <= M, so that with a constant N
    consecutive windows tile the text and each memory state sees every token to its right exactly once.
    """
    if mem_len <= 0:
        raise ValueError("the look-ahead window needs a non-empty memory")
    return max(1, mem_len - seg_len + 1), mem_len + 1


def lookahead_future_mask(mem_len: int, start: int, end: int, device=None) -> torch.Tensor:
    """Boolean [M, W]: True where memory row i may attend key p (strictly to its right: p > i)."""
    rows = torch.arange(mem_len, device=device)[:, None]
    keys = torch.arange(start, end, device=device)[None, :]
    return keys > rows


def lookahead_distances(mem_len: int, start: int, end: int, device=None) -> torch.Tensor:
    """Signed distances p - i for memory row i and window key p: [M, W] (positive = key in the future)."""
    rows = torch.arange(mem_len, device=device)[:, None]
    keys = torch.arange(start, end, device=device)[None, :]
    return keys - rows


def causal_mask(seg_len: int, mem_len: int, device=None) -> torch.Tensor:
    """Boolean [N, M+N]: True where current row t (absolute index M+t) may attend key j (j <= M+t)."""
    rows = torch.arange(seg_len, device=device)[:, None] + mem_len
    keys = torch.arange(mem_len + seg_len, device=device)[None, :]
    return keys <= rows


def relative_shift(scores: torch.Tensor) -> torch.Tensor:
    """Turn scores against a distance table into scores against keys (Transformer-XL, appendix B).

    ``scores[..., i, r]`` holds the score of query row i against the distance stored in row r of a table
    ordered K-1, K-2, ..., 0 (K = number of keys, the queries being the last rows of the keys). The result
    ``out[..., i, j]`` is the score for distance (K - Q + i) - j for every j <= K - Q + i; entries with
    j > K - Q + i are junk and must be masked by the caller. The trick is a pad and a reshape: no gather.
    """
    *lead, q_len, k_len = scores.shape
    padded = torch.nn.functional.pad(scores, (1, 0))
    padded = padded.reshape(*lead, k_len + 1, q_len)
    return padded[..., 1:, :].reshape(*lead, q_len, k_len)
