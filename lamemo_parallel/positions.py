"""Relative positions: sinusoids, the look-ahead window and the index tables of one step shape (docs/method.md §2-§5).

Everything here is index bookkeeping; the learned parts (W_R, the biases) live in the attention module. The
tables depend only on (M, N, variant, device), so they are built once per shape and cached (``step_tables``),
not once per layer per step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import ConfigError, LaMemoConfig, variant_traits


@dataclass
class PositionEncodings:
    """Sinusoids of one step, shared by every layer (dropout already applied once), each [rows, d].

    ``causal`` holds distances T-1, ..., 0 (row r = distance T-1-r). ``lookahead`` is the table the memory
    queries score against, in the order of ``positions.lookahead_table_distances``: distances 1..M (variants
    3 / 32), -1..-M (31), or M-1..0 followed by 1..M (33).
    """

    causal: torch.Tensor
    lookahead: torch.Tensor | None
    variant: int


def position_encodings(config: LaMemoConfig, mem_len: int, seg_len: int, inv_freq: torch.Tensor, dtype,
                       dropout) -> PositionEncodings:
    """The sinusoids of one step: causal distances T-1..0 and the look-ahead table, with ``dropout`` (a
    function of the whole table) applied once to all of them together: one mask shared by every layer."""
    T = mem_len + seg_len
    device = inv_freq.device
    distances = [torch.arange(T - 1, -1, -1.0, device=device)]
    n_ahead = 0
    if config.traits.looks_ahead and mem_len > 0:
        if config.traits.full_look_ahead and mem_len < seg_len:
            raise ConfigError(f"variant {config.variant} (full look-ahead) needs mem_len >= tgt_len once memory "
                              f"is non-empty; got M={mem_len} < N={seg_len}")
        ahead = lookahead_table_distances(mem_len, config.variant, device=device)
        distances.append(ahead)
        n_ahead = ahead.numel()
    table = dropout(sinusoid(clamp_distances(torch.cat(distances), config.clamp_len), inv_freq).to(dtype))
    return PositionEncodings(causal=table[:T], lookahead=table[T:] if n_ahead else None, variant=config.variant)


def inverse_frequencies(d_model: int) -> torch.Tensor:
    """omega_k = 10000^(-2(k-1)/d) for k = 1..d/2 (the release's ``pos_emb.inv_freq`` buffer)."""
    return 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))


def sinusoid(distances: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """phi(delta) = [sin(delta * omega), cos(delta * omega)], the two halves concatenated: [n, d], computed in
    float32 at least (cast the result to the activation dtype afterwards)."""
    dtype = torch.promote_types(inv_freq.dtype, torch.float32)
    angles = torch.outer(distances.to(dtype), inv_freq.to(dtype))
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


def lookahead_table_distances(mem_len: int, variant: int, device=None) -> torch.Tensor:
    """The distances of the look-ahead table, in its row order: 1..M (variants 3 / 32), -1..-M (31), or
    M-1..0 followed by 1..M (33, the magnitudes of the signed distances)."""
    traits = variant_traits(variant)
    future = torch.arange(1, mem_len + 1, dtype=torch.float32, device=device)
    if traits.full_look_ahead:
        return torch.cat([torch.arange(mem_len - 1, -1, -1, dtype=torch.float32, device=device), future])
    return -future if traits.negative_future_distances else future


def lookahead_table_row(delta: torch.Tensor, mem_len: int, variant: int) -> torch.Tensor:
    """Which row of the look-ahead table holds signed distance ``delta = p - i`` (-1 where none does)."""
    full = variant_traits(variant).full_look_ahead
    row = delta + (mem_len - 1) if full else delta - 1
    size = 2 * mem_len if full else mem_len
    return torch.where((row >= 0) & (row < size), row, torch.full_like(row, -1))


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


# ---------------------------------------------------------------------------------------------- banded look-ahead
def band_shift(scores: torch.Tensor, width: int) -> torch.Tensor:
    """``scores[..., r, u]`` for the rows of a block of ``bs`` rows against ``width + bs - 1`` consecutive
    table rows -> ``out[..., r, w] = scores[..., r, (bs - 1 - r) + w]``: row r's ``width`` entries, each row
    shifted one table row further than the next. Views and one reshape, no gather."""
    *lead, bs, length = scores.shape
    if length != width + bs - 1:
        raise ValueError(f"band_shift needs {width + bs - 1} table rows per block, got {length}")
    if bs == 1:
        return scores
    flat = scores.reshape(*lead, bs * length)[..., bs - 1: bs - 1 + bs * (length - 1)]
    return flat.reshape(*lead, bs, length - 1)[..., :width]


@dataclass(frozen=True)
class LookaheadPlan:
    """How the memory rows' look-ahead scores are laid out for one (M, N, variant) on one device.

    Memory row i scores the window keys p = start..end-1 against table rows ``lookahead_table_row(p - i)``.
    Those rows slide by one per memory row. With a short memory (M <= N, variants 3 / 31 / 32) the window is
    keys 1..M and row i needs table rows 0..M-1-i: every row is scored against the whole M-row table and
    ``future_shift`` moves row i left by i (what falls off is exactly the masked p <= i). Otherwise the rows are
    taken in blocks of ``block``: a block scores ``width + block - 1`` consecutive table rows (``table_index``,
    into the projected table with a zero row prepended, 0 = no such distance) and ``band_shift`` turns that
    into each row's ``width`` entries. Either way the cost is O(M N), not O(M^2).
    """

    mem_len: int
    start: int
    end: int
    block: int
    table_index: torch.Tensor | None   # [n_blocks, width + block - 1] long; None for the whole-table shift
    future_blocked: torch.Tensor | None   # [M, width] bool, True = masked (p <= i); None for variant 33

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def n_blocks(self) -> int:
        return 1 if self.table_index is None else self.table_index.shape[0]

    @property
    def whole_table(self) -> bool:
        """Short memory: every row against the whole table, then ``future_shift``."""
        return self.table_index is None


def future_shift(scores: torch.Tensor) -> torch.Tensor:
    """``scores[..., i, k]`` of M rows against an M-row table -> ``out[..., i, w] = scores[..., i, w - i]`` for
    w >= i (junk for w < i, to be masked): the release's ``_rel_shift_future``, a pad and a reshape."""
    *lead, rows, length = scores.shape
    padded = torch.nn.functional.pad(scores, (0, 1)).reshape(*lead, rows * (length + 1))
    return padded[..., :rows * length].reshape(*lead, rows, length)


@dataclass(frozen=True)
class StepTables:
    """Every mask and index table of one step shape, built once and shared by every layer and step."""

    causal_mask: torch.Tensor          # [N, M+N] bool, True = allowed
    causal_blocked: torch.Tensor       # its complement (what masked_fill wants)
    lookahead: LookaheadPlan | None    # None without memory or for Transformer-XL


@functools.lru_cache(maxsize=128)
def step_tables(mem_len: int, seg_len: int, variant: int, device: torch.device) -> StepTables:
    """The cached tables of one (M, N, variant, device). Callers must not modify them."""
    mask = causal_mask(seg_len, mem_len, device=device)
    plan = None
    traits = variant_traits(variant)
    if traits.looks_ahead and mem_len > 0:
        start, end = lookahead_window(mem_len, seg_len)
        width = end - start
        if not traits.full_look_ahead and mem_len <= seg_len:
            block, table_index = mem_len, None
        else:
            block = width         # a block scores at most 2 x width - 1 table rows per row
            n_blocks = -(-mem_len // block)
            rows = torch.arange(n_blocks)[:, None] * block + (block - 1)       # the last row of each block
            local = torch.arange(width + block - 1)[None, :]
            # band_shift gives row r of block j its local u = (block - 1 - r) + w, i.e. key p = start + w =
            # start + u - (block - 1) + r: the distance p - i (i = j*block + r) does not depend on r.
            delta = start + local - rows
            table_index = (lookahead_table_row(delta, mem_len, variant) + 1).to(device)
        blocked = None if traits.full_look_ahead else ~lookahead_future_mask(mem_len, start, end, device=device)
        plan = LookaheadPlan(mem_len=mem_len, start=start, end=end, block=block, table_index=table_index,
                             future_blocked=blocked)
    return StepTables(causal_mask=mask, causal_blocked=~mask, lookahead=plan)


def lookahead_position_scores(queries: torch.Tensor, table: torch.Tensor, plan: LookaheadPlan) -> torch.Tensor:
    """Position scores of the memory rows against their window: ``out[b, h, i, w] = queries[b, h, i] .
    table[lookahead_table_row(start + w - i)]`` (0 where the table has no such distance; those entries are
    masked by the caller). queries [B, H, M, d_h], table [K, H, d_h] -> [B, H, M, W]."""
    B, H, M, dh = queries.shape
    if plan.whole_table:
        return future_shift(torch.matmul(queries, table.permute(1, 2, 0)))        # [B, H, M, M]
    bs, nb = plan.block, plan.n_blocks
    padded_table = torch.nn.functional.pad(table, (0, 0, 0, 0, 1, 0))          # row 0: "no such distance"
    slices = padded_table[plan.table_index]                                    # [nb, L, H, dh]
    if nb * bs != M:
        queries = torch.nn.functional.pad(queries, (0, 0, 0, nb * bs - M))
    blocks = queries.reshape(B, H, nb, bs, dh)
    scores = torch.einsum("bhjrd,jlhd->bhjrl", blocks, slices)                # [B, H, nb, bs, L]
    band = band_shift(scores, plan.width)                                      # [B, H, nb, bs, W]
    return band.reshape(B, H, nb * bs, plan.width)[:, :, :M]
