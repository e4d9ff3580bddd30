"""Initial weights that do not depend on how the model is split: one seed per tensor.

Every parameter's full initial tensor is drawn from its own generator, seeded by ``tensor_seed(init_seed,
name)`` (the run's init seed and the single-device name). A rank that holds a slice draws the full tensor,
keeps its slice and drops the rest (what Megatron's CPU initialisation does), so the single-device model, every
tensor-parallel rank and every pipeline stage agree exactly at the same seed whatever the layout, and a rank's
peak memory at start-up is its own shard plus the largest single tensor, never the model.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .sharding import ParamShard, shard

_SEED_BITS = 63


def draw_init_seed() -> int:
    """One draw from torch's default generator: ``torch.manual_seed(s); LaMemoModel(config)`` stays
    reproducible, and ranks seeded alike agree on the initial weights."""
    return int(torch.randint(0, 1 << 62, (1,), device="cpu").item())


def tensor_seed(init_seed: int, name: str) -> int:
    """A 63-bit seed that is a pure function of (init_seed, name), stable across processes and versions."""
    digest = hashlib.sha256(f"lamemo-init/{int(init_seed)}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - _SEED_BITS)


def full_initial_tensor(entry: ParamShard, init_seed: int, init_std: float,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full initial value of ``entry`` (docs/method.md §7), on CPU."""
    out = torch.empty(entry.shape, dtype=dtype)
    generator = torch.Generator(device="cpu").manual_seed(tensor_seed(init_seed, entry.name))
    if entry.init == "normal":
        nn.init.normal_(out, 0.0, init_std, generator=generator)
    elif entry.init == "normal_one":
        nn.init.normal_(out, 1.0, init_std, generator=generator)
    elif entry.init == "xavier_uniform":
        nn.init.xavier_uniform_(out, generator=generator)
    elif entry.init == "zeros":
        out.zero_()
    else:
        raise ValueError(f"{entry.name}: unknown init rule {entry.init!r}")
    return out


@torch.no_grad()
def initialise_parameters(params: dict[str, torch.Tensor], table: dict[str, ParamShard], *, init_seed: int,
                          init_std: float, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Fill each parameter (single-device name -> this rank's tensor) with its slice of the full initial
    tensor, one tensor at a time."""
    for name, param in params.items():
        entry = table[name]
        full = full_initial_tensor(entry, init_seed, init_std)
        local = shard(entry, full, tp_rank, tp_size)
        if tuple(local.shape) != tuple(param.shape):
            raise ValueError(f"{name}: this rank holds {tuple(param.shape)}, the sharding table gives "
                             f"{tuple(local.shape)}")
        param.copy_(local)
        del full, local
