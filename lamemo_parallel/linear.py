"""How a layer's pieces are made for a parallel layout: the one interface every model is built against.

The single-device model, the tensor-parallel model and every pipeline stage ask a *parts* object for the
pieces that differ between layouts, and are otherwise the same code:

* ``column`` / ``row`` linears (a tensor-parallel ``column`` returns this rank's output features, the heads
  or inner units it owns; a ``row`` takes that slice and all-reduces its output);
* ``embedding`` and ``output_bias``: the vocabulary-parallel input embedding and this rank's slice of the
  output bias (the vocabulary padded to a multiple of the TP size); ``vocab_padding``: which local logits are
  padding (forced to -inf);
* ``vocab_logits`` / ``full_logits`` / ``token_nll``: this rank's logits, the gathered full logits, and the
  (vocabulary-parallel) loss;
* ``split_dropout``: dropout of a region split over TP ranks (a different, reproducible mask per rank);
* ``gather_heads``: a per-head tensor gathered over the TP group (the memory's C-bar / Z-bar);
* ``to_local`` / ``to_full``: a tensor of the single-device layout to this rank's slice and back;
* ``mark_split``: megatron's attributes on the parameters the sharding table splits.

``PlainParts`` (here) is the single-device implementation and imports only torch and this package's
single-device files (the transformers export copies them). The megatron-core implementation is
``megatron_parts.MegatronParts``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .sharding import ParamShard, shard


@dataclass
class PlainParts:
    """Single-device parts: tensor-parallel size 1, rank 0, no process group."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group = None

    # ------------------------------------------------------------------ layers
    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def split_dropout(self, p: float) -> nn.Module:
        """Dropout of a region each TP rank holds a slice of (attention probabilities, FFN inner units)."""
        return nn.Dropout(p)

    def local(self, size: int) -> int:
        """Number of features of a split dimension of ``size`` held by this rank."""
        return size

    def shard(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's slice of a full tensor along ``dim`` (identity here)."""
        return tensor

    # ------------------------------------------------------------------ vocabulary
    def padded_vocab_size(self, vocab_size: int) -> int:
        return vocab_size

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        """The input embedding (its weight is tied to the output layer)."""
        return nn.Embedding(vocab_size, d_model)

    def output_bias(self, vocab_size: int) -> nn.Parameter:
        """This rank's slice of the output bias (zeros)."""
        return nn.Parameter(torch.zeros(self.padded_vocab_size(vocab_size) // self.tp_size))

    def vocab_padding(self, vocab_size: int) -> torch.Tensor | None:
        """Which of this rank's vocabulary rows are padding (a bool mask), or None when there is none."""
        return None

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     padding: torch.Tensor | None) -> torch.Tensor:
        """Logits of this rank's vocabulary rows (``padding`` rows are -inf)."""
        logits = F.linear(hidden, weight, bias)
        return logits if padding is None else logits.masked_fill(padding, float("-inf"))

    def full_logits(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The logits of the whole (unpadded) vocabulary from this rank's."""
        return local_logits

    def token_nll(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood [B, N] from this rank's logits [B, N, V_local]."""
        return F.cross_entropy(local_logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    # ------------------------------------------------------------------ layouts
    def gather_heads(self, tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The full tensor of a per-head tensor split along ``dim`` (collective over the TP group)."""
        return tensor

    def to_local(self, entry: ParamShard, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a tensor of the single-device layout (weights, gradients, optimizer moments)."""
        return shard(entry, full, self.tp_rank, self.tp_size)

    def to_full(self, entry: ParamShard, local: torch.Tensor) -> torch.Tensor:
        """The single-device tensor from this rank's slice (collective over the TP group when split)."""
        return local

    def mark_split(self, params: dict[str, torch.Tensor], table: dict[str, ParamShard]) -> None:
        """Tag the parameters ``table`` splits (megatron's gradient-norm code counts replicated ones once)."""
