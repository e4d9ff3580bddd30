"""Per-rank state for exact resume (memory slots, RNG) as plain tensors and numbers, so the per-rank file
loads with ``weights_only=True``."""
from __future__ import annotations

import random

import numpy as np
import torch

from lamemo_parallel import LaMemoMemory


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def memory_to_state(memory: LaMemoMemory | None) -> dict | None:
    """One micro-batch slot's memory (None: a slot not run yet), as ``LaMemoMemory.state_dict``."""
    return None if memory is None else memory.state_dict()


def memory_from_state(state: dict | None, device) -> LaMemoMemory | None:
    return None if state is None else LaMemoMemory.from_state_dict(state, device)
