"""Resuming on another layout (TP, PP, DP, ZeRO stage, precision or pipeline partition changed).

Every rank reads, one parameter at a time, the fp32 master weights and Adam moments of the parameters it holds
from the checkpoint's shards (``ShardReader``: memory-mapped, merged in memory one tensor at a time), cuts its
slice with the sharding table (``lamemo_parallel.sharding.shard``) and writes it into its engine: the module
weight, the fp32 master (ZeRO-1/2 fragments through DeepSpeed's ``safe_set_full_*`` API, ZeRO-3 partitions
through ``reshard_zero3``) and the moments. The step
count and LR schedule continue; the memory is emptied here and resharded by the caller (``reshard_memory``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from lamemo_parallel.sharding import shard, sharding_table

from ..layout import split_layers
from .shard_index import MOMENTS, single_device_parameters
from .reshard_zero3 import set_zero3_partition
from .shards import ShardReader


def _torch_optimizer(engine):
    """The torch optimizer that holds per-parameter state (ZeRO 0, fp32), or None under a DeepSpeed wrapper."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def _ensure_zero_optimizer_state(engine, step: int) -> None:
    """ZeRO-1/2/3 (and DeepSpeed's BF16 optimizer) create Adam's state lazily at the first step; a resharded load
    needs it now: allocate it for the flat fp32 partitions and link every parameter's fragment to it (what
    DeepSpeed does after a step)."""
    zero = engine.optimizer
    flats = (getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_groups_flat_partition",
                                                                              None)
             or getattr(zero, "fp32_partitioned_groups_flat", None))         # ZeRO 1/2, BF16 optimizer, ZeRO 3
    if flats is None:
        return
    # ZeRO-3 finds a parameter's moments by its position in the flat partition: no fragment links to set
    groups = getattr(zero, "bit16_groups", None) or getattr(zero, "bf16_groups", None) or [[] for _ in flats]
    inner = zero.optimizer
    for i, flat in enumerate(flats):
        state = inner.state[flat]
        if "exp_avg" not in state:
            state.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        for lp in groups[i]:
            if getattr(lp, "_hp_mapping", None) is not None:
                lp._hp_mapping.set_optim_state_fragment(flat, state)
    if hasattr(zero, "_hp_optimizer_states_linked"):
        zero._hp_optimizer_states_linked = True


def target_parts(engine) -> list[range]:
    """The layers of every pipeline stage of this run."""
    p = engine.config.parallel
    return split_layers(engine.model_config.n_layer, p.pipeline, p.pipeline_partition)


def _target_table(engine):
    return sharding_table(engine.model_config, engine.layout.tensor, target_parts(engine))


def reshard_load(ckpt: Path, meta: dict, engine) -> None:
    """Load weights and Adam moments saved under another layout into this run's engine (every rank)."""
    # DeepSpeed loads only where an engine exists: export and `lamemo-checkpoint info` read checkpoints without it
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    reader = ShardReader(ckpt, meta)
    module = engine.module
    device = next(module.parameters()).device
    tp_rank, tp_size = engine.tp_rank, engine.layout.tensor
    table = _target_table(engine)
    params = single_device_parameters(module)
    step = int(meta["step"])
    with_moments = reader.has("exp_avg") and reader.has("exp_avg_sq")
    if with_moments:
        _ensure_zero_optimizer_state(engine, step)
    plain = _torch_optimizer(engine)
    with torch.no_grad():
        for name, param in params.items():
            if hasattr(param, "ds_id"):                  # ZeRO-3: only this rank's partition is filled
                moments = {key: shard(table[name], reader.full(name, key), tp_rank, tp_size)
                           for key in MOMENTS} if with_moments else {}
                set_zero3_partition(param, shard(table[name], reader.full(name, "master"), tp_rank, tp_size),
                                    moments)
                continue
            value = shard(table[name], reader.full(name, "master"), tp_rank, tp_size).to(device)
            param.copy_(value.to(param.dtype))
            # a ZeRO parameter (DeepSpeed sets _hp_mapping, None where no fragment lies on this rank)
            zero = hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")
            if zero:
                safe_set_full_fp32_param(param, value.float())
            hp, opt = (param, plain) if plain is not None or zero else _fp32_copy(engine, param)
            if hp is not param:
                hp.copy_(value)
            if not with_moments:
                continue
            for key in MOMENTS:
                moment = shard(table[name], reader.full(name, key), tp_rank, tp_size).to(device)
                if zero:
                    safe_set_full_optimizer_state(param, moment, key)
                else:
                    state = opt.state.setdefault(hp, {})
                    state[key] = moment.to(hp.dtype).clone()
                    state["step"] = torch.tensor(float(step))
        inner = getattr(engine.optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):     # DeepSpeed's wrappers keep the step count per group
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = torch.full_like(torch.as_tensor(state["step"]), float(step))
    scheduler = engine.scheduler
    scheduler.last_epoch = step - 1
    scheduler.step()
    engine.set_step(step)
    engine.reset_memory()


def _fp32_copy(engine, param):
    """DeepSpeed's unfused mixed-precision optimizer (bf16, ZeRO 0): (the fp32 master of ``param``, the torch
    optimizer that holds its Adam state)."""
    opt = engine.optimizer
    for lg, hg in zip(opt.fp16_groups, opt.fp32_groups):
        for lp, hp in zip(lg, hg):
            if lp is param:
                return hp, opt.optimizer
    raise KeyError("parameter not found in the mixed-precision optimizer")
