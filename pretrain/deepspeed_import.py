"""Import DeepSpeed without the mlflow import its (unused) autotuner makes.

``deepspeed/autotuning/autotuner.py`` runs ``import mlflow`` when the package loads, only to log autotuning
experiments, which this trainer never runs. mlflow takes 2-3 s of CPU to import, in every process of every
launch: on a 4-rank CPU launch that is most of the start-up. Without tracking (``run.mlflow=false``) DeepSpeed
is loaded with mlflow hidden (a ``None`` entry in ``sys.modules`` makes ``import mlflow`` raise ImportError,
which DeepSpeed catches), and the entry is removed again, so a later ``import mlflow`` works as usual.
"""
from __future__ import annotations

import importlib
import sys


def import_deepspeed(tracking: bool) -> None:
    """Load DeepSpeed now; skip its autotuner's mlflow import unless tracking will load mlflow anyway."""
    if "deepspeed" in sys.modules:
        return
    if tracking or "mlflow" in sys.modules:
        importlib.import_module("deepspeed")
        return
    sys.modules["mlflow"] = None        # type: ignore[assignment]
    try:
        importlib.import_module("deepspeed")
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
