"""Optimizer and learning-rate schedule: Adam / AdamW with the paper's cosine schedule and optional warm-up."""
from __future__ import annotations

import math

import torch

from .config import OptimSection


def build_optimizer(params, cfg: OptimSection, device: torch.device) -> torch.optim.Optimizer:
    """apex's FusedAdam on GPU when importable (it fuses the update kernels), torch's Adam/AdamW otherwise.
    On CPU torch's optimizer is used: DeepSpeed's own CPU Adam would cost a 60-70 s C++ build per start."""
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]  # optional: not on PyPI
            return FusedAdam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             adam_w_mode=cfg.name == "adamw")
        except ImportError:
            pass
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    # fused on CPU: one pass per tensor, no temporaries. The single-tensor update builds its denominator
    # (sqrt, then divide) as full-size temporaries; under ZeRO the "tensor" is the rank's whole flat partition,
    # and those temporaries were 0.125 x the training state of (1,1,4) ZeRO-3's peak (bench/RESULTS.md).
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
               fused=device.type == "cpu" or None)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, lr: float, min_lr: float) -> float:
    """Multiplier of the base lr before optimizer step ``step`` (0-based): linear warm-up, then cosine from
    lr to min_lr over the remaining steps (the paper: no warm-up, cosine to 0 over all steps)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: OptimSection, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                                          schedule=cfg.schedule, lr=cfg.lr, min_lr=cfg.min_lr))
