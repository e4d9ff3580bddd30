"""Experiment tracking on rank 0: MLflow runs (and TensorBoard, W&B) plus a local ``metrics.jsonl``.

    mlflow_logger   the :class:`Tracker` (run lifecycle, params, metrics, artifacts, resume of the run id)
    delivery_queue  the generic in-order background delivery with bounded retry the tracker sends through
    scalar_loggers  TensorBoard and W&B beside MLflow (``run.loggers``), fed the values of metrics.jsonl

Callers import from the package: ``from pretrain.tracking import Tracker``.
"""
from .mlflow_logger import (EMBEDDED_ARTIFACTS, EMBEDDED_DB, METRICS_FILE, RUN_ID_FILE, TERMINAL_STATUSES, Tracker,
                            TrackingError, clean_key, embedded_tracking_uri, flatten_params, resolve_tracking_uri)
from .scalar_loggers import TENSORBOARD_DIR, WANDB_RUN_ID_FILE, resolve_loggers

__all__ = ["EMBEDDED_ARTIFACTS", "EMBEDDED_DB", "METRICS_FILE", "RUN_ID_FILE", "TENSORBOARD_DIR", "TERMINAL_STATUSES",
           "Tracker", "TrackingError", "WANDB_RUN_ID_FILE", "clean_key", "embedded_tracking_uri", "flatten_params",
           "resolve_loggers", "resolve_tracking_uri"]
