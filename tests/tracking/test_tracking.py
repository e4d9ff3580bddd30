"""MLflow tracking: a tiny training run logs to the embedded SQLite store and to a real ``mlflow server`` on
127.0.0.1; MlflowClient reads back params, metrics and artifacts; a resumed run continues the same run id;
a store that goes away never stops training."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lamemo_parallel import LaMemoModel
from lamemo_parallel.flops import StepShape
from pretrain.throughput import ThroughputMeter, format_console_line
from pretrain.tracking import (
    METRICS_FILE,
    RUN_ID_FILE,
    TENSORBOARD_DIR,
    WANDB_RUN_ID_FILE,
    Tracker,
    TrackingError,
    embedded_tracking_uri,
    flatten_params,
)

from helpers import free_port, jsonl_values, subprocess_env, tensorboard_scalars, tiny_config

PARAMS = {"model.variant": 3, "model.d_model": 16, "optim.lr": 1e-3, "optim.betas": (0.9, 0.999),
          "data.eval_mem_len": None, "run.dir": "ignored"}


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny_run(tracker: Tracker, run_dir: Path, *, first_step: int = 1, steps: int = 4) -> list[str]:
    """A real (tiny) training loop: model, optimizer, throughput meter, console line, tracker."""
    torch.manual_seed(0)
    N = M = 8
    config = tiny_config(32, n_layer=1, tgt_len=N, mem_len=M)
    model = LaMemoModel(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    shape = StepShape(1, 16, 32, 32, N, M, lookahead=True)
    meter = ThroughputMeter(shape, micro_batch_size=2, peak_tflops=1.0, warmup_steps=1)
    data = torch.randint(0, 32, (2, (steps + 1) * N + 1))
    memory, lines = None, []
    for i, step in enumerate(range(first_step, first_step + steps)):
        meter.begin()
        out = model(data[:, i * N:(i + 1) * N], targets=data[:, i * N + 1:(i + 1) * N + 1], memory=memory)
        loss = out.nll.mean()
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        memory = out.memory
        meter.end(mem_len=0 if i == 0 else M)
        metrics = {"loss": loss.item(), "ppl": math.exp(loss.item()), "lr": 1e-3, "grad_norm": grad_norm,
                   **meter.interval_metrics()}
        tracker.log_metrics(step, metrics)
        lines.append(format_console_line(step, metrics, total_steps=first_step + steps - 1))
    tracker.log_metrics(first_step + steps - 1, {"eval_loss": 3.0, "eval_ppl": math.exp(3.0)})
    return lines


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _write_inputs(run_dir: Path) -> tuple[Path, Path]:
    config_file = run_dir / "config.yaml"
    config_file.write_text("model:\n  variant: 3\n")
    tokenizer = run_dir / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"format": "lamemo-tokenizer", "kind": "byte"}')
    return config_file, tokenizer


@pytest.mark.slow
def test_tiny_run_logs_to_embedded_sqlite_store_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config_file, tokenizer = _write_inputs(run_dir)
    tracker = Tracker(run_dir, run_name="tiny", enabled=True)
    assert tracker.tracking_uri == embedded_tracking_uri(run_dir) == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    run_id = tracker.start(PARAMS, resume=False)
    tracker.log_artifact(config_file)
    tracker.log_artifacts(tokenizer, "tokenizer")
    lines = tiny_run(tracker, run_dir)
    tracker.finish("KILLED")            # e.g. preempted
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    assert "tok/s" not in lines[0] and "MFU" in lines[-1] and "ETA" in lines[-1]   # step 1 is warm-up

    client = MlflowClient(embedded_tracking_uri(run_dir))
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.run_name == "tiny"
    assert run.data.params == {"model.variant": "3", "model.d_model": "16", "optim.lr": "0.001",
                               "optim.betas": "[0.9, 0.999]", "data.eval_mem_len": "None", "run.dir": "ignored"}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run_id, "mfu")] == [2, 3, 4]
    for key in ("ppl", "lr", "grad_norm", "tokens_per_s", "tflops", "hfu", "peak_mem_gib", "step_time_s",
                "eval_loss", "eval_ppl"):
        assert key in run.data.metrics, key
    assert _artifacts(client, run_id) == {"config.yaml", "tokenizer/tokenizer.json"}
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(run_dir.resolve() / "mlartifacts")
    assert len((run_dir / METRICS_FILE).read_text().splitlines()) == 5

    # Resume: the same run id, continued curves, params kept (a changed one is tagged), status RUNNING.
    resumed = Tracker(run_dir, run_name="tiny", enabled=True)
    assert resumed.start({**PARAMS, "optim.lr": 5e-4, "run.steps": 8}, resume=True) == run_id
    assert resumed.resumed
    assert client.get_run(run_id).info.status == "RUNNING"
    tiny_run(resumed, run_dir, first_step=5, steps=2)
    resumed.finish("FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["run.steps"] == "8"
    assert run.data.tags["changed.optim.lr"] == "0.0005" and run.data.tags["lamemo.resumes"] == "1"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5, 6]

    # A fresh start in the same directory is a new run; resume without a record starts one too.
    fresh = Tracker(run_dir, run_name="again", enabled=True)
    new_id = fresh.start(PARAMS, resume=False)
    fresh.finish()
    assert new_id != run_id and (run_dir / RUN_ID_FILE).read_text().strip() == new_id
    (run_dir / RUN_ID_FILE).unlink()
    orphan = Tracker(run_dir, run_name="orphan", enabled=True)
    orphan_id = orphan.start(PARAMS, resume=True)
    orphan.finish()
    assert orphan_id not in (run_id, new_id)
    (run_dir / RUN_ID_FILE).write_text("0" * 32 + "\n")       # a run this store does not have
    stray = Tracker(run_dir, run_name="stray", enabled=True)
    assert stray.start(PARAMS, resume=True) not in (run_id, new_id, orphan_id, "0" * 32)
    stray.finish()


def test_disabled_tracker_is_a_no_op(tmp_path):
    tracker = Tracker(tmp_path / "rank1", run_name="x", enabled=False)
    assert tracker.start(PARAMS, resume=True) is None
    tracker.log_metrics(1, {"loss": 1.0})
    tracker.log_artifact(__file__)
    tracker.log_artifacts(tmp_path)
    assert tracker.flush() is True
    tracker.finish("FINISHED")
    assert not (tmp_path / "rank1").exists()


def test_jsonl_only_and_helpers(tmp_path):
    tracker = Tracker(tmp_path, run_name="x", enabled=True, mlflow=False)
    assert tracker.start({"a": {"b": 1}}, resume=False) is None
    tracker.log_metrics(3, {"loss": float("nan"), "lr": torch.tensor(0.5), "skip": None, "name": "text"})
    tracker.finish()
    assert (tmp_path / METRICS_FILE).read_text().strip().endswith('"loss": "nan", "lr": 0.5}')
    assert not (tmp_path / "mlflow.db").exists()
    silent = Tracker(tmp_path / "silent", run_name="x", enabled=True, mlflow=False, jsonl=False)
    silent.start({}, resume=False)
    silent.log_metrics(1, {"loss": 1.0})
    silent.finish()
    assert not (tmp_path / "silent" / METRICS_FILE).exists()
    assert flatten_params({"model": {"d": 4, "x": {}}, "run.dir": "r"}) == {"model.d": 4, "model.x": {},
                                                                          "run.dir": "r"}


def test_unreachable_server_at_start_raises_quickly(tmp_path):
    port = free_port()
    tracker = Tracker(tmp_path, run_name="x", enabled=True, tracking_uri=f"http://127.0.0.1:{port}",
                      connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable"):
        tracker.start(PARAMS, resume=False)
    assert time.monotonic() - started < 10


class FlakyClient:
    """Stands in for MlflowClient: fails the first ``failures`` calls."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = []

    def _call(self, name, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("server went away")
        self.calls.append((name, args, kwargs))

    def log_batch(self, *args, **kwargs):
        self._call("log_batch", *args, **kwargs)

    def log_artifact(self, *args, **kwargs):
        self._call("log_artifact", *args, **kwargs)

    def set_terminated(self, *args, **kwargs):
        self._call("set_terminated", *args, **kwargs)


def _flaky_tracker(tmp_path, monkeypatch, failures, **kwargs) -> tuple[Tracker, FlakyClient]:
    client = FlakyClient(failures)

    def fake_open(self, params, resume):
        self._client, self.run_id = client, "0" * 32

    monkeypatch.setattr(Tracker, "_open_run", fake_open)
    tracker = Tracker(tmp_path, run_name="x", enabled=True, tracking_uri="http://127.0.0.1:9", **kwargs)
    tracker.start(PARAMS, resume=False)
    return tracker, client


def test_logging_failures_warn_once_and_are_retried(tmp_path, monkeypatch, caplog):
    tracker, client = _flaky_tracker(tmp_path, monkeypatch, failures=3, retry_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss": 1.0 / step})     # never raises
        tracker.log_artifact(__file__)
        assert tracker.flush(timeout_s=10)
        tracker.finish("FINISHED")
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1 and "training continues" in failures[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    steps = [c[2]["metrics"][0].step for c in client.calls if c[0] == "log_batch"]
    assert steps == [1, 2, 3, 4, 5]                              # in order, none lost
    assert [c[0] for c in client.calls[-2:]] == ["log_artifact", "set_terminated"]
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 5


def test_finish_gives_up_after_flush_timeout(tmp_path, monkeypatch, caplog):
    tracker, client = _flaky_tracker(tmp_path, monkeypatch, failures=10**9, flush_timeout_s=0.5,
                                     retry_interval_s=0.05)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        tracker.log_metrics(1, {"loss": 1.0})
        started = time.monotonic()
        tracker.finish("FAILED")
    assert time.monotonic() - started < 5
    assert any("lost" in r.getMessage() for r in caplog.records)
    tracker.log_metrics(2, {"loss": 1.0})       # after finish: ignored, no error
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- real server
@pytest.fixture(scope="module", autouse=True)
def _server_process(request, tmp_path_factory):
    """Launch ``mlflow server`` (the full mlflow package, requirements-dev.txt) on 127.0.0.1 as soon as this
    module starts, so that its start-up (~15 s) overlaps the tests before the server tests; not at all when no
    selected test needs it (``-m "not slow"``)."""
    if not any("mlflow_server" in item.fixturenames for item in request.session.items
               if item.module is request.module):
        yield None
        return
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    assert mlflow_cli.exists(), f"{mlflow_cli} missing: pip install -r requirements-dev.txt"
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)         # the server's own process group (its workers)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)

    try:
        yield {"uri": f"http://127.0.0.1:{port}", "stop": stop, "proc": proc, "log": root / "server.log"}
    finally:
        stop()
        log.close()


@pytest.fixture
def mlflow_server(_server_process):
    """The server of this module, once it answers /health (at most 180 s after launch: ~15 s on an idle machine,
    70 s beside the other test worker's multi-process runs)."""
    proc, uri, log = _server_process["proc"], _server_process["uri"], _server_process["log"]
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return _server_process
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not up within 180 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)


@pytest.mark.slow
def test_real_server_roundtrip_and_resume(tmp_path, monkeypatch, mlflow_server):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config_file, tokenizer = _write_inputs(run_dir)
    tracker = Tracker(run_dir, run_name="tiny-server", enabled=True, experiment="lamemo-test")
    assert tracker.tracking_uri == mlflow_server["uri"]
    run_id = tracker.start(PARAMS, resume=False)
    tracker.log_artifact(config_file)
    tracker.log_artifacts(tokenizer, "tokenizer")
    tiny_run(tracker, run_dir, steps=3)
    tracker.finish("KILLED")
    assert not (run_dir / "mlflow.db").exists()

    client = MlflowClient(mlflow_server["uri"])
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["optim.betas"] == "[0.9, 0.999]" and len(run.data.params) == len(PARAMS)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert "eval_ppl" in run.data.metrics and "mfu" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")          # uploaded over HTTP
    assert _artifacts(client, run_id) == {"config.yaml", "tokenizer/tokenizer.json"}
    local = client.download_artifacts(run_id, "config.yaml", str(tmp_path))
    assert Path(local).read_text() == config_file.read_text()

    resumed = Tracker(run_dir, run_name="tiny-server", enabled=True, experiment="lamemo-test")
    assert resumed.start(PARAMS, resume=True) == run_id
    tiny_run(resumed, run_dir, first_step=4, steps=1)
    resumed.finish()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_server_going_away_does_not_stop_training(tmp_path, monkeypatch, mlflow_server, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["uri"])
    tracker = Tracker(tmp_path, run_name="doomed", enabled=True, experiment="lamemo-test", flush_timeout_s=1)
    tracker.start(PARAMS, resume=False)     # a fresh server's first answers can take seconds on a loaded machine
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")      # then fail fast so the test sees the warning
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    mlflow_server["stop"]()
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        started = time.monotonic()
        for step in range(1, 4):
            tracker.log_metrics(step, {"loss": 1.0})
        assert time.monotonic() - started < 1.0                        # logging never waits for the server
        deadline = time.monotonic() + 15
        while not any("failed" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.1)
        tracker.finish("FINISHED")
    assert time.monotonic() - started < 20
    assert sum("failed" in r.getMessage() for r in caplog.records) == 1
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 3


# ---------------------------------------------------------------------------------------------- other loggers
@pytest.mark.slow
def test_tensorboard_and_wandb_get_exactly_what_metrics_jsonl_gets(tmp_path, monkeypatch):
    """run.loggers=[tensorboard, wandb] (no MLflow): every scalar of metrics.jsonl, at the same step, with the same
    value (float64 event tensors), read back with EventAccumulator; the params as hparams; W&B in offline mode
    writes an offline run with the config and the last values."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, run_name="tiny", enabled=True, mlflow=False, loggers=["tensorboard", "wandb"])
    tracker.start(PARAMS, resume=False)
    tiny_run(tracker, run_dir)
    tracker.log_metrics(4, {"data/tokens/wiki": 1024})    # any key the trainer adds reaches every logger
    tracker.finish("FINISHED")
    expected = jsonl_values(run_dir)
    assert expected["loss"].keys() == {1, 2, 3, 4} and "data/tokens/wiki" in expected
    assert tensorboard_scalars(run_dir) == expected               # every tag, step and value, exactly

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    hparams = [t for t in events.summary_metadata if t.startswith("_hparams_")]
    assert hparams and "config" in "".join(events.Tags()["tensors"])

    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert (run_dir / WANDB_RUN_ID_FILE).read_text().strip() in offline[0].name
    # The run log is wandb's binary record stream (protobuf, read by `wandb sync`); its records hold keys and JSON
    # values as text: the config's keys and every logged loss are in it.
    log = next(offline[0].glob("run-*.wandb")).read_bytes()
    assert b"model.d_model" in log and b"optim.betas" in log
    assert all(json.dumps(expected["loss"][s]).encode() in log for s in (1, 2, 3, 4))

    # a resumed job continues the same W&B run (its id kept in the run directory)
    run_id = (run_dir / WANDB_RUN_ID_FILE).read_text().strip()
    resumed = Tracker(run_dir, run_name="tiny", enabled=True, mlflow=False, loggers=["wandb"])
    resumed.start(PARAMS, resume=True)
    resumed.log_metrics(5, {"loss": 0.5})
    resumed.finish("FINISHED")
    assert (run_dir / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    assert sorted(p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")) == [run_id, run_id]


def test_a_logger_that_cannot_start_is_one_error_and_one_that_fails_later_is_retried(tmp_path, monkeypatch,
                                                                                      caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)             # not installed
    tracker = Tracker(tmp_path / "a", run_name="x", enabled=True, mlflow=False, loggers=["wandb"])
    with pytest.raises(TrackingError, match=r"run.loggers has wandb but it cannot be imported.*\[wandb\]"):
        tracker.start(PARAMS)

    from pretrain.tracking.scalar_loggers import TensorBoardLogger
    real_log, calls = TensorBoardLogger.log, []

    def flaky(self, step, values, walltime):
        calls.append(step)
        if len(calls) <= 2:
            raise OSError("disk quota exceeded")
        real_log(self, step, values, walltime)

    monkeypatch.setattr(TensorBoardLogger, "log", flaky)
    run_dir = tmp_path / "b"
    tracker = Tracker(run_dir, run_name="x", enabled=True, mlflow=False, loggers=["tensorboard"],
                      retry_interval_s=0.05)
    tracker.start(PARAMS)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss": 1.0 / step})       # never raises, never blocks
        tracker.finish("FINISHED")
    warnings = [r.getMessage() for r in caplog.records if "disk quota" in r.getMessage()]
    assert len(warnings) == 1 and "training continues (TensorBoard records" in warnings[0]
    assert calls[:3] == [1, 1, 1] and sorted(set(calls)) == [1, 2, 3, 4, 5]   # the failed head retried in order
    assert tensorboard_scalars(run_dir)["loss"] == {s: 1.0 / s for s in range(1, 6)}


def test_training_without_the_extra_loggers_never_imports_them(tmp_path):
    """The default loggers (MLflow, or none) never load tensorboard or wandb: the trainer's modules and a tracker
    that starts, logs and finishes, in a fresh interpreter."""
    probe = ("import sys\nimport pretrain.trainer\nfrom pretrain.tracking import Tracker\n"
             "t = Tracker(sys.argv[1], run_name='x', enabled=True, mlflow=False)\nt.start({'a': 1})\n"
             "t.log_metrics(1, {'loss': 1.0})\nt.finish()\n"
             "loaded = [m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]\n"
             "assert not loaded, loaded\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / METRICS_FILE).read_text().count('"loss": 1.0') == 1
