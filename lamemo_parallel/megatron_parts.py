"""The megatron-core implementation of a model's parallel parts (the interface: ``linear.PlainParts``).

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)   # after init_process_group
    parts = MegatronParts()                  # megatron-core's tensor-parallel group
    LaMemoModel(config, parts)               # or LaMemoPipelineModule(config, ..., parallel=parts)

What is split (megatron semantics):

* q/k/v/r projections and FFN ``fc1`` are ``ColumnParallelLinear`` (gather_output=False): this rank's heads /
  inner units. ``o_proj`` and ``fc2`` are ``RowParallelLinear`` (input_is_parallel=True); ``fc2``'s bias is
  added once, after the all-reduce.
* The input embedding is a ``VocabParallelEmbedding``; the tied output layer computes logits against the
  local vocabulary shard plus the local shard of the output bias (the hidden state enters that region
  through megatron's ``copy_to_tensor_model_parallel_region``: its gradient is all-reduced), and the loss is
  ``vocab_parallel_cross_entropy``. A vocabulary not divisible by the TP size is padded internally with rows
  whose logits are forced to -inf, so padding never changes the model (state dicts stay unpadded).
* Split-region dropouts are ``rng.SplitDropout`` (different, reproducible masks per TP rank).
* Sharded parameters carry megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes, which
  megatron's and DeepSpeed's gradient-norm code use to count replicated parameters once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from torch import nn

from .config import ConfigError
from .linear import PlainParts
from .rng import SplitDropout
from .sharding import ParamShard, merge, padded_vocab_size


def no_init(tensor: torch.Tensor) -> torch.Tensor:
    """Megatron wants an init_method; ours come from the per-tensor seeds (``init.py``) or a state dict."""
    return tensor


def mark_split(param: torch.Tensor, dim: int) -> None:
    """Megatron's TP attributes (megatron sets them itself only when it initialises the weight)."""
    if not getattr(param, "tensor_model_parallel", False):
        set_tensor_model_parallel_attributes(param, True, dim, 1)


def is_split(param: torch.Tensor) -> bool:
    """True for a parameter of which each TP rank holds a slice; False for a replicated one."""
    return bool(getattr(param, "tensor_model_parallel", False))


# ---------------------------------------------------------------------------------------------- linears
class _TensorOnly:
    """Megatron linears return (output, bias); ours return a tensor and keep no ``_extra_state`` key, so a TP
    rank's state dict has exactly the single-device names (with local shapes)."""

    split_dim: int          # the weight's dimension split over TP ranks
    options: dict           # megatron's keyword arguments for this kind of linear

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, in_features: int, out_features: int, bias: bool, *, config: ModelParallelConfig, tp_group):
        super().__init__(in_features, out_features, config=config, init_method=no_init, bias=bias,
                         tp_group=tp_group, **self.options)
        # megatron registers a load pre-hook inserting '<prefix>_extra_state' (kept for Transformer Engine).
        self._load_state_dict_pre_hooks.clear()
        mark_split(self.weight, self.split_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() > 3:     # megatron's weight-gradient code expects 2-D or 3-D inputs
            return self.forward(input.flatten(0, -3)).unflatten(0, input.shape[:-2])
        output, bias = super().forward(input)
        return output if bias is None else output + bias


class ColumnLinear(_TensorOnly, ColumnParallelLinear):
    """Y_local = X W_local^T + b_local: this rank's output features; the input's gradient is all-reduced."""

    split_dim = 0
    options = dict(gather_output=False, skip_bias_add=False)


class RowLinear(_TensorOnly, RowParallelLinear):
    """Y = all_reduce(X_local W_local^T) + b: the bias (replicated) is added once, after the reduce."""

    split_dim = 1
    options = dict(input_is_parallel=True, skip_bias_add=True)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; backward keeps this rank's slice (megatron's version allocates
    on CUDA, this one on the input's device)."""

    @staticmethod
    def forward(ctx, input, group):
        ctx.group = group
        ctx.width = input.shape[-1]
        parts = [torch.empty_like(input) for _ in range(group.size())]
        dist.all_gather(parts, input.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = ctx.group.rank()
        return grad[..., rank * ctx.width:(rank + 1) * ctx.width].contiguous(), None


# ---------------------------------------------------------------------------------------------- the parts
class MegatronParts(PlainParts):
    """The parts of a model split over megatron-core's tensor-parallel group (``PlainParts`` documents each).

    ``tp_group`` must be megatron's global tensor-parallel group (the default): ``vocab_parallel_cross_entropy``
    reduces over that one."""

    def __init__(self, tp_group=None, *, params_dtype: torch.dtype = torch.float32):
        if parallel_state.get_tensor_model_parallel_group(check_initialized=False) is None:
            raise RuntimeError("megatron-core's tensor-parallel group is not initialised: call "
                               "parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) "
                               "after torch.distributed.init_process_group")
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        if tp_group is not parallel_state.get_tensor_model_parallel_group():
            raise ValueError("vocab_parallel_cross_entropy reduces over megatron-core's global tensor-parallel "
                             "group: tp_group must be parallel_state.get_tensor_model_parallel_group()")
        self.tp_group = tp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, params_dtype=params_dtype,
                                          use_cpu_initialization=True, perform_initialization=False)

    # ------------------------------------------------------------------ layers
    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        self.local(out_features)
        return ColumnLinear(in_features, out_features, bias, config=self.config, tp_group=self.tp_group)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        self.local(in_features)
        return RowLinear(in_features, out_features, bias, config=self.config, tp_group=self.tp_group)

    def split_dropout(self, p: float) -> nn.Module:
        return SplitDropout(p, self.tp_rank)

    def local(self, size: int) -> int:
        if size % self.tp_size:
            raise ConfigError(f"a split dimension of size {size} is not divisible by the tensor-parallel size "
                              f"{self.tp_size}")
        return size // self.tp_size

    def shard(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous slice along ``dim`` (whole heads for [H, ...] or [H * d_h, ...] tensors)."""
        size = self.local(tensor.shape[dim])
        return tensor.narrow(dim, self.tp_rank * size, size)

    # ------------------------------------------------------------------ vocabulary
    def padded_vocab_size(self, vocab_size: int) -> int:
        return padded_vocab_size(vocab_size, self.tp_size)

    def embedding(self, vocab_size: int, d_model: int) -> nn.Module:
        embedding = VocabParallelEmbedding(self.padded_vocab_size(vocab_size), d_model, init_method=no_init,
                                           config=self.config, tp_group=self.tp_group)
        mark_split(embedding.weight, 0)
        return embedding

    def vocab_padding(self, vocab_size: int) -> torch.Tensor:
        local = self.padded_vocab_size(vocab_size) // self.tp_size
        first = self.tp_rank * local
        return torch.arange(first, first + local) >= vocab_size

    def vocab_logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     padding: torch.Tensor | None) -> torch.Tensor:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)   # all-reduce its gradient
        return super().vocab_logits(hidden, weight, bias, padding)

    def full_logits(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        return _GatherLastDim.apply(local_logits, self.tp_group)[..., :vocab_size]

    def token_nll(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # megatron's loss works in place on (a float32 copy of) the logits and upcasts to float32.
        return vocab_parallel_cross_entropy(local_logits, targets)

    # ------------------------------------------------------------------ layouts
    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
        return parts

    def gather_heads(self, tensor: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return torch.cat(self._all_gather(tensor), dim=dim)

    def to_full(self, entry: ParamShard, local: torch.Tensor) -> torch.Tensor:
        return local if entry.split_dim is None else merge(entry, self._all_gather(local))

    def mark_split(self, params: dict[str, torch.Tensor], table: dict[str, ParamShard]) -> None:
        for name, param in params.items():
            if table[name].split_dim is not None:
                mark_split(param, table[name].split_dim)
