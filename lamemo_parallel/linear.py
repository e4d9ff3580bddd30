"""Where the model gets its linear layers: plain torch on one device, megatron-core when tensor-parallel.

The layers are written once against this small interface; a tensor-parallel run passes a factory whose
``column`` layers return this rank's slice of the output features (the heads it owns) and whose ``row``
layers take that slice as input and all-reduce their output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PlainLinears:
    """Single-device linears: tensor-parallel size 1, rank 0."""

    tp_size: int = 1
    tp_rank: int = 0

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def local(self, size: int) -> int:
        """Number of features of a split dimension of ``size`` held by this rank."""
        return size

    def shard(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's slice of a full tensor along ``dim`` (identity here)."""
        return tensor
