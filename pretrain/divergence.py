"""Divergence guard: an optimizer step whose loss or gradients are non-finite, or whose loss spikes above
``run.spike_factor`` x the median of the recent accepted losses, is skipped (weights and optimizer state
unchanged); ``run.max_bad_steps`` skipped steps in a row stop the run.

Where the decision happens: inside the innermost torch optimizer's ``step`` (:class:`StepGuard` wraps it), which
DeepSpeed calls at the gradient-accumulation boundary on every rank for every engine: the plain engine, ZeRO-1/2/3
(their ``step`` calls the torch optimizer on the fp32 partitions), bf16, and the pipeline engine (its
``OptimizerStep`` instruction, inside ``train_batch``). There the gradients are final (reduced over data-parallel
ranks, tied copies summed) and not yet applied. The engines arm the guard with this rank's share of the step's
loss (:meth:`StepGuard.arm`); one all-reduce over the whole job gives every rank the same loss and "any
non-finite gradient anywhere" flag, and a second one agrees on the verdict, so every rank skips or steps together.

After a skip the caller (pretrain/trainer.py) logs the step; checkpoints are written with one extra kept until the
next accepted step confirms them (a spike shows the damage of the update *before* it), and on a divergence stop
the unconfirmed ones are moved to ``checkpoints/diverged/`` (pretrain/checkpoint/rotation.py) so the newest
checkpoint left predates the trouble.
"""
from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from . import faults


class DivergenceError(RuntimeError):
    """Too many consecutive skipped steps: the run stops (the message names the step and the reason)."""


@dataclass
class Verdict:
    skipped: bool
    reason: str          # why the step was skipped ("" when it was not)
    loss: float          # the step's loss as every rank saw it


class DivergenceGuard:
    """The decision rule (pure, identical on every rank given the same inputs)."""

    def __init__(self, *, spike_factor: float, window: int, max_bad_steps: int):
        self.spike_factor = spike_factor
        self.history: collections.deque[float] = collections.deque(maxlen=window)
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0
        self.skipped_total = 0
        self.first_bad_step: int | None = None

    def judge(self, loss: float, grads_finite: bool) -> Verdict:
        if not torch.isfinite(torch.tensor(loss)):
            return Verdict(True, f"non-finite loss ({loss})", loss)
        if not grads_finite:
            return Verdict(True, "non-finite gradient", loss)
        if self.spike_factor > 0 and self.history:
            median = statistics.median(self.history)
            if loss > self.spike_factor * median:
                return Verdict(True, f"loss spike ({loss:.4g} > run.spike_factor {self.spike_factor:g} x recent "
                                     f"median {median:.4g})", loss)
        return Verdict(False, "", loss)

    def record(self, step: int, verdict: Verdict) -> None:
        """Book-keeping after the step; raises DivergenceError after max_bad_steps skips in a row."""
        if verdict.skipped:
            self.skipped_total += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.first_bad_step = step
            if self.consecutive >= self.max_bad_steps:
                raise DivergenceError(f"training diverged at step {step}: {verdict.reason}; {self.consecutive} "
                                      f"consecutive steps skipped (run.max_bad_steps={self.max_bad_steps}), "
                                      f"first at step {self.first_bad_step}")
        else:
            self.consecutive = 0
            self.first_bad_step = None
            self.history.append(verdict.loss)


class StepGuard:
    """Wraps ``optimizer.step`` (the torch optimizer the engine built) so a bad step does nothing."""

    def __init__(self, optimizer: torch.optim.Optimizer, guard: DivergenceGuard, device: torch.device):
        self.optimizer, self.guard, self.device = optimizer, guard, device
        self._inner = optimizer.step
        self._loss: Callable[[], torch.Tensor | None] | None = None
        self._verdict: Verdict | None = None
        self.last: Verdict | None = None
        self.calls = 0
        self._poison = faults.nan_gradient_steps()      # fault injection for tests (pretrain/faults.py)

        def step(*args, **kwargs):
            return self._step(*args, **kwargs)
        step._wrapped_by_lr_sched = True       # torch's LR scheduler checks this marker of its own wrapper
        optimizer.step = step

    def arm(self, local_loss: Callable[[], torch.Tensor | None]) -> None:
        """Before the engine's step: how to read this rank's share of the step loss when the step comes (None on
        ranks that hold no loss, e.g. pipeline stages before the last)."""
        self._loss, self._verdict, self.last = local_loss, None, None

    def _decide(self) -> Verdict:
        self.calls += 1
        if self.calls in self._poison:
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
        loss = self._loss() if self._loss is not None else None
        partial = torch.zeros((), device=self.device)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    partial = partial + p.grad.detach().float().sum().to(self.device)
        bad_grad = 0.0 if bool(torch.isfinite(partial)) else 1.0
        if loss is None:
            stats = torch.tensor([bad_grad, 0.0, 0.0], device=self.device)
        else:
            stats = torch.stack([torch.tensor(bad_grad, device=self.device),
                                 loss.detach().float().reshape(()).to(self.device),
                                 torch.ones((), device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(stats)
        mean_loss = float(stats[1] / stats[2]) if float(stats[2]) > 0 else float("nan")
        verdict = self.guard.judge(mean_loss, grads_finite=float(stats[0]) == 0)
        if dist.is_initialized():        # rounding-proof: every rank takes the same decision
            flag = torch.tensor([1.0 if verdict.skipped else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if bool(flag.item() > 0) and not verdict.skipped:
                verdict = Verdict(True, "another rank saw a bad step", mean_loss)
        return verdict

    def _step(self, *args, **kwargs):
        if self._verdict is None:            # ZeRO may call the torch step once per parameter sub-group
            self._verdict = self._decide()
            self.last = self._verdict
        if self._verdict.skipped:
            return None
        return self._inner(*args, **kwargs)


def install(optimizer: torch.optim.Optimizer, config, device: torch.device) -> StepGuard:
    """The engines' one call: a guard from run.spike_factor / spike_window / max_bad_steps on ``optimizer``."""
    r = config.run
    return StepGuard(optimizer, DivergenceGuard(spike_factor=r.spike_factor, window=r.spike_window,
                                                max_bad_steps=r.max_bad_steps), device)
