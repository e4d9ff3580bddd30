"""One way to build the model, for both engines: the plain engine's single-device or tensor-parallel model and
the pipeline engine's stage are made by ``ModelBuilder`` from the same settings, so they cannot drift.

What it decides once:

* the model's config (``pretrain.config.model_config``: every ``model.*`` key, ``data.tgt_len`` and
  ``data.mem_len``; the stages read ``mem_len`` from it as the single-device model does);
* the parallel parts (``lamemo_parallel.linear.PlainParts``, or megatron-core's ``MegatronParts`` when
  ``parallel.tensor`` > 1);
* the attention backend (``parallel.attention_backend``, ``auto`` resolved for the device), set on every
  attention layer of whatever it built;
* what the backward pass recomputes (``parallel.recompute``): ``attention`` sets every attention layer's
  selective recompute, ``full`` the model's whole-layer flag or the pipeline's checkpoint interval;
* the initial weights (the single-device model's at ``run.seed``, each rank drawing only what it holds);
* the precision and ZeRO keys of DeepSpeed's config (``deepspeed_config``), which DeepSpeed applies to the
  model it wraps, ZeRO's buffer and live-parameter limits scaled to the rank's parameters (``zero_limits``).
"""
from __future__ import annotations

import deepspeed
import torch
from torch import nn

from lamemo_parallel.attention import use_attention_backend, use_selective_recompute
from lamemo_parallel.init import draw_init_seed, initialise_parameters
from lamemo_parallel.linear import PlainParts
from lamemo_parallel.megatron_parts import MegatronParts
from lamemo_parallel.model import LaMemoModel
from lamemo_parallel.pipeline import LaMemoPipelineModule

from ..config import TrainConfig, model_config
from ..layout import Layout, split_layers
from ..preflight import parameters_per_stage
from .base import attention_backend, deepspeed_config


class ModelBuilder:
    """Builds this rank's part of the model for ``config`` / ``layout`` (after the process groups exist)."""

    def __init__(self, config: TrainConfig, layout: Layout, vocab_size: int, device: torch.device):
        self.config, self.layout, self.device = config, layout, device
        self.model_config = model_config(config, vocab_size)
        self.attention_backend = attention_backend(config.parallel.attention_backend, device)
        self.recompute = config.parallel.recompute
        #: Whole-layer recompute (``recompute: full``): the model's flag, or a pipeline checkpoint interval of 1.
        self.activation_checkpointing = self.recompute == "full"

    def parts(self) -> PlainParts:
        """How a layer's pieces are made for this layout."""
        if self.layout.tensor == 1:
            return PlainParts()
        return MegatronParts()

    def deepspeed_config(self) -> dict:
        """DeepSpeed's config for this model (precision, ZeRO, batch; the pipeline's checkpoint interval)."""
        # ZeRO's limits scale with the parameters of the busiest stage (every stage gets the same DeepSpeed config).
        rank_parameters = max(parameters_per_stage(self.config, self.layout, self.model_config.vocab_size))
        ds_config = deepspeed_config(self.config, self.layout, rank_parameters)
        if self.layout.pipeline > 1:
            ds_config["pipeline"] = {"activation_checkpoint_interval": int(self.activation_checkpointing)}
        return ds_config

    def _finish(self, model: nn.Module) -> nn.Module:
        use_attention_backend(model, self.attention_backend)
        use_selective_recompute(model, self.recompute)
        return model.to(self.device)

    # ------------------------------------------------------------------ the plain engine's model
    def model(self, *, partition=None) -> LaMemoModel:
        """The single-device or tensor-parallel model with the initial weights of ``run.seed``. ``partition``
        (ZeRO-3): a context manager inside which parameters are partitioned as their modules are built; they
        are then filled one tensor at a time (gathered, set, partitioned again)."""
        torch.manual_seed(self.config.run.seed)
        init_seed = draw_init_seed()
        parts = self.parts()
        if partition is None:
            model = LaMemoModel(self.model_config, parts, init_seed=init_seed)
        else:
            with partition():
                model = LaMemoModel(self.model_config, parts, initialize=False)
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    initialise_parameters({name: param}, model.sharding, init_seed=init_seed,
                                          init_std=self.model_config.init_std, tp_rank=parts.tp_rank,
                                          tp_size=parts.tp_size)
        model.activation_checkpointing = self.activation_checkpointing
        return self._finish(model)

    # ------------------------------------------------------------------ the pipeline engine's stage
    def pipeline_stage(self, topology) -> nn.Module:
        """This rank's pipeline stage (``LaMemoPipelineModule``) with its part of the initial weights."""
        p = self.config.parallel
        parts = split_layers(self.model_config.n_layer, self.layout.pipeline, p.pipeline_partition)
        module = LaMemoPipelineModule(self.model_config, topology=topology, parts=parts,
                                      micro_batches=self.config.data.micro_batches, parallel=self.parts(),
                                      activation_checkpoint_interval=int(self.activation_checkpointing),
                                      seed=self.config.run.seed)
        torch.manual_seed(self.config.run.seed)
        module.initialize()
        return self._finish(module)
