"""The parallel layout (tensor x pipeline x data) and the checks that make impossible layouts fail at start-up
with one clear message instead of a hang or a stack trace deep inside a library."""
from __future__ import annotations

from dataclasses import dataclass

from lamemo_parallel.sharding import layout_problems

from .config import TrainConfig, TrainConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int
    pipeline: int
    data: int

    def describe(self) -> str:
        return f"world {self.world_size} = tensor {self.tensor} x pipeline {self.pipeline} x data {self.data}"


def resolve_layout(config: TrainConfig, world_size: int, *, cuda: bool) -> Layout:
    """The layout of ``world_size`` processes, or ``TrainConfigError`` naming every reason it is impossible: the
    one check of the layout, run by every entry point before anything is built."""
    p, m = config.parallel, config.model
    problems = []
    if world_size % (p.tensor * p.pipeline):
        problems.append(f"world size {world_size} is not divisible by tensor x pipeline = {p.tensor} x {p.pipeline}")
    problems += layout_problems(m, p.tensor, p.pipeline)     # heads, FFN units, layers per stage
    if p.pipeline_partition is not None:
        if len(p.pipeline_partition) != p.pipeline or sum(p.pipeline_partition) != m.n_layer \
                or min(p.pipeline_partition) < 1:
            problems.append(f"parallel.pipeline_partition={p.pipeline_partition} must give each of the "
                            f"{p.pipeline} stages >= 1 layer and sum to model.n_layer={m.n_layer}")
    if p.zero_stage > 1 and p.pipeline > 1:
        problems.append(f"ZeRO stage {p.zero_stage} cannot be combined with pipelining (parallel.pipeline="
                        f"{p.pipeline}); use parallel.zero_stage=1 or 0")
    if p.precision == "fp16" and not cuda:
        problems.append("parallel.precision=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    if p.attention_backend == "flex" and not cuda:
        problems.append("parallel.attention_backend=flex needs a GPU to train (FlexAttention has no backward pass "
                        "on CPU); use auto or eager")
    d = config.data
    data = world_size // (p.tensor * p.pipeline) if not world_size % (p.tensor * p.pipeline) else 0
    if d.streams is not None and data:
        if d.streams % (data * d.micro_batch_size):
            problems.append(f"data.streams={d.streams} is not a multiple of data-parallel size {data} x "
                            f"data.micro_batch_size={d.micro_batch_size}")
        else:
            d.micro_batches = d.streams // (data * d.micro_batch_size)   # the global stream count stays
    if problems:
        raise TrainConfigError("impossible parallel layout: " + "; ".join(problems))
    return Layout(world_size, p.tensor, p.pipeline, data)


def split_layers(n_layer: int, stages: int, partition: list[int] | None = None) -> list[range]:
    """Layer ranges per pipeline stage: as configured, or as even as possible (earlier stages get the extra)."""
    sizes = partition or [n_layer // stages + (1 if s < n_layer % stages else 0) for s in range(stages)]
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out
