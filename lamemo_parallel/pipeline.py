"""Pipeline parallelism: the LaMemo model cut into DeepSpeed ``PipelineModule`` stages, memory kept per stage.

    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)    # after init_process_group
    module = LaMemoPipelineModule(config, topology=topology, parts=[range(0, 2), range(2, 4)],
                                  micro_batches=4, parallel=MegatronParts() if tp > 1 else PlainParts())
    torch.manual_seed(seed); module.initialize()     # = LaMemoModel(config)'s weights, this rank's part only
    engine, *_ = deepspeed.initialize(model=module, optimizer=..., config=ds_config)
    module.runtime.begin_step(step)
    loss = engine.train_batch(iter([(tokens, targets), ...]))         # one (tokens, targets) per micro-batch
    module.runtime.end_step()

What each stage runs (``forward_funcs``, in order; stage s holds the decoder layers ``parts[s]``):

    first stage   EmbeddingPipe (tied 'embedding')  tokens -> scaled embeddings, embedding dropout
    every stage   GlobalBiasesPipe (tied 'biases')  enter: look up this micro-batch's memory, build the carry
                  DecoderLayerPipe x len(parts[s])  carry -> carry (the only checkpointable functions)
                  StageRuntime.exit                 commit the new memory, return the stage's one output tensor
    last stage    EmbeddingPipe.head (tied)         final dropout; (hidden, tied output weight)
                  OutputLayerPipe                   logits (+ output bias); the loss is ``TokenLoss``

The carry inside a stage, the one tensor that crosses a stage boundary, the memory per micro-batch slot
and the position-dropout mask every stage shares: ``lamemo_parallel/pipeline_runtime.py``.

Tied parameters: the input embedding (first stage) and the output layer (last stage) share one weight, and
every stage uses the global biases u, v (v+, u+): both are ``TiedLayerSpec`` modules, whose gradients
DeepSpeed all-reduces across the stages that hold them before the data-parallel reduction. The output bias
lives on the last stage only. Their first appearance runs the module's own ``forward`` (not a ``forward_fn``),
so DeepSpeed's per-layer checkpoint files hold them; the last stage's copy is re-synchronised on load.
While the memory is empty the look-ahead biases are tied into the graph with a zero, so that every tied
parameter has a gradient on every stage (DeepSpeed's bf16 tied-gradient reduction needs one).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn

from .attention import GlobalBiases, PositionEncodings, statistics_dtype
from .config import ConfigError, LaMemoConfig, resolve_mem_len
from .init import draw_init_seed, initialise_parameters
from .layer import DecoderLayer
from .linear import PlainParts
from .memory import LaMemoMemory
from .pipeline_runtime import (ACT, CONTENT, FIRST_MEMORY, FUTURE_CONTENT, FUTURE_POSITION, MEMORY_VALID, POS_AHEAD,
                               POS_CAUSAL, POSITION, StageRuntime)
from .sharding import (BIAS_NAMES, bias_names, check_parts, pipeline_name, sharding_table, stage_bounds, stage_names,
                       stage_plan)


# ---------------------------------------------------------------------------------------------- stage modules
# ``parallel`` below: how the pieces are made for the layout (``linear.PlainParts``, or megatron-core's
# ``megatron_parts.MegatronParts`` under tensor parallelism), the object ``LaMemoModel`` is built from.
class EmbeddingPipe(nn.Module):
    """The input embedding (first stage); tied to the output layer's weight (last stage, ``head``)."""

    def __init__(self, config: LaMemoConfig, parallel: PlainParts):
        super().__init__()
        self.scale = math.sqrt(config.d_model)
        self.embedding = parallel.embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.drop(self.embedding(tokens) * self.scale)

    def head(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last stage: the model's final dropout, then (hidden, tied weight) for ``OutputLayerPipe``."""
        return self.drop(hidden), self.embedding.weight


class GlobalBiasesPipe(nn.Module):
    """u, v (v+, u+): used by every layer, so every stage holds a tied copy. Its forward opens the stage."""

    def __init__(self, config: LaMemoConfig, parallel: PlainParts, runtime: StageRuntime):
        super().__init__()
        shape = (parallel.local(config.n_head), config.d_head)
        self.content_bias = nn.Parameter(torch.zeros(shape))
        self.position_bias = nn.Parameter(torch.zeros(shape))
        self.future_position_bias = nn.Parameter(torch.zeros(shape)) if config.traits.future_position_bias else None
        self.future_content_bias = nn.Parameter(torch.zeros(shape)) if config.traits.future_content_bias else None
        self._runtime = runtime

    def present(self) -> list[str]:
        return [name for name in BIAS_NAMES if getattr(self, name) is not None]

    def tensors(self) -> tuple:
        return tuple(getattr(self, name) for name in BIAS_NAMES)

    def forward(self, x: torch.Tensor) -> tuple:
        return self._runtime.enter(self, x)


class DecoderLayerPipe(nn.Module):
    """Decoder layer ``index`` of the model; memory entries ``position`` of the stage's carry."""

    def __init__(self, config: LaMemoConfig, index: int, position: int, parallel: PlainParts):
        super().__init__()
        self.index, self.position, self.n_layer = index, position, config.n_layer
        self.lookahead, self.variant = config.traits.looks_ahead, config.variant
        self.layer = DecoderLayer(config, parallel)

    def forward(self, carry: tuple) -> tuple:
        x = carry[ACT]
        biases = GlobalBiases(content=carry[CONTENT], position=carry[POSITION],
                              future_position=carry[FUTURE_POSITION], future_content=carry[FUTURE_CONTENT])
        positions = PositionEncodings(causal=carry[POS_CAUSAL], lookahead=carry[POS_AHEAD], variant=self.variant)
        width = 2 if self.lookahead else 1      # memory tensors per layer: (C-bar, Z-bar) or (cached input,)
        first = FIRST_MEMORY + width * self.position
        # The store keeps the newest mem_len rows on commit (StageMemory.commit), so the step keeps them all.
        result = self.layer.step(x, carry[first:first + width], positions=positions, biases=biases,
                                 feeds_next_layer=self.index < self.n_layer - 1, valid=carry[MEMORY_VALID])
        return (result.hidden, *carry[ACT + 1:first], *result.memory, *carry[first + width:])


class OutputLayerPipe(nn.Module):
    """Logits against the tied embedding plus the output bias (the local vocabulary shard under TP)."""

    def __init__(self, config: LaMemoConfig, parallel: PlainParts):
        super().__init__()
        self.parallel = parallel
        self.output_bias = parallel.output_bias(config.vocab_size)
        self.register_buffer("vocab_padding", parallel.vocab_padding(config.vocab_size), persistent=False)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, weight = inputs
        return self.parallel.vocab_logits(hidden, weight, self.output_bias, self.vocab_padding)


class TokenLoss:
    """DeepSpeed's ``loss_fn``: mean token NLL of a micro-batch, in float32 (vocab-parallel under TP)."""

    def __init__(self, parallel: PlainParts):
        self.parallel = parallel

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.parallel.token_nll(logits.to(statistics_dtype(logits.dtype)), targets).float().mean()


# ---------------------------------------------------------------------------------------------- the module
def stage_specs(config: LaMemoConfig, parts: list[range], runtime: StageRuntime,
                parallel: PlainParts) -> tuple[list, list[int]]:
    """The layer list of the whole pipeline (``sharding.stage_plan``) and the index where each stage's
    functions start (+ the end)."""
    biases = bias_names(config)
    specs = []
    for kind, index in stage_plan(config.n_layer, parts):
        if kind == "embedding":
            specs.append(TiedLayerSpec("embedding", EmbeddingPipe, config, parallel,
                                       tied_weight_attr=["embedding.weight"]))
        elif kind == "biases":
            specs.append(TiedLayerSpec("biases", GlobalBiasesPipe, config, parallel, runtime,
                                       tied_weight_attr=biases))
        elif kind == "decoder":
            position = index - next(r for r in parts if index in r).start
            specs.append(LayerSpec(DecoderLayerPipe, config, index, position, parallel))
        elif kind == "exit":
            specs.append(runtime.exit)
        elif kind == "head":
            specs.append(TiedLayerSpec("embedding", EmbeddingPipe, config, parallel,
                                       forward_fn=EmbeddingPipe.head, tied_weight_attr=["embedding.weight"]))
        elif kind == "output":
            specs.append(LayerSpec(OutputLayerPipe, config, parallel))
    return specs, stage_bounds(config.n_layer, parts)


class LaMemoPipelineModule(PipelineModule):
    """The LaMemo model as a DeepSpeed ``PipelineModule``: stage s holds decoder layers ``parts[s]``.

    ``topology`` is DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model: tensor fastest,
    the same rank order as megatron-core's default tp-dp-pp). ``parallel`` makes the stage's pieces
    (``linear.PlainParts``, or ``megatron_parts.MegatronParts`` whose TP group is megatron's, which must
    agree with the topology's model axis). The memory keeps ``config.mem_len`` rows (``resolve_mem_len``).
    Weights start at zero: call ``initialize(init_seed)`` (the single-device model's initial weights, this
    rank's part only) or ``load_full_state_dict`` with a single-device state dict.
    """

    def __init__(self, config: LaMemoConfig, *, topology, parts: list[range], micro_batches: int,
                 parallel: PlainParts | None = None, activation_checkpoint_interval: int = 0, seed: int = 0):
        parallel = parallel or PlainParts()
        parts = check_parts(config.n_layer, parts)
        if topology.get_dim("pipe") != len(parts):
            raise ConfigError(f"{len(parts)} layer parts for a topology of {topology.get_dim('pipe')} stages")
        if topology.get_dim("model") != parallel.tp_size:
            raise ConfigError(f"parts for {parallel.tp_size} tensor-parallel ranks, a topology of "
                              f"{topology.get_dim('model')}")
        #: Where every parameter lives (the single-device names, TP split dims, owning stages).
        sharding = sharding_table(config, parallel.tp_size, parts)
        coord = topology.get_coord(dist.get_rank())
        runtime = StageRuntime(config, stage=coord.pipe, num_stages=len(parts), layers=parts[coord.pipe],
                               micro_batches=micro_batches, mem_len=resolve_mem_len(config.mem_len, config.tgt_len),
                               n_local_heads=parallel.local(config.n_head), seed=seed, dp_rank=coord.data)
        specs, bounds = stage_specs(config, parts, runtime, parallel)
        object.__setattr__(self, "_stage_bounds", bounds)     # read by _partition_layers during __init__
        super().__init__(layers=specs, topology=topology, loss_fn=TokenLoss(parallel),
                         partition_method="lamemo-stages",
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         checkpointable_layers=[DecoderLayerPipe.__name__])
        self.config = config
        self.runtime = runtime
        self.layer_parts = parts
        self.sharding = sharding
        self.parallel = parallel
        parallel.mark_split(self.named_model_parameters(), sharding)

    def _partition_layers(self, method: str = "uniform") -> None:
        """Our stages, not DeepSpeed's partitioning heuristics: the bounds ``stage_specs`` computed."""
        self.parts = list(self._stage_bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def _synchronize_tied_weights(self) -> None:
        """DeepSpeed broadcasts the tied weights in place with autograd recording (the broadcast then shows up
        in every backward of the last stage, with torch's 'no autograd kernel' warning): do it without."""
        with torch.no_grad():
            super()._synchronize_tied_weights()

    # ------------------------------------------------------------------ weights in the single-device layout
    def named_model_parameters(self) -> dict[str, nn.Parameter]:
        """Single-device name -> this rank's parameter, for everything this stage holds (tied copies too), in
        sharding-table order: the table's ``stage_names`` looked up by their ``pipeline_name`` (DeepSpeed's
        module names), the one map between the two namings."""
        module = dict(self.named_parameters())
        return {name: module[pipeline_name(self.config, name, self.stage_id, self.layer_parts)]
                for name in stage_names(self.sharding, self.stage_id)}

    def initialize(self, init_seed: int | None = None) -> None:
        """This rank's initial weights: for each parameter it holds, the full single-device tensor is drawn
        from its own seed and the TP slice kept (``init.py``), one tensor at a time: equal to
        ``LaMemoModel(config, init_seed=init_seed)``, without ever building it. No communication."""
        init_seed = draw_init_seed() if init_seed is None else init_seed
        initialise_parameters(self.named_model_parameters(), self.sharding, init_seed=init_seed,
                              init_std=self.config.init_std, tp_rank=self.parallel.tp_rank,
                              tp_size=self.parallel.tp_size)

    def _to_local(self, name: str, full: torch.Tensor) -> torch.Tensor:
        return self.parallel.to_local(self.sharding[name], full)

    def to_local_layout(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's slices of the single-device-layout tensors it holds (weights or optimizer moments),
        keyed by single-device name like ``named_model_parameters``; no communication."""
        return {name: self._to_local(name, full[name]) for name in self.named_model_parameters() if name in full}

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load this rank's part (its layers, tied copies, its TP shards) of a single-device state dict."""
        mine = self.named_model_parameters()
        missing = sorted(set(mine) - set(state_dict))
        if missing:
            raise ValueError(f"state dict lacks tensors of pipeline stage {self.stage_id}: {', '.join(missing)}")
        with torch.no_grad():
            for name, param in mine.items():
                if tuple(state_dict[name].shape) != self.sharding[name].shape:
                    raise ValueError(f"{name}: state dict shape {tuple(state_dict[name].shape)}, the model's "
                                     f"{self.sharding[name].shape}")
                param.copy_(self._to_local(name, state_dict[name]))

    # ------------------------------------------------------------------ memory in the single-device layout
    def gathered_memory(self, slot: int) -> LaMemoMemory | None:
        """Collective over the pipeline (and TP) group: the single-device memory of micro-batch ``slot`` on
        every rank (heads gathered, all layers), or None before the first step."""
        local = self.runtime.memory.state()[slot]       # with the slot's valid lengths, when it has some
        if local is not None:
            local = dict(local)
            for name in sorted(local):
                if name.startswith(("vectors.", "log_normalizers.")):
                    local[name] = self.parallel.gather_heads(local[name], dim=2)
            local = {name: t.cpu() for name, t in local.items()}
        gathered = [None] * self._grid.get_pipe_parallel_world_size()
        dist.all_gather_object(gathered, local, group=self._grid.get_pipe_parallel_group())
        if any(part is None for part in gathered):
            return None
        tensors = {}
        for part in gathered:
            tensors.update(part)
        return LaMemoMemory.from_tensors(tensors)
