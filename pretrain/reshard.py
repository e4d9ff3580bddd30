"""Resharding across a changed layout (tensor / pipeline / data parallel sizes) through the single-device layout.

At save time the checkpoint's ``consolidated/`` directory receives the full weights and the full Adam moments
(``optimizer.safetensors``: ``<param>.exp_avg`` / ``<param>.exp_avg_sq`` and the step count), gathered over
ZeRO partitions (DeepSpeed's ``safe_get_full_optimizer_state``) and tensor-parallel shards. A run with another
layout slices them for its own ranks and writes them into its engine; the memory starts empty.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(engine):
    """The torch optimizer that holds per-parameter state (ZeRO 0, fp32), or None under a ZeRO wrapper."""
    opt = engine.engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def gather_full_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Collective: Adam moments of every parameter in the single-device layout (fp32, CPU)."""
    from deepspeed.utils import safe_get_full_optimizer_state
    module = engine.engine.module
    plain = _torch_optimizer(engine)
    per_key: dict[str, dict[str, torch.Tensor]] = {key: {} for key in MOMENTS}
    for name, param in module.named_parameters():
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(param, key)
            if value is None:
                state = plain.state.get(param, {}) if plain is not None else {}
                value = state.get(key, torch.zeros_like(param))
            per_key[key][name] = value.detach().float()
    if hasattr(module, "to_full_layout"):
        per_key = {key: module.to_full_layout(values) for key, values in per_key.items()}
    return {f"{name}.{key}": t.cpu().contiguous() for key, values in per_key.items() for name, t in values.items()}


def save_full_optimizer_state(out: Path, state: dict[str, torch.Tensor], step: int) -> None:
    save_file(state, str(out / OPTIMIZER_FILE), metadata={"step": str(step)})


def _ensure_zero_optimizer_state(engine, step: int) -> None:
    """ZeRO-1/2 create Adam's state lazily at the first step; a resharded load needs it now: allocate it for
    the flat fp32 partitions and link every parameter's fragment to it (what DeepSpeed does after a step)."""
    zero = engine.engine.optimizer
    flats = getattr(zero, "single_partition_of_fp32_groups", None)
    if flats is None:
        return
    inner = zero.optimizer
    for i, flat in enumerate(flats):
        state = inner.state[flat]
        if not state:
            state.update(step=torch.tensor(float(step)), exp_avg=torch.zeros_like(flat),
                         exp_avg_sq=torch.zeros_like(flat))
        for lp in zero.bit16_groups[i]:
            if getattr(lp, "_hp_mapping", None) is not None:
                lp._hp_mapping.set_optim_state_fragment(flat, state)


def reshard_load(ckpt: Path, meta: dict, engine) -> None:
    """Load weights and Adam moments saved under another layout into this run's engine (every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    module = engine.engine.module
    device = next(module.parameters()).device
    full = load_file(str(ckpt / "consolidated" / "model.safetensors"))
    local = module.to_local_layout(full) if hasattr(module, "to_local_layout") else full
    # a pipeline module names its parameters by layer position; named_model_parameters gives ours
    params = (module.named_model_parameters() if hasattr(module, "named_model_parameters")
              else dict(module.named_parameters()))
    with torch.no_grad():
        for name, param in params.items():
            value = local[name].to(device)
            param.copy_(value.to(param.dtype))
            safe_set_full_fp32_param(param, value.float())
    step = int(meta["step"])
    opt_path = ckpt / "consolidated" / OPTIMIZER_FILE
    if opt_path.is_file():
        _ensure_zero_optimizer_state(engine, step)
        moments = load_file(str(opt_path))
        plain = _torch_optimizer(engine)
        for key in MOMENTS:
            full_key = {name: moments[f"{name}.{key}"] for name in params}
            local_key = module.to_local_layout(full_key) if hasattr(module, "to_local_layout") else full_key
            for name, param in params.items():
                value = local_key[name].to(device)
                if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
                    safe_set_full_optimizer_state(param, value, key)
                else:
                    state = plain.state.setdefault(param, {})
                    state[key] = value.to(param.dtype).clone()
                    state["step"] = torch.tensor(float(step))
        inner = getattr(engine.engine.optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):     # ZeRO's flat fp32 partitions keep the step count
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = torch.full_like(torch.as_tensor(state["step"]), float(step))
    scheduler = engine.scheduler
    scheduler.last_epoch = step - 1
    scheduler.step()
    engine.engine.global_steps = step
    engine.reset_memory()
