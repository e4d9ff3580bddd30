"""Operating a run (issue 27) through the real trainer: the profiler window on every rank, TensorBoard and W&B
beside MLflow, and lamemo-status on the finished run. Two 2-rank launches (data parallel, ZeRO-1): the same run
with and without ``run.profile_steps=[3, 4]`` and the extra loggers."""
from __future__ import annotations

import json

import pytest

from helpers import (BASE_STEPS, base_overrides, eval_overrides, jsonl_values, launch, read_losses,
                     tensorboard_scalars)
from pretrain.cli.status import render, run_status

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_profiler_and_loggers_observe_without_changing_the_run(corpus, tmp_path):
    """Acceptance: one chrome trace per rank holding both profiled steps; losses bitwise equal to the unprofiled
    run; TensorBoard's training-loss scalars equal metrics.jsonl's at every logged step; WANDB_MODE=offline
    writes an offline run; lamemo-status reads the finished run."""
    common = ["parallel.zero_stage=1", *eval_overrides(corpus)]
    plain_dir, observed_dir = tmp_path / "plain", tmp_path / "observed"
    plain = launch(2, [*base_overrides(corpus, plain_dir), *common])
    assert plain.returncode == 0, plain.stderr[-3000:]
    observed = launch(2, [*base_overrides(corpus, observed_dir), *common, "run.profile_steps=[3, 4]",
                          "run.mlflow=true", "run.loggers=[mlflow, tensorboard, wandb]"],
                      env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert observed.returncode == 0, observed.stderr[-3000:]

    # the profiler: said where, one trace per rank, both steps in each, nothing else changed
    assert "profiler: recording steps 3-4 on every rank" in observed.stdout
    assert f"profiler: traces written to {observed_dir / 'profile'}/rank<R>/" in observed.stdout
    for rank in (0, 1):
        traces = list((observed_dir / "profile" / f"rank{rank}").glob(f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1, traces
        names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]}
        assert {"train_step_3", "train_step_4"} <= names and "train_step_2" not in names
    assert not (plain_dir / "profile").exists()
    assert read_losses(observed_dir) == read_losses(plain_dir) and len(read_losses(plain_dir)) == BASE_STEPS

    # the loggers: TensorBoard equals metrics.jsonl (loss at every logged step, and every other scalar)
    expected = jsonl_values(observed_dir)
    scalars = tensorboard_scalars(observed_dir)
    assert scalars["loss"] == expected["loss"] and sorted(scalars["loss"]) == list(range(1, BASE_STEPS + 1))
    assert scalars == expected
    offline = list((observed_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    assert (observed_dir / "mlflow.db").is_file()

    # lamemo-status on the finished run
    status = run_status(observed_dir)
    assert status["state"] == "finished" and status["step"] == status["total_steps"] == BASE_STEPS
    assert status["export"]["step"] == BASE_STEPS and status["lock"] is None
    assert status["loss"] == expected["loss"][BASE_STEPS]
    assert status["validation"]["loss"] == expected["eval_loss"][BASE_STEPS]
    assert "[finished]" in render(status)
