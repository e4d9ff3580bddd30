"""The sharding table: where every parameter of a LaMemo model lives under tensor and pipeline parallelism.

The contract. The single-device state dict (``LaMemoModel.state_dict()``, the export format) is the
reference: every parameter is named by its single-device name and has one *full* shape. For a tensor-parallel
size ``tp`` and a pipeline partition ``parts`` (stage s holds decoder layers ``parts[s]``), ``sharding_table``
says for each name

* how it splits over TP ranks: ``split_dim`` (None = replicated, every TP rank holds the full tensor), the
  size that dimension is padded to first (``padded``: the vocabulary rows of ``embedding.weight`` /
  ``output_bias`` are padded with zeros at the end up to a multiple of ``tp``; the TP model masks the logits
  of the padding rows to -inf and no token id reaches them, so padding never changes the model), and
  ``blocks`` (a fused tensor made of ``blocks`` equal parts along ``split_dim``, e.g. a packed K|V
  projection, is split block by block so that every rank gets whole heads of each part; this model has no
  fused tensor, so ``blocks`` is 1 everywhere today). Rank r holds the r-th contiguous chunk of every block.
  Column-parallel weights (q/k/v/r projections, ``fc1``) and ``fc1``'s bias split dimension 0 (heads /
  inner units), row-parallel weights (``o_proj``, ``fc2``) dimension 1; the global biases u, v, v+, u+
  [H, d_h] are split by heads (dimension 0); LayerNorms and ``fc2``'s bias are replicated.
* which pipeline stages hold it (``stages``): a decoder layer's tensors on the stage holding the layer; the
  tied embedding / output weight on the first and the last stage; the global biases on every stage (tied);
  the output bias on the last stage. ``stages[0]`` is the stage that speaks for a tied tensor (its copy is
  the one DeepSpeed's layer files and gradient-norm code count).

``shard`` / ``merge`` convert between a full tensor and the TP shards of any per-parameter tensor (weights,
gradients, Adam moments): ``merge([shard(e, full, r, tp) for r in range(tp)]) == full`` exactly.
Names: the TP model uses the single-device names unchanged. A pipeline stage names parameters by their
position in DeepSpeed's layer list (``pipeline_name``: ``tied_modules.embedding.embedding.weight``,
``3.layer.attn.q_proj.weight``, ...); the stage looks its parameters up through it
(``LaMemoPipelineModule.named_model_parameters``: ``stage_names`` of the table, by ``pipeline_name``).
``stage_plan`` is the layer list itself: the pipeline module is built from it, so the table and the module
cannot disagree.

Pure functions of (config, tp, parts): no process group, no torch.distributed, no model instance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError, LaMemoConfig

#: Global biases shared by every layer (and so tied over every pipeline stage), in state-dict order.
BIAS_NAMES = ("content_bias", "position_bias", "future_position_bias", "future_content_bias")
#: Parameters split along the vocabulary (padded to a multiple of the TP size).
VOCAB_PARALLEL = ("embedding.weight", "output_bias")


@dataclass(frozen=True)
class ParamShard:
    """How one parameter (single-device name ``name``) is laid out over TP ranks and pipeline stages."""

    name: str
    shape: tuple[int, ...]
    """Full (single-device, unpadded) shape."""
    split_dim: int | None
    """Dimension split over TP ranks; None = replicated on every TP rank."""
    padded: int | None
    """Size of ``split_dim`` after zero padding at the end (vocabulary rows); None when not split."""
    blocks: int
    """Fused tensors: equal blocks along ``split_dim``, each split separately (1 = not fused)."""
    stages: tuple[int, ...]
    """Pipeline stages holding a copy; ``stages[0]`` speaks for a tied tensor."""
    init: str
    """Initial values (docs/method.md §7): 'normal' N(0, init_std), 'normal_one' N(1, init_std) (LayerNorm gains),
    'zeros', 'xavier_uniform'."""

    @property
    def tied(self) -> bool:
        return len(self.stages) > 1

    def local_shape(self, tp_size: int) -> tuple[int, ...]:
        """The shape one TP rank holds."""
        if self.split_dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split_dim] = self.padded // tp_size
        return tuple(shape)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """The vocabulary rounded up to a multiple of ``tp_size`` (every TP rank holds the same number of rows)."""
    return -(-vocab_size // tp_size) * tp_size


def bias_names(config: LaMemoConfig) -> list[str]:
    """The global biases a variant has: u, v always; v+ and u+ where its ``VariantTraits`` say so."""
    names = ["content_bias", "position_bias"]
    if config.traits.future_position_bias:
        names.append("future_position_bias")
    if config.traits.future_content_bias:
        names.append("future_content_bias")
    return names


# ---------------------------------------------------------------------------------------------- pipeline plan
def stage_plan(n_layer: int, parts: list[range] | None = None) -> list[tuple[str, int | None]]:
    """DeepSpeed's layer list of the whole pipeline, as (kind, decoder layer index or None) per position:

        first stage   ('embedding', None)
        every stage   ('biases', None), ('decoder', i) for i in parts[s], ('exit', None)
        last stage    ('head', None) (the tied embedding's output use), ('output', None)

    A position's index is the number in DeepSpeed's ``layer_XX`` file names and module names."""
    parts = [range(n_layer)] if parts is None else parts
    plan = []
    for stage, layers in enumerate(parts):
        if stage == 0:
            plan.append(("embedding", None))
        plan.append(("biases", None))
        plan.extend(("decoder", i) for i in layers)
        plan.append(("exit", None))
        if stage == len(parts) - 1:
            plan.extend([("head", None), ("output", None)])
    return plan


def stage_bounds(n_layer: int, parts: list[range] | None = None) -> list[int]:
    """Index of the first layer-list position of every stage, then the list's length."""
    parts = [range(n_layer)] if parts is None else parts
    bounds, position = [], 0
    for stage, layers in enumerate(parts):
        bounds.append(position)
        position += (stage == 0) + 1 + len(layers) + 1 + 2 * (stage == len(parts) - 1)
    return bounds + [position]


def _stage_of_layer(parts: list[range], layer: int) -> int:
    for stage, layers in enumerate(parts):
        if layer in layers:
            return stage
    raise ValueError(f"decoder layer {layer} is in no pipeline stage of {[list(r) for r in parts]}")


def check_parts(n_layer: int, parts: list[range] | None) -> list[range]:
    """``parts`` as ranges (default: one stage with every layer); ``ConfigError`` unless every stage gets >= 1
    layer and the stages cover layers 0..n_layer-1 in order."""
    parts = [range(n_layer)] if parts is None else [range(r.start, r.stop) if isinstance(r, range) else
                                                    range(r[0], r[-1] + 1) for r in parts]
    if [i for r in parts for i in r] != list(range(n_layer)) or min(len(r) for r in parts) < 1:
        raise ConfigError(f"pipeline parts {[list(r) for r in parts]} must give every stage >= 1 layer and cover "
                          f"layers 0..{n_layer - 1} in order")
    return parts


def layout_problems(config, tp_size: int = 1, pipeline_stages: int = 1) -> list[str]:
    """Why ``config`` (a ``LaMemoConfig`` or anything with its ``n_head`` / ``d_inner`` / ``n_layer``; the
    trainer's model section) cannot be split over ``tp_size`` tensor-parallel ranks and ``pipeline_stages``
    stages: one sentence per problem, none when it can. The one place these rules are written.

    Heads and FFN units are split over TP ranks (whole heads, equal slices); d_model is replicated; the
    vocabulary is padded to a multiple of the TP size (``padded_vocab_size``), so it is never a problem."""
    if not isinstance(tp_size, int) or tp_size < 1:
        return [f"the tensor-parallel size must be a positive integer, got {tp_size!r}"]
    problems = []
    if config.n_head % tp_size:
        problems.append(f"model.n_head={config.n_head} is not divisible by the tensor-parallel size {tp_size} "
                        f"(each rank must own whole attention heads)")
    if config.d_inner % tp_size:
        problems.append(f"model.d_inner={config.d_inner} is not divisible by the tensor-parallel size {tp_size}")
    if config.n_layer < pipeline_stages:
        problems.append(f"model.n_layer={config.n_layer} is fewer than the {pipeline_stages} pipeline stages "
                        f"(each stage needs >= 1 layer)")
    return problems


def check_layout(config, tp_size: int = 1, pipeline_stages: int = 1) -> None:
    """Raise ``ConfigError`` naming every ``layout_problems`` of the layout."""
    problems = layout_problems(config, tp_size, pipeline_stages)
    if problems:
        raise ConfigError("impossible parallel layout: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- the table
def sharding_table(config: LaMemoConfig, tp_size: int = 1, parts: list[range] | None = None
                   ) -> dict[str, ParamShard]:
    """Every parameter of ``LaMemoModel(config)``, in ``state_dict()`` order, laid out for ``tp_size`` TP ranks
    and the pipeline partition ``parts`` (default: one stage with every layer)."""
    check_layout(config, tp_size)
    parts = check_parts(config.n_layer, parts)
    first, last, every = 0, len(parts) - 1, tuple(range(len(parts)))
    V, d, H, dh, F = config.vocab_size, config.d_model, config.n_head, config.d_head, config.d_inner
    table: dict[str, ParamShard] = {}

    def add(name, shape, split_dim, stages, init, padded=None):
        size = None if split_dim is None else (padded or shape[split_dim])
        table[name] = ParamShard(name, tuple(shape), split_dim, size, 1, tuple(dict.fromkeys(stages)), init)

    add("output_bias", [V], 0, [last], "zeros", padded=padded_vocab_size(V, tp_size))
    for name in bias_names(config):
        add(name, [H, dh], 0, every, "xavier_uniform" if name.startswith("future") else "normal")
    add("embedding.weight", [V, d], 0, [first, last], "normal", padded=padded_vocab_size(V, tp_size))
    for i in range(config.n_layer):
        stage, p = [_stage_of_layer(parts, i)], f"layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "r_proj"):
            add(p + f"attn.{proj}.weight", [H * dh, d], 0, stage, "normal")       # column: heads
        add(p + "attn.o_proj.weight", [d, H * dh], 1, stage, "normal")            # row: heads
        add(p + "attn.norm.weight", [d], None, stage, "normal_one")
        add(p + "attn.norm.bias", [d], None, stage, "zeros")
        add(p + "ff.fc1.weight", [F, d], 0, stage, "normal")                      # column: inner units
        add(p + "ff.fc1.bias", [F], 0, stage, "zeros")
        add(p + "ff.fc2.weight", [d, F], 1, stage, "normal")                      # row: inner units
        add(p + "ff.fc2.bias", [d], None, stage, "zeros")                         # added once after the reduce
        add(p + "ff.norm.weight", [d], None, stage, "normal_one")
        add(p + "ff.norm.bias", [d], None, stage, "zeros")
    return table


def stage_names(table: dict[str, ParamShard], stage: int) -> list[str]:
    """The single-device names pipeline stage ``stage`` holds (tied copies included), in table order."""
    return [name for name, entry in table.items() if stage in entry.stages]


# ---------------------------------------------------------------------------------------------- TP slices
def _pad(entry: ParamShard, full: torch.Tensor) -> torch.Tensor:
    extra = entry.padded - full.shape[entry.split_dim]
    if extra <= 0:
        return full
    pad_shape = list(full.shape)
    pad_shape[entry.split_dim] = extra
    return torch.cat([full, full.new_zeros(pad_shape)], dim=entry.split_dim)


def shard(entry: ParamShard, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s slice of ``full`` (a view where possible; the full tensor itself if replicated)."""
    if tuple(full.shape) != entry.shape:
        raise ValueError(f"{entry.name}: full tensor of shape {tuple(full.shape)}, expected {entry.shape}")
    if entry.split_dim is None or tp_size == 1:
        return full
    dim = entry.split_dim
    padded = _pad(entry, full)
    blocks = padded.chunk(entry.blocks, dim=dim)
    pieces = [b.narrow(dim, tp_rank * (b.shape[dim] // tp_size), b.shape[dim] // tp_size) for b in blocks]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def merge(entry: ParamShard, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order (replicated: the first rank's copy)."""
    if entry.split_dim is None or len(shards) == 1:
        return shards[0]
    dim = entry.split_dim
    per_rank = [s.chunk(entry.blocks, dim=dim) for s in shards]
    full = torch.cat([piece for block in zip(*per_rank) for piece in block], dim=dim)
    return full.narrow(dim, 0, entry.shape[dim])


# ---------------------------------------------------------------------------------------------- names
def pipeline_name(config: LaMemoConfig, name: str, stage: int, parts: list[range] | None = None) -> str:
    """The name ``name`` has in pipeline stage ``stage``'s ``named_parameters()`` (DeepSpeed's module names:
    tied modules under ``tied_modules.<key>``, others under their layer-list position in ``stage_plan``)."""
    if name == "embedding.weight":
        return "tied_modules.embedding.embedding.weight"
    if name in BIAS_NAMES:
        return f"tied_modules.biases.{name}"
    parts = check_parts(config.n_layer, parts)
    if name == "output_bias":
        position, key = ("output", None), "output_bias"
    elif name.startswith("layers."):
        layer, rest = name[len("layers."):].split(".", 1)
        position, key = ("decoder", int(layer)), f"layer.{rest}"
    else:
        raise KeyError(f"{name} is not a parameter of a LaMemo model")
    index = stage_plan(config.n_layer, parts).index(position)
    bounds = stage_bounds(config.n_layer, parts)
    if not bounds[stage] <= index < bounds[stage + 1]:
        raise KeyError(f"{name} is not held by pipeline stage {stage}")
    return f"{index}.{key}"
