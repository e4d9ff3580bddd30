"""MLflow tracking on rank 0, with a local ``metrics.jsonl`` beside it.

    tracker = Tracker(run_dir, run_name="wt103-lamemo", enabled=rank == 0)
    tracker.start(config.flat(), resume=resumed_from_checkpoint)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifacts(tokenizer_dir, "tokenizer")
    for step ...:
        tracker.log_metrics(step, {"loss": ..., "lr": ..., **meter.interval_metrics()})
    tracker.finish("FINISHED")        # or "FAILED" / "KILLED"; also as a context manager

Where runs go: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else an embedded store in the
run directory: ``sqlite:///<run_dir>/mlflow.db`` with artifacts under ``<run_dir>/mlartifacts`` (mlflow-skinny
with sqlalchemy and alembic is enough; no server). Browse it with
``mlflow ui --backend-store-uri sqlite:///<run_dir>/mlflow.db``.

Resume: the run id is kept in ``<run_dir>/mlflow_run_id``; ``start(..., resume=True)`` reopens that run, so a
requeued job keeps one run with one continuous set of curves. Params logged before keep their value (MLflow
params are immutable); a param whose value changed on resume is recorded as the tag ``changed.<key>``.

Failure policy: :meth:`Tracker.start` raises :class:`TrackingError` when the store cannot be reached (a
misconfigured URI stops the job before any compute). After that, nothing the tracker does can stop
training: metrics and artifacts are sent by a background thread; a failed request warns once, is kept and
retried (bounded), and :meth:`finish` waits at most ``flush_timeout_s``. ``metrics.jsonl`` is written
synchronously and survives any MLflow outage. MLflow's own HTTP retries (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
``MLFLOW_HTTP_REQUEST_TIMEOUT``) decide how long one failed request takes.

Other loggers (``loggers=["tensorboard", "wandb"]``, ``run.loggers``; ``scalar_loggers``) receive the values
written to ``metrics.jsonl`` and the params, each through its own background queue with the same policy: one
that cannot start raises :class:`TrackingError` from :meth:`Tracker.start`, later failures warn once and are
retried.

With ``enabled=False`` (every rank but 0) every method is a no-op.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from .delivery_queue import DeliveryQueue
from .scalar_loggers import SCALAR_LOGGERS, LoggerStartError

logger = logging.getLogger("pretrain.tracking")     # one logger for the package, as before the split

RUN_ID_FILE = "mlflow_run_id"
EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
METRICS_FILE = "metrics.jsonl"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")

_MAX_PARAM_VALUE = 6000          # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w\-./ ]")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (raised by :meth:`Tracker.start` only)."""


# ---------------------------------------------------------------------------------------------- helpers
def embedded_tracking_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / EMBEDDED_DB}"


def resolve_tracking_uri(run_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The argument, else ``MLFLOW_TRACKING_URI``, else the embedded SQLite store of ``run_dir``."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or embedded_tracking_uri(run_dir)


def flatten_params(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 410}}`` -> ``{"model.d_model": 410}`` (already flat keys pass through)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, f"{name}."))
        else:
            out[name] = value
    return out


def clean_key(key: str) -> str:
    """A valid MLflow param / metric key: characters other than letters, digits, ``_ - . / space`` -> ``_``."""
    key = _BAD_KEY_CHARS.sub("_", str(key)).strip("/") or "_"
    return key[:250]


def _param_value(value: Any) -> str:
    text = json.dumps(list(value)) if isinstance(value, (list, tuple)) else str(value)
    if len(text) > _MAX_PARAM_VALUE:
        text = text[:_MAX_PARAM_VALUE - 3] + "..."
    return text


def _numeric(value: Any) -> float | None:
    if value is None or isinstance(value, str):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast (before MLflow's minutes of HTTP retries) when an http(s) server does not answer at all."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=max(1.0, min(5.0, timeout_s))):
                return
        except urllib.error.HTTPError:
            return                      # it answered (auth, proxy, no /health route): reachable
        except ssl.SSLError:
            return                      # it answered; TLS settings are MLflow's business (its own CA options)
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLError):
                return                  # it answered; TLS settings are MLflow's business (its own CA options)
            if time.monotonic() >= deadline:
                raise TrackingError(f"MLflow tracking server {uri} is not reachable ({err.reason}); check "
                                    f"MLFLOW_TRACKING_URI or unset it to log to the run directory") from None
            time.sleep(1.0)
        except (socket.timeout, ConnectionError, OSError) as err:
            if time.monotonic() >= deadline:
                raise TrackingError(f"MLflow tracking server {uri} is not reachable ({err}); check "
                                    f"MLFLOW_TRACKING_URI or unset it to log to the run directory") from None
            time.sleep(1.0)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- tracker
class Tracker:
    """Rank-0 MLflow run of one training run directory (see the module docstring).

    Args:
        run_dir: the training run directory (``mlflow_run_id``, ``metrics.jsonl`` and the embedded store).
        run_name: MLflow run name for a new run.
        enabled: False on every rank but 0: all methods do nothing.
        tracking_uri: overrides ``MLFLOW_TRACKING_URI`` / the embedded store.
        experiment: MLflow experiment name (created when missing).
        mlflow: False writes only ``metrics.jsonl`` (``run.mlflow: false``).
        jsonl: False leaves ``metrics.jsonl`` to the caller.
        flush_timeout_s: the longest :meth:`flush` / :meth:`finish` wait for queued records.
        connect_timeout_s: how long :meth:`start` waits for an http(s) server to answer.
        loggers: other loggers beside MLflow, by name: ``tensorboard``, ``wandb`` (``scalar_loggers``).
    """

    def __init__(self, run_dir: str | Path, *, run_name: str, enabled: bool, tracking_uri: str | None = None,
                 experiment: str = "lamemo", mlflow: bool = True, jsonl: bool = True,
                 flush_timeout_s: float = 60.0, connect_timeout_s: float = 15.0, max_pending: int = 10_000,
                 retry_interval_s: float = 30.0, loggers: tuple[str, ...] | list[str] = ()):
        self.run_dir = Path(run_dir)
        self.run_name = run_name
        self.enabled = bool(enabled)
        self.use_mlflow = bool(mlflow)
        self.use_jsonl = bool(jsonl)
        self.tracking_uri = resolve_tracking_uri(self.run_dir, tracking_uri) if self.enabled and mlflow else None
        self.experiment = experiment
        self.flush_timeout_s = flush_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_pending = max_pending
        self.retry_interval_s = retry_interval_s
        self.run_id: str | None = None
        self.resumed = False
        self._client = None
        self._jsonl = None
        self._started = False
        self._finished = False
        self._queue: DeliveryQueue | None = None      # background delivery to MLflow, from start() on
        self._others = [SCALAR_LOGGERS[name](self.run_dir, run_name) for name in loggers] if self.enabled else []
        self._other_queues: list[DeliveryQueue] = []  # one per other logger, from start() on
        self._warned_receivers: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        return self.enabled and self._started and not self._finished

    @property
    def run_id_path(self) -> Path:
        return self.run_dir / RUN_ID_FILE

    def start(self, params: dict, resume: bool = False) -> str | None:
        """Open the run: a new one, or with ``resume`` the one named in ``<run_dir>/mlflow_run_id`` (a new
        one, with a warning, when that file or run is missing). Logs ``params`` (flattened dotted keys of
        the resolved config; nested dicts are flattened). Returns the MLflow run id (None when disabled)."""
        if not self.enabled:
            return None
        if self._started:
            raise RuntimeError("Tracker.start() called twice")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.use_mlflow:
            try:
                self._open_run(flatten_params(params), resume)
            except TrackingError:
                raise
            except Exception as err:   # MlflowException, SQLAlchemy / alembic errors, OSError ...
                raise TrackingError(f"cannot start the MLflow run at {self.tracking_uri}: "
                                    f"{type(err).__name__}: {err}") from err
        self._start_others(flatten_params(params), resume)
        if self.use_jsonl:
            self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._started = True
        if self.use_mlflow:
            self._queue = DeliveryQueue("MLflow", self.tracking_uri, warn_once=self._warn_once,
                                        max_pending=self.max_pending, retry_interval_s=self.retry_interval_s,
                                        thread_name="mlflow-tracker")
        if self._queue is not None or self._other_queues:
            atexit.register(self._at_exit)
        return self.run_id

    def _start_others(self, params: dict[str, Any], resume: bool) -> None:
        """Open every other logger now (a failure is a TrackingError before step 1), then give each its queue."""
        for other in self._others:
            try:
                other.open(params, resume)
            except LoggerStartError as err:
                raise TrackingError(str(err)) from None
            except Exception as err:
                raise TrackingError(f"cannot start the {other.name} logger at {other.target}: "
                                    f"{type(err).__name__}: {' '.join(str(err).split())[:500]}") from err
            logger.info("%s logging to %s", other.name, other.target)
            self._other_queues.append(DeliveryQueue(
                other.name, other.target, warn_once=lambda message, name=other.name: self._warn_once(message, name),
                max_pending=self.max_pending, retry_interval_s=self.retry_interval_s,
                thread_name=f"{other.name.lower()}-logger"))

    def _open_run(self, params: dict[str, Any], resume: bool) -> None:
        # mlflow loads only when MLflow tracking is on (2-3 s of import, in the trainer's process)
        from mlflow.tracking import MlflowClient

        _check_reachable(self.tracking_uri, self.connect_timeout_s)
        client = MlflowClient(tracking_uri=self.tracking_uri)
        self._client = client
        run = None
        if resume:
            run = self._previous_run(client)
        if run is None:
            experiment_id = self._experiment_id(client)
            tags = {"lamemo.run_dir": str(self.run_dir.resolve()), "lamemo.host": socket.gethostname()}
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            _atomic_write(self.run_id_path, self.run_id + "\n")
            self._log_params_now(params, existing={})
        else:
            self.run_id = run.info.run_id
            self.resumed = True
            client.update_run(self.run_id, status="RUNNING")
            resumes = int(run.data.tags.get("lamemo.resumes", "0")) + 1
            client.set_tag(self.run_id, "lamemo.resumes", str(resumes))
            self._log_params_now(params, existing=run.data.params)
        logger.info("MLflow run %s (%s) at %s", self.run_id, "resumed" if self.resumed else "new",
                    self.tracking_uri)

    def _previous_run(self, client):
        from mlflow.exceptions import MlflowException     # lazily, as in _open_run

        if not self.run_id_path.is_file():
            logger.warning("resuming, but %s is missing: starting a new MLflow run", self.run_id_path)
            return None
        run_id = self.run_id_path.read_text().strip()
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise                     # a server error must not split the run in two: stop at start-up
            logger.warning("resuming, but MLflow run %s is not in %s: starting a new MLflow run",
                           run_id, self.tracking_uri)
            return None
        if run.info.lifecycle_stage != "active":
            logger.warning("MLflow run %s was deleted: starting a new MLflow run", run_id)
            return None
        return run

    def _experiment_id(self, client) -> str:
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        location = None
        if self.tracking_uri == embedded_tracking_uri(self.run_dir):
            location = (self.run_dir.resolve() / EMBEDDED_ARTIFACTS).as_uri()
        return client.create_experiment(self.experiment, artifact_location=location)

    def _log_params_now(self, params: dict[str, Any], existing: dict[str, str]) -> None:
        from mlflow.entities import Param     # lazily, as in _open_run

        new, changed = [], {}
        for key, value in params.items():
            key, text = clean_key(key), _param_value(value)
            if key not in existing:
                new.append(Param(key, text))
            elif existing[key] != text:
                changed[key] = text
        for i in range(0, len(new), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + _MAX_PARAMS_PER_BATCH])
        if changed:
            logger.warning("resumed MLflow run %s keeps its first param values; changed on resume (tagged "
                           "changed.<key>): %s", self.run_id, ", ".join(sorted(changed)))
            for key, text in changed.items():
                self._client.set_tag(self.run_id, clean_key(f"changed.{key}"), text[:5000])

    # ------------------------------------------------------------------ logging
    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Numeric values only (None / strings are skipped): to ``metrics.jsonl`` now, to MLflow in the
        background."""
        if not self.active:
            return
        values = {key: v for key, v in ((k, _numeric(v)) for k, v in metrics.items()) if v is not None}
        if not values:
            return
        now = time.time()
        self._write_jsonl(step, now, values)
        for other, queue in zip(self._others, self._other_queues):     # the same values as metrics.jsonl
            queue.submit(f"metrics at step {step}", lambda other=other: other.log(int(step), values, now))
        if not self.use_mlflow:
            return
        from mlflow.entities import Metric     # lazily, as in _open_run

        timestamp = int(now * 1000)
        batch = [Metric(clean_key(k), v, timestamp, int(step)) for k, v in values.items()]
        for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            chunk = batch[i:i + _MAX_METRICS_PER_BATCH]
            self._submit(f"metrics at step {step}", lambda chunk=chunk: self._client.log_batch(
                self.run_id, metrics=chunk))

    def _write_jsonl(self, step: int, now: float, values: dict[str, float]) -> None:
        if self._jsonl is None:
            return
        record = {"step": int(step), "time": round(now, 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as err:
            self._warn_once(f"cannot write {self.run_dir / METRICS_FILE}: {err}")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (in the background; the file is read when it is sent)."""
        if not (self.active and self.use_mlflow):
            return
        path = str(Path(path).resolve())
        self._submit(f"artifact {path}", lambda: self._client.log_artifact(self.run_id, path, artifact_path))

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Upload a directory's files under ``artifact_path`` (e.g. the tokenizer)."""
        if not (self.active and self.use_mlflow):
            return
        directory = str(Path(directory).resolve())
        self._submit(f"artifacts {directory}",
                     lambda: self._client.log_artifacts(self.run_id, directory, artifact_path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not (self.active and self.use_mlflow):
            return
        from mlflow.entities import RunTag     # lazily, as in _open_run

        batch = [RunTag(clean_key(k), str(v)[:5000]) for k, v in tags.items()]
        self._submit("tags", lambda: self._client.log_batch(self.run_id, tags=batch))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is delivered (True) or ``timeout_s`` passes (False)."""
        if not (self.enabled and self._started and self._queue is not None):
            return True
        return self._queue.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is queued (at most ``flush_timeout_s``), then mark the run ``status``."""
        if not (self.enabled and self._started) or self._finished:
            return
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        if self.use_mlflow and self._queue is not None:
            self._submit(f"status {status}", lambda: self._client.set_terminated(self.run_id, status))
            if not self.flush():
                lost = self._queue.outstanding
                logger.warning("MLflow at %s did not take %d queued record(s) within %.0f s; they are lost "
                               "(metrics.jsonl in %s has every metric)", self.tracking_uri, lost,
                               self.flush_timeout_s, self.run_dir)
            self._queue.stop()
        for other, queue in zip(self._others, self._other_queues):
            queue.submit(f"status {status}", lambda other=other: other.close(status))
            if not queue.flush(self.flush_timeout_s):
                logger.warning("%s at %s did not take %d queued record(s) within %.0f s; they are lost "
                               "(metrics.jsonl in %s has every metric)", other.name, other.target,
                               queue.outstanding, self.flush_timeout_s, self.run_dir)
            queue.stop()
        self._finished = True
        if self._jsonl is not None:
            self._jsonl.close()
        try:
            atexit.unregister(self._at_exit)
        except Exception:  # pragma: no cover
            pass

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _at_exit(self) -> None:
        if not self.active:
            return
        for queue in ([self._queue] if self._queue is not None else []) + self._other_queues:
            queue.flush(min(self.flush_timeout_s, 10.0))

    # ------------------------------------------------------------------ background delivery (delivery_queue)
    def _submit(self, what: str, op: Callable[[], Any]) -> None:
        self._queue.submit(what, op)

    def _warn_once(self, message: str, receiver: str = "MLflow") -> None:
        if receiver not in self._warned_receivers:
            self._warned_receivers.add(receiver)
            logger.warning("%s; training continues (%s records may be incomplete; metrics.jsonl is not)",
                           message, receiver)
