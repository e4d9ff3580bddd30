"""Tensor parallelism with megatron-core: the same LaMemo model, heads and vocabulary split across TP ranks.

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)   # after init_process_group
    torch.manual_seed(seed)                            # the same seed on every rank of a TP group
    model = TensorParallelLaMemoModel.from_full_state_dict(config, full_sd)   # or TensorParallelLaMemoModel(config)
    out = model(tokens, targets=targets, memory=memory)   # out.nll: [B, N], the same on every TP rank
    out.loss.backward() ... optimizer.step()           # no gradient sync across TP ranks is needed
    full_sd = model.full_state_dict()                 # collective: the single-device layout, on every rank

The model is ``LaMemoModel`` built from ``megatron_parts.MegatronParts`` (column / row linears, the
vocabulary-parallel embedding and loss, split dropouts, the layout conversions: see that module); this class
adds only what is its own: the megatron process group, and loading a model directory one tensor at a time.

What else is split:

* The cached C-bar / Z-bar hold this rank's heads only (no communication); embeddings and XL hidden states
  are replicated.
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
from safetensors import safe_open

from .config import LaMemoConfig
from .megatron_parts import MegatronParts
from .model import LaMemoModel
from .model_files import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, require_model_dir


class TensorParallelLaMemoModel(LaMemoModel):
    """``LaMemoModel`` with heads, FFN units and vocabulary split across a megatron-core TP group.

    ``TensorParallelLaMemoModel(config)`` draws the same initial weights as ``LaMemoModel(config)`` would
    from the same RNG state (seed every TP rank identically); ``initialize=False`` skips that (zeros) when a
    state dict is loaded next. Outputs (nll, logits, hidden) are identical on every TP rank; the memory holds
    the local heads (``gather_memory`` / ``shard_memory`` convert).
    """

    def __init__(self, config: LaMemoConfig, *, tp_group=None, params_dtype: torch.dtype = torch.float32,
                 initialize: bool = True, init_seed: int | None = None):
        parallel = MegatronParts(tp_group, params_dtype=torch.float32)
        super().__init__(config, parallel, init_seed=init_seed, initialize=initialize)
        if params_dtype != torch.float32:
            self.to(dtype=params_dtype)


    @classmethod
    def from_full_state_dict(cls, config: LaMemoConfig, state_dict: dict[str, torch.Tensor],
                             **kwargs) -> "TensorParallelLaMemoModel":
        model = cls(config, initialize=False, **kwargs)
        model.load_full_state_dict(state_dict)
        return model

    # ------------------------------------------------------------------ persistence (single-device format)
    # There is deliberately no save_pretrained of its own: writing the single-device format from a live TP
    # model would gather the whole model onto one rank. Trained models are exported offline from the
    # checkpoint's shards (pretrain/checkpoint/export.py, tensor by tensor through the sharding table).
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device=None, dtype=None,
                        tp_group=None) -> "TensorParallelLaMemoModel":
        path = require_model_dir(path)
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
