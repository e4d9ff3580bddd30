"""Reading a checkpoint's tensors offline, one merged tensor at a time, straight from DeepSpeed's shards.

No process group, no GPU, no deepspeed import. ``COMPLETE.json`` lists every piece of every parameter (see
``shard_index``); a full tensor is assembled from its pieces (each TP rank's flattened slice filled from the
ZeRO fragments that cover it), then merged over TP ranks by the sharding table. Files are opened memory-mapped
and released after each piece, so the resident memory is about the tensor being assembled.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from lamemo_parallel import LaMemoConfig
from lamemo_parallel.sharding import merge, sharding_table

from .format import CheckpointError
from .safe_load import safe_load

KINDS = ("master", "exp_avg", "exp_avg_sq")


class ShardReader:
    """Merged tensors of a validated checkpoint (``meta`` = its COMPLETE.json)."""

    def __init__(self, ckpt: Path, meta: dict):
        self.ckpt, self.meta = Path(ckpt), meta
        if "tensors" not in meta or "layout" not in meta or "model" not in meta:
            raise CheckpointError(f"checkpoint {ckpt} has no tensor table in its {ckpt.name}/COMPLETE.json (it was "
                                  f"written by an older version: export it with that version)")
        self.config = LaMemoConfig(**meta["model"])
        layout = meta["layout"]
        parts, start = [], 0
        for size in layout["pipeline_partition"]:
            parts.append(range(start, start + size))
            start += size
        self.tp_size = layout["tensor"]
        self.table = sharding_table(self.config, self.tp_size, parts)

    @property
    def names(self) -> list[str]:
        return list(self.table)

    def has(self, kind: str) -> bool:
        """Whether every piece records ``kind`` (Adam moments exist only after the first step)."""
        return all(p.get(kind) is not None for e in self.meta["tensors"].values() for p in e["pieces"])

    def _piece_tensor(self, location: list) -> tuple[torch.Tensor, int]:
        file, keys, offset = location
        obj = safe_load(self.ckpt / file, mmap=True, real_classes=False)
        try:
            for key in keys:
                obj = obj[key]
        except (KeyError, IndexError, TypeError):
            raise CheckpointError(f"checkpoint {self.ckpt}: {file} has no entry {keys}") from None
        if not torch.is_tensor(obj):
            raise CheckpointError(f"checkpoint {self.ckpt}: {file} entry {keys} is not a tensor")
        return obj.reshape(-1), offset

    def full(self, name: str, kind: str = "master") -> torch.Tensor:
        """The single-device tensor ``name`` (``master``: fp32 weights; or an Adam moment), float32."""
        entry, record = self.table[name], self.meta["tensors"].get(name)
        if record is None:
            raise CheckpointError(f"checkpoint {self.ckpt} lacks parameter {name}")
        stage = record["stages"][0] if record.get("stages") else entry.stages[0]
        shards = []
        for tp_rank in range(self.tp_size):
            pieces = [p for p in record["pieces"] if p["stage"] == stage and p["tp_rank"] == tp_rank]
            local_shape = entry.local_shape(self.tp_size)
            flat = torch.empty(math.prod(local_shape), dtype=torch.float32)
            covered = torch.zeros(flat.numel(), dtype=torch.bool)
            for piece in pieces:
                if piece.get(kind) is None:
                    raise CheckpointError(f"checkpoint {self.ckpt} holds no {kind} for {name}")
                source, offset = self._piece_tensor(piece[kind])
                start, numel = piece["start"], piece["numel"]
                flat[start:start + numel] = source[offset:offset + numel]
                covered[start:start + numel] = True
                del source
            if not bool(covered.all()):
                raise CheckpointError(f"checkpoint {self.ckpt}: the pieces of {name} on TP rank {tp_rank} cover "
                                      f"{int(covered.sum())} of {flat.numel()} elements")
            shards.append(flat.view(local_shape))
        return merge(entry, shards).contiguous()
