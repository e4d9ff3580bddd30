"""Dropout randomness under tensor parallelism, on CPU and CUDA (megatron-core's tracker is CUDA-only).

A tensor-parallel rank runs two kinds of dropout:

* **replicated** regions (embedding dropout, the position table, the residual dropout after ``o_proj`` /
  ``fc2``, the final hidden dropout) act on tensors every TP rank holds in full: their masks must be the
  *same* on every rank. They are plain ``nn.Dropout`` on torch's default generator, so seeding that
  generator identically on all ranks of a TP group (``torch.manual_seed(seed)``) is all they need.
* **split** regions (attention-probability dropout of the local heads, the FFN dropout after ``fc1``) act on
  this rank's slice of a tensor: their masks must *differ* across ranks, reproducibly.

A split region draws one 62-bit key from the default CPU generator (the same draw on every TP rank, so the
replicated stream advances identically everywhere), mixes it with the TP rank, and runs the dropout with the
tensor's device generator temporarily re-seeded from that mix; the generator's state is restored afterwards.

Unlike megatron's ``CudaRNGStatesTracker`` there is no separate stream to seed, save or restore: every mask is
a pure function of the default RNG state and the TP rank. So the usual per-rank checkpoint of
``torch.get_rng_state()`` / ``torch.cuda.get_rng_state_all()`` resumes split masks exactly, and activation
recomputation (``torch.utils.checkpoint`` restores the default CPU and CUDA states) redraws the same masks.
Not usable inside CUDA-graph capture (it reads and sets generator states).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_MASK64 = (1 << 64) - 1
#: Offset of the split streams' seeds, as megatron's ``model_parallel_cuda_manual_seed`` (seed + 2718 + rank).
SPLIT_SEED_OFFSET = 2718


def split_seed(key: int, tp_rank: int) -> int:
    """The seed of a split region: splitmix64 of (key, tp_rank), 63 bits."""
    z = (key + SPLIT_SEED_OFFSET + (tp_rank + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _device_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    raise NotImplementedError(f"split-region dropout supports cpu and cuda tensors, not {device.type}")


@contextmanager
def split_rng(device: torch.device | str, tp_rank: int):
    """Run the body with ``device``'s default generator seeded for this TP rank's split region.

    Consumes one draw from the default CPU generator (identically on every TP rank) and leaves the device
    generator as it found it."""
    key = int(torch.randint(0, 1 << 62, (1,), device="cpu").item())   # default CPU generator: same on all TP ranks
    generator = _device_generator(torch.device(device))
    saved = generator.get_state()
    generator.manual_seed(split_seed(key, tp_rank))
    try:
        yield
    finally:
        generator.set_state(saved)


class SplitDropout(nn.Dropout):
    """``nn.Dropout`` for a tensor-parallel split region: a different, reproducible mask on each TP rank."""

    def __init__(self, p: float, tp_rank: int):
        super().__init__(p)
        self.tp_rank = tp_rank

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return input
        with split_rng(input.device, self.tp_rank):
            return super().forward(input)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tp_rank={self.tp_rank}"
