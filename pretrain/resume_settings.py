"""Resume with changed optimizer / schedule settings: applied with a logged line, or refused, never ignored.

Loading a checkpoint restores the torch optimizer's param groups (lr, betas, eps, weight decay) and the LR
scheduler's base lrs from the checkpoint, while the schedule's shape (warm-up, cosine / constant, min_lr,
run.steps) and the clip come from the current config. So after :func:`load_checkpoint` this module compares
the checkpoint's ``config.yaml`` with the current config and

* applies a changed ``optim.lr`` / ``betas`` / ``eps`` / ``weight_decay`` to every param group and the
  scheduler's base lrs, and recomputes the current lr from the (current) schedule at the resumed step;
* logs one line naming every changed setting with its old and new value (schedule, clip and run.steps
  included: they take effect through the rebuilt schedule and the engine's clip; ``data.span_memory`` too,
  which takes effect at the next span boundary);
* refuses a changed ``optim.name`` (Adam's and AdamW's states are not interchangeable: weight decay enters
  the moments in one and not the other).

It also compares the data: the checkpoint records the identity of every training and validation source
(pretrain/data/identity.py); other data is refused by name unless ``run.data_changed=restart_streams``.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .checkpoint.format import read_marker
from .config import TrainConfig, TrainConfigError
from .data.identity import changed_sources, data_identity, describe

APPLIED = ("lr", "betas", "eps", "weight_decay")
SCHEDULE = ("warmup_steps", "schedule", "min_lr", "clip_grad")


def changed_settings(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """Dotted key -> (checkpoint value, current value) for every optimizer / schedule setting (and
    ``data.span_memory``) that differs."""
    old_optim = saved.get("optim") or {}
    changes = {}
    for key in ("name", *APPLIED, *SCHEDULE):
        if key not in old_optim:
            continue
        old, new = old_optim[key], getattr(config.optim, key)
        if key == "betas":
            old, new = [float(x) for x in old], [float(x) for x in new]
        if old != new:
            changes[f"optim.{key}"] = (old, new)
    old_steps = (saved.get("run") or {}).get("steps")
    if old_steps is not None and old_steps != config.run.steps:
        changes["run.steps"] = (old_steps, config.run.steps)
    old_memory = (saved.get("data") or {}).get("span_memory")     # applies from the next span boundary on
    if old_memory is not None and old_memory != config.data.span_memory:
        changes["data.span_memory"] = (old_memory, config.data.span_memory)
    return changes


def apply_changed_settings(ckpt: Path, config: TrainConfig, engine, log=print) -> dict[str, tuple]:
    saved_path = Path(ckpt) / "config.yaml"
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        log(f"warning: cannot read {saved_path} ({err}): the current optimizer settings are applied as they are")
        saved = {"optim": {}}
    changes = changed_settings(saved, config)
    if "optim.name" in changes:
        old, new = changes["optim.name"]
        raise TrainConfigError(f"optim.name changed from {old} to {new} since checkpoint {ckpt}: the optimizer "
                               f"state cannot be carried over; keep optim.name={old}, or start a new run "
                               f"(run.resume=never run.overwrite=true)")
    scheduler = engine.scheduler
    optimizer = scheduler.optimizer            # the torch optimizer (ZeRO / bf16 wrappers step it)
    o = config.optim
    for group in optimizer.param_groups:
        group["betas"] = tuple(o.betas)
        group["eps"] = o.eps
        group["weight_decay"] = o.weight_decay
    scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = o.lr * lr_lambda(step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if changes:
        listed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
        log(f"resume: settings changed since {Path(ckpt).name}, applied from this step on: {listed}")
    return changes


def check_data_on_resume(ckpt: Path, config: TrainConfig, log=print) -> bool:
    """Compare the checkpoint's data with this run's. Same data: False. Other data: refused naming it and
    ``run.data_changed``, or with ``run.data_changed=restart_streams`` one logged line and True when the
    training streams must start at position zero with empty memory (a changed validation split alone only
    makes the evaluation numbers incomparable)."""
    saved = read_marker(Path(ckpt)).get("data")
    if saved is None:
        log(f"warning: checkpoint {ckpt} records no data identity (an older version wrote it): data.train and "
            f"data.valid are not checked against it")
        return False
    changes = changed_sources(saved, data_identity(config.data))
    if not changes:
        return False
    if config.run.data_changed != "restart_streams":
        raise TrainConfigError(f"the data changed since checkpoint {ckpt} ({describe(changes)}): resuming would "
                               f"continue at the old position with the old memory on other text; point the data "
                               f"back at the checkpoint's, or set run.data_changed=restart_streams to train on the "
                               f"new data from position 0 with empty memory")
    restart = "train" in changes
    log(f"run.data_changed=restart_streams: {describe(changes)} since checkpoint {ckpt}; "
        + ("training starts the new data at position 0 with empty memory" if restart else
           "only the validation data changed: training continues where it was (validation numbers are not "
           "comparable with earlier ones)"))
    return restart
