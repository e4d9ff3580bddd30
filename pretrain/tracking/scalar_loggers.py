"""TensorBoard and Weights & Biases beside MLflow (``run.loggers``): the tracker hands each the values it writes to
``metrics.jsonl`` (one source of values, whatever keys the trainer logs) and the resolved config as
hyper-parameters; each logger's calls run on its own :class:`DeliveryQueue` thread (in order, a failed call
retried, never blocking or stopping training).

    tensorboard   event files in ``<run.dir>/tensorboard/`` (scalars stored in float64, so they equal
                  metrics.jsonl exactly; the config as TensorBoard hparams and as a text table)
    wandb         ``wandb.init(dir=<run.dir>)``: files under ``<run.dir>/wandb/``; the run id is kept in
                  ``<run.dir>/wandb_run_id`` so a resumed job continues the same W&B run. ``WANDB_MODE``
                  (``offline`` / ``disabled``), ``WANDB_PROJECT`` (default ``lamemo``), ``WANDB_ENTITY`` as usual.

Both packages are optional extras (``pip install -e .[tensorboard]`` / ``.[wandb]``) and are imported only when
a logger is asked for: training without them never loads them (wandb alone adds seconds to start-up).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb_run_id"


class LoggerStartError(RuntimeError):
    """A logger cannot start (its package is missing, its service refuses); the tracker turns it into one line."""


def import_extra(logger: str, module: str) -> ModuleType:
    """``module`` of the optional extra named like the logger, imported now: lazily, because training without the
    logger must never load it (wandb alone adds seconds to start-up)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise LoggerStartError(f"run.loggers has {logger} but it cannot be imported ({err}); install it with "
                               f"pip install -e '.[{logger}]'") from None


def _hparam(value: Any) -> Any:
    """A value TensorBoard's hparams plugin takes (numbers, strings, booleans); others as JSON text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)


class TensorBoardLogger:
    name = "TensorBoard"

    def __init__(self, run_dir: Path, run_name: str):
        self.dir = Path(run_dir) / TENSORBOARD_DIR
        self.target = str(self.dir)
        self.writer = None

    def open(self, params: dict[str, Any], resume: bool) -> None:
        tensorboard = import_extra("tensorboard", "torch.utils.tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(self.dir))
        values = {k: _hparam(v) for k, v in params.items()}
        for summary in tensorboard.summary.hparams(values, {}):               # experiment, session start and end: the hparams tab
            self.writer.file_writer.add_summary(summary)
        table = "\n".join(["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in values.items()])
        self.writer.add_text("config", table)
        self.writer.flush()

    def log(self, step: int, values: dict[str, float], walltime: float) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, walltime=walltime, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbLogger:
    name = "W&B"

    def __init__(self, run_dir: Path, run_name: str):
        self.run_dir, self.run_name = Path(run_dir), run_name
        self.target = os.environ.get("WANDB_MODE", "online") + " " + str(self.run_dir / "wandb")
        self.run = None

    def open(self, params: dict[str, Any], resume: bool) -> None:
        wandb = import_extra("wandb", "wandb")
        id_file = self.run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        try:
            self.run = wandb.init(dir=str(self.run_dir), name=self.run_name, id=run_id, config=params,
                                  resume="allow" if run_id else None,
                                  project=os.environ.get("WANDB_PROJECT", "lamemo"))
        except Exception as err:           # wandb.errors.*, network, authentication
            reason = " ".join(str(err).split())[:500]     # one line (pydantic's messages span several)
            raise LoggerStartError(f"cannot start the W&B run ({type(err).__name__}: {reason}); check WANDB_MODE, "
                                   f"WANDB_API_KEY, or set WANDB_MODE=offline to log to {self.run_dir / 'wandb'} "
                                   f"and sync later") from None
        id_file.write_text(self.run.id + "\n")

    def log(self, step: int, values: dict[str, float], walltime: float) -> None:
        self.run.log(dict(values), step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


SCALAR_LOGGERS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def resolve_loggers(loggers: list[str] | tuple[str, ...], mlflow: bool = True) -> list[str]:
    """``run.loggers`` with ``run.mlflow: false`` applied (it takes mlflow out)."""
    return [name for name in loggers if mlflow or name != "mlflow"]
