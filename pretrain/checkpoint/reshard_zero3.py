"""Resharding into ZeRO stage 3: fill this rank's ZeRO-3 partition of every parameter from the shards.

Under ZeRO-3 a parameter's data is an empty placeholder; its values live in ``param.ds_tensor`` (this rank's
flat 1/world partition of the module weight, padded at the end) and in the optimizer's flat fp32 partition and
Adam moments at the same position. DeepSpeed's universal-checkpoint loader (``load_hp_checkpoint_state`` in
``deepspeed/runtime/zero/stage3.py``) cuts the same partition from a full tensor: flatten, pad to
``world * ceil(numel / world)``, take the rank's run. We do that for one (TP-sliced) parameter at a time and write
it through DeepSpeed's local-partition API (``safe_set_local_fp32_param`` / ``safe_set_local_optimizer_state``,
no communication). DeepSpeed's full-tensor setter ``safe_set_full_fp32_param`` would not do: it narrows the
unpadded tensor and fails on the last rank whenever the parameter's size is not a multiple of the world size.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def zero3_partition(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``full`` (this rank's TP slice of the parameter), zero-padded."""
    size = param.ds_tensor.numel()                       # ceil(numel / partition world size)
    rank = dist.get_rank(group=param.ds_process_group)
    flat = full.reshape(-1)
    start = min(rank * size, flat.numel())
    part = flat[start:start + size]
    if part.numel() < size:
        part = torch.cat([part, part.new_zeros(size - part.numel())])
    return part


def set_zero3_partition(param, master: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """Write the module weight, fp32 master and Adam moments of ``param``'s ZeRO-3 partition."""
    # DeepSpeed loads only where an engine exists: export and `lamemo-checkpoint info` read checkpoints without it
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    device = param.ds_tensor.device
    part = zero3_partition(param, master).to(device)
    param.ds_tensor.data.copy_(part.to(param.ds_tensor.dtype))
    safe_set_local_fp32_param(param, part.float())
    for key, moment in moments.items():
        safe_set_local_optimizer_state(param, zero3_partition(param, moment).to(device).float(), key)
