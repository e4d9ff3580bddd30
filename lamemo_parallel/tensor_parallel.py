"""Tensor parallelism with megatron-core: the same LaMemo model, heads and vocabulary split across TP ranks.

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)   # after init_process_group
    torch.manual_seed(seed)                            # the same seed on every rank of a TP group
    model = TensorParallelLaMemoModel.from_full_state_dict(config, full_sd)   # or TensorParallelLaMemoModel(config)
    out = model(tokens, targets=targets, memory=memory)   # out.nll: [B, N], the same on every TP rank
    out.loss.backward() ... optimizer.step()           # no gradient sync across TP ranks is needed
    full_sd = model.full_state_dict()                 # collective: the single-device layout, on every rank

What is split (megatron semantics, Megatron-LM's names in brackets):

* q/k/v/r projections and FFN ``fc1`` are ``ColumnParallelLinear`` (gather_output=False): this rank's heads /
  inner units. ``o_proj`` and ``fc2`` are ``RowParallelLinear`` (input_is_parallel=True); ``fc2``'s bias is
  added once, after the all-reduce.
* The cached C-bar / Z-bar hold this rank's heads only (no communication); embeddings and XL hidden states
  are replicated.
* The input embedding is a ``VocabParallelEmbedding``; the tied output layer computes logits against the
  local vocabulary shard plus the local shard of the output bias, and the loss is
  ``vocab_parallel_cross_entropy``. A vocabulary not divisible by the TP size is padded internally with rows
  whose logits are forced to -inf, so padding never changes the model (the state dicts stay unpadded).
* The global biases u, v (and v+, u+) are **sharded parameters** [H / tp, d_h], like the heads they serve.
  The alternative (full-size replicated parameters of which each rank uses a slice) would need a sum of
  gradients across TP ranks after every backward, which a trainer must remember to call and which DeepSpeed's
  pipeline engine gives no place for; sharded, their gradients are complete locally, the optimizer state is
  sharded with them, and the state-dict conversion slices / gathers them like any column weight.
* Everything else (LayerNorms, ``fc2``'s bias) is replicated; its gradient is already identical on every TP
  rank because every gradient entering a replicated region has been all-reduced (megatron's f / g
  operators). Sharded parameters carry megatron's ``tensor_model_parallel`` / ``partition_dim`` attributes,
  which megatron's and DeepSpeed's gradient-norm code use to count replicated parameters once.

Dropout: the attention-probability dropout (local heads) and the FFN dropout after ``fc1`` (local units) are
``rng.SplitDropout`` (different, reproducible masks per TP rank); every other dropout acts on replicated
tensors and uses torch's default generator, seeded identically on all TP ranks. See ``rng.py``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                           copy_to_tensor_model_parallel_region, vocab_parallel_cross_entropy)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from safetensors import safe_open
from torch import nn

from .attention import GlobalBiases, statistics_dtype
from .config import ConfigError, LaMemoConfig
from .memory import LaMemoMemory
from .model import LaMemoModel
from .model_files import CONFIG_NAME, WEIGHTS_NAME, check_state_dict
from .rng import SplitDropout
from .sharding import VOCAB_PARALLEL, merge, padded_vocab_size, shard, sharding_table  # noqa: F401 (re-exported)



def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    return tensor    # megatron wants an init_method; ours come from a full state dict (perform_initialization=False)


def _mark_split(param: torch.Tensor, dim: int) -> None:
    """Megatron's TP attributes (megatron sets them itself only when it initialises the weight)."""
    if not getattr(param, "tensor_model_parallel", False):
        set_tensor_model_parallel_attributes(param, True, dim, 1)


def is_split(param: torch.Tensor) -> bool:
    """True for a parameter of which each TP rank holds a slice; False for a replicated one."""
    return bool(getattr(param, "tensor_model_parallel", False))


def check_tensor_parallel_config(config: LaMemoConfig, tp_size: int) -> None:
    """Raise ``ConfigError`` if ``config`` cannot be split over ``tp_size`` ranks (no process group needed)."""
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"tensor-parallel size must be a positive integer, got {tp_size!r}")
    if config.n_head % tp_size:
        raise ConfigError(f"n_head={config.n_head} is not divisible by the tensor-parallel size {tp_size}: "
                          f"each TP rank must own whole attention heads")
    if config.d_inner % tp_size:
        raise ConfigError(f"d_inner={config.d_inner} is not divisible by the tensor-parallel size {tp_size}")


# ---------------------------------------------------------------------------------------------- linears
class _TensorOnly:
    """Megatron linears return (output, bias); ours return a tensor and keep no ``_extra_state`` key, so a TP
    rank's state dict has exactly the single-device names (with local shapes)."""

    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def _drop_extra_state_hook(self) -> None:
        # megatron registers a load pre-hook inserting '<prefix>_extra_state' (kept for Transformer Engine).
        self._load_state_dict_pre_hooks.clear()


class ColumnLinear(_TensorOnly, ColumnParallelLinear):
    """Y_local = X W_local^T + b_local: this rank's output features; the input's gradient is all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, config: ModelParallelConfig,
                 tp_group):
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                         gather_output=False, skip_bias_add=False, tp_group=tp_group)
        self._drop_extra_state_hook()
        _mark_split(self.weight, 0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() > 3:     # megatron's weight-gradient code expects 2-D or 3-D inputs
            return self.forward(input.flatten(0, -3)).unflatten(0, input.shape[:-2])
        return super().forward(input)[0]


class RowLinear(_TensorOnly, RowParallelLinear):
    """Y = all_reduce(X_local W_local^T) + b: the bias (replicated) is added once, after the reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, config: ModelParallelConfig,
                 tp_group):
        super().__init__(in_features, out_features, config=config, init_method=_no_init, bias=bias,
                         input_is_parallel=True, skip_bias_add=True, tp_group=tp_group)
        self._drop_extra_state_hook()
        _mark_split(self.weight, 1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() > 3:
            return self.forward(input.flatten(0, -3)).unflatten(0, input.shape[:-2])
        output, bias = super().forward(input)
        return output if bias is None else output + bias


class MegatronLinears:
    """The linear factory of a tensor-parallel model (see ``linear.PlainLinears`` for the interface)."""

    def __init__(self, tp_group=None, *, params_dtype: torch.dtype = torch.float32):
        if tp_group is None:
            if parallel_state.get_tensor_model_parallel_group(check_initialized=False) is None:
                raise RuntimeError("megatron-core's tensor-parallel group is not initialised: call "
                                   "parallel_state.initialize_model_parallel(tensor_model_parallel_size=...) "
                                   "after torch.distributed.init_process_group, or pass tp_group")
            tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_group = tp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()
        self.config = ModelParallelConfig(tensor_model_parallel_size=self.tp_size, params_dtype=params_dtype,
                                          use_cpu_initialization=True, perform_initialization=False)

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        self.local(out_features)
        return ColumnLinear(in_features, out_features, bias, config=self.config, tp_group=self.tp_group)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        self.local(in_features)
        return RowLinear(in_features, out_features, bias, config=self.config, tp_group=self.tp_group)

    def local(self, size: int) -> int:
        if size % self.tp_size:
            raise ConfigError(f"a split dimension of size {size} is not divisible by the tensor-parallel size "
                              f"{self.tp_size}")
        return size // self.tp_size

    def shard(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous slice along ``dim`` (whole heads for [H, ...] or [H * d_h, ...] tensors)."""
        size = self.local(tensor.shape[dim])
        return tensor.narrow(dim, self.tp_rank * size, size)


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


# ---------------------------------------------------------------------------------------------- model
class TensorParallelLaMemoModel(LaMemoModel):
    """``LaMemoModel`` with heads, FFN units and vocabulary split across a megatron-core TP group.

    ``TensorParallelLaMemoModel(config)`` draws the same initial weights as ``LaMemoModel(config)`` would
    from the same RNG state (seed every TP rank identically); ``initialize=False`` skips that (zeros) when a
    state dict is loaded next. Outputs (nll, logits, hidden) are identical on every TP rank; the memory holds
    the local heads (``gather_memory`` / ``shard_memory`` convert).
    """

    def __init__(self, config: LaMemoConfig, *, tp_group=None, params_dtype: torch.dtype = torch.float32,
                 initialize: bool = True, init_seed: int | None = None):
        linears = MegatronLinears(tp_group, params_dtype=torch.float32)
        check_tensor_parallel_config(config, linears.tp_size)
        if parallel_state.get_tensor_model_parallel_group(check_initialized=False) is not linears.tp_group:
            raise ValueError("vocab_parallel_cross_entropy reduces over megatron-core's global tensor-parallel "
                             "group: tp_group must be parallel_state.get_tensor_model_parallel_group()")
        #: Where every parameter lives (the single-device names, split dims, vocabulary padding).
        self.sharding = sharding_table(config, linears.tp_size)
        self.padded_vocab_size = padded_vocab_size(config.vocab_size, linears.tp_size)
        # The base constructor builds this rank's shards only (see _vocabulary_parameters / _global_bias)
        # and initialises each from its own seed: the slice of the single-device model's tensor.
        super().__init__(config, linears, init_seed=init_seed, initialize=initialize)
        tp, rank = linears.tp_size, linears.tp_rank
        for name, param in self.named_parameters():     # megatron's attributes, from the table
            if self.sharding[name].split_dim is not None:
                _mark_split(param, self.sharding[name].split_dim)
        local_vocab = self.padded_vocab_size // tp
        first = rank * local_vocab
        padding = torch.arange(first, first + local_vocab) >= config.vocab_size
        self.register_buffer("vocab_padding", padding, persistent=False)
        for layer in self.layers:          # the dropouts of split regions
            layer.attn.dropatt = SplitDropout(config.dropatt, rank)
            layer.ff.drop_inner = SplitDropout(config.dropout, rank)
        if params_dtype != torch.float32:
            self.to(dtype=params_dtype)

    def _vocabulary_parameters(self) -> tuple[nn.Module, nn.Parameter]:
        """This rank's rows of the (padded) vocabulary: a ``VocabParallelEmbedding`` and the output bias shard."""
        embedding = VocabParallelEmbedding(self.padded_vocab_size, self.config.d_model, init_method=_no_init,
                                           config=self.linears.config, tp_group=self.linears.tp_group)
        return embedding, nn.Parameter(torch.zeros(self.padded_vocab_size // self.linears.tp_size))

    @property
    def tp_group(self):
        return self.linears.tp_group

    @property
    def tp_size(self) -> int:
        return self.linears.tp_size

    @property
    def tp_rank(self) -> int:
        return self.linears.tp_rank

    # ------------------------------------------------------------------ overridden pieces
    def global_biases(self) -> GlobalBiases:
        return GlobalBiases(content=self.content_bias, position=self.position_bias,
                            future_position=self.future_position_bias, future_content=self.future_content_bias)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of this rank's vocabulary shard, [B, N, V_padded / tp] (padding columns are -inf)."""
        hidden = copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)   # all-reduce its gradient
        logits = F.linear(hidden, self.embedding.weight, self.output_bias)
        return logits.masked_fill(self.vocab_padding, float("-inf"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [B, N, V], gathered over the TP group (for evaluation and generation)."""
        full = _GatherLastDim.apply(self.local_logits(hidden), self.tp_group)
        return full[..., :self.config.vocab_size]

    def token_nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.local_logits(hidden).to(statistics_dtype(hidden.dtype))
        # megatron's loss works in place on (a float32 copy of) the logits and upcasts to float32.
        return vocab_parallel_cross_entropy(logits, targets)

    # ------------------------------------------------------------------ layouts
    def to_local_layout(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of tensors in the single-device layout (weights, gradients, optimizer moments)."""
        return {name: shard(self.sharding[name], tensor, self.tp_rank, self.tp_size) for name, tensor in full.items()}

    def to_full_layout(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Collective over the TP group: tensors of this rank's layout gathered into the single-device layout.
        Every rank must call it with the same names in the same order. Replicated tensors are returned as
        this rank holds them."""
        full = {}
        for name, tensor in local.items():
            entry = self.sharding[name]
            if entry.split_dim is not None:
                parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
                dist.all_gather(parts, tensor.contiguous(), group=self.tp_group)
                tensor = merge(entry, parts)
            full[name] = tensor
        return full

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the single-device state dict (``LaMemoModel.state_dict()`` layout), on every rank."""
        return self.to_full_layout({name: t.detach() for name, t in self.state_dict().items()})

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load this rank's shards of a single-device state dict, with a message naming every missing,
        unexpected or mis-shaped tensor. No communication."""
        check_state_dict(state_dict, {name: entry.shape for name, entry in self.sharding.items()})
        self.load_state_dict(self.to_local_layout(state_dict), strict=True)

    load_weights = load_full_state_dict   # LaMemoModel's name for 'load the single-device layout'

    @classmethod
    def from_full_state_dict(cls, config: LaMemoConfig, state_dict: dict[str, torch.Tensor],
                             **kwargs) -> "TensorParallelLaMemoModel":
        model = cls(config, initialize=False, **kwargs)
        model.load_full_state_dict(state_dict)
        return model

    # ------------------------------------------------------------------ memory
    def gather_memory(self, memory: LaMemoMemory) -> LaMemoMemory:
        """Collective: C-bar / Z-bar gathered over heads (the single-device memory); the rest is replicated."""
        def heads(t):
            parts = [torch.empty_like(t) for _ in range(self.tp_size)]
            dist.all_gather(parts, t.contiguous(), group=self.tp_group)
            return torch.cat(parts, dim=2)

        return LaMemoMemory(embeddings=memory.embeddings, vectors=[heads(t) for t in memory.vectors],
                            log_normalizers=[heads(t) for t in memory.log_normalizers], hidden=list(memory.hidden))

    def shard_memory(self, memory: LaMemoMemory) -> LaMemoMemory:
        """This rank's heads of a single-device memory (no communication)."""
        return LaMemoMemory(embeddings=memory.embeddings,
                            vectors=[self.linears.shard(t, 2) for t in memory.vectors],
                            log_normalizers=[self.linears.shard(t, 2) for t in memory.log_normalizers],
                            hidden=list(memory.hidden))

    # ------------------------------------------------------------------ persistence (single-device format)
    # There is deliberately no save_pretrained: writing the single-device format from a live TP model would
    # gather the whole model onto one rank. Trained models are exported offline from the checkpoint's shards
    # (pretrain/checkpoint/export.py, tensor by tensor through the sharding table).
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None,
                        tp_group=None) -> "TensorParallelLaMemoModel":
        path = Path(path)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not a LaMemo model directory: it needs {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}")
        model = cls(LaMemoConfig.load(path / CONFIG_NAME), initialize=False, tp_group=tp_group)
        # one full tensor at a time: read it, keep this rank's slice (the whole model is never in memory)
        with safe_open(str(path / WEIGHTS_NAME), framework="pt", device="cpu") as weights:
            names = list(weights.keys())
            check_state_dict({n: torch.empty(weights.get_slice(n).get_shape(), device="meta") for n in names},
                             {name: entry.shape for name, entry in model.sharding.items()})
            model.load_state_dict({n: model.to_local_layout({n: weights.get_tensor(n)})[n].clone() for n in names},
                                  strict=True)
        model.eval()
        return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model
