"""Where every memory tensor lives under tensor and pipeline parallelism: the memory's sharding table.

The single-device memory (``LaMemoMemory.tensors()``: ``embeddings``, ``vectors.l``, ``log_normalizers.l`` for
LaMemo; ``embeddings``, ``hidden.l`` for Transformer-XL) is the reference, as the single-device state dict is for
the weights (``sharding.py``). Every memory tensor belongs to one decoder layer and follows that layer's weights:

* pipeline stage: the stage holding the layer's weights in ``sharding_table`` (C-bar / Z-bar of layer l on the
  stage of ``layers.l``; XL's cached input of layer l -- ``embeddings`` for l = 0, ``hidden.(l-1)`` after -- on
  the stage of ``layers.l``); LaMemo's embedding FIFO on the stage of the embedding (the first);
* tensor parallelism: C-bar [B, M, H, d_h] and Z-bar [B, M, H] split dimension 2 by heads exactly as the
  layer's q/k/v projections split theirs (TP rank r holds heads ``heads(r, tp)``); the embedding FIFO and XL's
  hidden levels are replicated on every TP rank;
* data parallelism: dimension 0 is one row per stream; which streams a rank reads is the data loader's affair
  (``pretrain/data/streams.py``: a pure function of the stream's global id).

Pure functions of (config, tp, parts), like ``sharding_table``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import LaMemoConfig
from .pipeline_runtime import layer_memory_names
from .sharding import sharding_table

#: The dimension of C-bar / Z-bar that holds the heads.
HEAD_DIM = 2


@dataclass(frozen=True)
class MemoryShard:
    """How one memory tensor (single-device name ``name``) is laid out over TP ranks and pipeline stages."""

    name: str
    layer: int | None
    """The decoder layer that reads it (None: LaMemo's embedding FIFO, read by the first stage)."""
    stage: int
    """The pipeline stage that keeps it."""
    head_split: bool
    """Split by heads along ``HEAD_DIM`` over TP ranks (C-bar, Z-bar); otherwise replicated."""
    heads_per_rank: int
    """Heads each TP rank holds (all heads when replicated)."""

    def heads(self, tp_rank: int) -> range:
        """The global heads TP rank ``tp_rank`` holds of this tensor (all of them when replicated)."""
        if not self.head_split:
            return range(self.heads_per_rank)
        return range(tp_rank * self.heads_per_rank, (tp_rank + 1) * self.heads_per_rank)


def memory_table(config: LaMemoConfig, tp_size: int = 1, parts: list[range] | None = None
                 ) -> dict[str, MemoryShard]:
    """Every memory tensor laid out for ``tp_size`` TP ranks and the pipeline partition ``parts``, derived from
    the weights' ``sharding_table`` (the stage and the head split of the layer that reads it)."""
    table = sharding_table(config, tp_size, parts)
    looks_ahead = config.traits.looks_ahead
    out = {}
    for layer in range(config.n_layer):
        q_proj = table[f"layers.{layer}.attn.q_proj.weight"]
        local_heads = q_proj.local_shape(tp_size)[q_proj.split_dim] // config.d_head
        for name in layer_memory_names(layer, looks_ahead):
            split = looks_ahead            # C-bar / Z-bar hold heads; XL's cached inputs are [B, M, d]
            out[name] = MemoryShard(name, layer, q_proj.stages[0], split, local_heads if split else config.n_head)
    if looks_ahead:
        out = {"embeddings": MemoryShard("embeddings", None, table["embedding.weight"].stages[0], False,
                                         config.n_head), **out}
    return out


def stage_memory_names(table: dict[str, MemoryShard], stage: int) -> list[str]:
    """The memory tensors pipeline stage ``stage`` keeps, in table order."""
    return [name for name, entry in table.items() if entry.stage == stage]
