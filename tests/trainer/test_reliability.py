"""Lose nothing, say one clear thing (issue 15): checks before compute, run-directory safety, divergence, changed
settings on resume, clean stops. Real trainer launches (DeepSpeed, gloo) where the behaviour needs them; the
checks that need no process group are called in-process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY_CONFIG, base_overrides, free_port, launch, launcher, launcher_cmd, one_error, subprocess_env

from lamemo_parallel import LaMemoModel
from pretrain.cli.status import render, run_status
from pretrain.config import TrainConfigError, load_config


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)]


# ---------------------------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("override,named", [
    ("optim.betas=[0.9]", "optim.betas"), ("run.log_interval=0", "run.log_interval"),
    ("model.init_std=-1", "model.init_std"), ("data.eval_mem_len=-4", "data.eval_mem_len"),
    ("run.keep_checkpoints=0", "run.keep_checkpoints"), ("optim.eps=0", "optim.eps"),
    ("optim.lr=nan", "optim.lr"), ("optim.min_lr=1", "optim.min_lr"), ("model.dropout=1.5", "model.dropout"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"), ("run.save_interval=-1", "run.save_interval"),
    ("run.eval_tokens=-5", "run.eval_tokens"), ("optim.warmup_steps=100000", "optim.warmup_steps"),
    ("run.spike_factor=0.5", "run.spike_factor"), ("run.max_bad_steps=0", "run.max_bad_steps"),
    ("optim.weight_decy=1", "did you mean 'optim.weight_decay'"), ("run.steps=ten", "run.steps must be an integer"),
    ("model.clamp_len=-7", "model.clamp_len"), ("data.verify=sometimes", "data.verify"),
])
def test_every_config_value_is_range_checked(override, named):
    with pytest.raises(TrainConfigError, match=named.replace("[", r"\[").replace("(", r"\(")):
        load_config(TINY_CONFIG, [override])


@pytest.mark.parametrize("content,named", [
    (b"\xff\xfe\x00\x01binary", "is not a UTF-8 text file"), (b"model: [1\n", "is not valid YAML"),
    (b"model:\x00 1\n", "is not valid YAML"), (b"- 1\n- 2\n", "must hold a mapping of sections"),
    (b"just text\n", "must hold a mapping of sections"), (b"modle:\n  d_model: 8\n", "unknown config section"),
    (b"model: 3\n", "section 'model'"),
])
def test_a_config_file_that_is_not_a_yaml_mapping_is_one_line(tmp_path, content, named):
    """--config given a binary, non-UTF-8, non-YAML or non-mapping file: one line, exit 2, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    with pytest.raises(TrainConfigError, match=named) as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    if named == "is not a UTF-8 text file":           # and through the command: exit 2, one line
        result = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", str(bad), "--dry-run"],
                                capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_preflight_refuses_data_and_memory_problems_before_compute(corpus, bpe_dir, tmp_path):
    from pretrain.data.errors import DataError
    from pretrain.data.indexed import preprocess
    from pretrain.data.tokenizer import train_tokenizer
    from pretrain.layout import resolve_layout
    from pretrain.preflight import check_data, check_memory, estimate_memory
    overrides = base_overrides(corpus, tmp_path / "run")

    def config(*extra):
        return load_config(TINY_CONFIG, [*overrides, *extra])
    # a typo in data.valid is found now, not at the end-of-run evaluation
    with pytest.raises(DataError, match=r"data.valid=.*vaild.*meta.json is missing"):
        check_data(config(f"data.valid={corpus / 'vaild'}"), verify_checksums=True)
    # token files made with another tokenizer of the same vocabulary size (257, byte-level, other options)
    other = tmp_path / "other-tok"
    train_tokenizer("word", [corpus / "train.txt"], other, max_size=256)
    assert json.loads((other / "lamemo_tokenizer.json").read_text())["vocab_size"] <= 257
    preprocess([corpus / "train.txt"], other, tmp_path / "foreign", workers=1, progress=False)
    with pytest.raises(DataError, match="different tokenizer"):
        check_data(config(f"data.valid={tmp_path / 'foreign'}"), verify_checksums=True)
    # sha256 at start-up (data.verify=auto: small files): a same-size corruption is caught
    import shutil
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(corpus / f"train{suffix}", tmp_path / f"copy{suffix}")
    data = bytearray((tmp_path / "copy.bin").read_bytes())
    data[10] ^= 2
    (tmp_path / "copy.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 does not match"):
        check_data(config(f"data.train={tmp_path / 'copy'}"), verify_checksums=True)
    check_data(config(f"data.train={tmp_path / 'copy'}", "data.verify=size"), verify_checksums=True)
    # memory: N = 100k tokens per segment is refused with the estimate, instead of allocating hundreds of GB
    big = config("data.tgt_len=100000", "data.mem_len=100000")
    big.model.vocab_size = 257
    layout = resolve_layout(big, 1, cuda=False)
    with pytest.raises(TrainConfigError, match="would need about .* GiB per rank"):
        check_memory(big, layout, torch.device("cpu"))
    # the estimate scales as documented: ZeRO-1 over 4 ranks divides the optimizer state by 4
    small = config()
    small.model.vocab_size = 257
    one = estimate_memory(small, resolve_layout(small, 1, cuda=False))
    small.parallel.zero_stage = 1
    four = estimate_memory(small, resolve_layout(small, 4, cuda=False))
    assert one.parameters == four.parameters == 9249 and four.optimizer == one.optimizer // 4


def test_dry_run_prints_the_plan_and_builds_nothing(corpus, tmp_path, capsys):
    from pretrain.train import main
    run_dir = tmp_path / "run"
    assert main(["--config", str(TINY_CONFIG), "--dry-run", *base_overrides(corpus, run_dir)]) == 0
    out = capsys.readouterr().out
    for expected in ("resolved config:", "tgt_len: 8", "layout: world 1 = tensor 1 x pipeline 1 x data 1",
                     "parameters per rank: stage 0: 9,249", "memory estimate:", "steps per epoch: "):
        assert expected in out, out
    assert not run_dir.exists()
    assert main(["--config", str(TINY_CONFIG), "--dry-run", *base_overrides(corpus, run_dir),
                 "data.micro_batch_size=0"]) == 2
    assert capsys.readouterr().err.strip() == "error: data.micro_batch_size must be >= 1, got 0"


def test_run_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from pretrain.run_lock import LOCK_NAME, RunLock, RunLockError
    from pretrain.tracking.metrics_rewind import rewind_metrics
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockError, match=f"in use by another trainer \\(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    messages = []
    taker = RunLock(tmp_path)
    taker.acquire(log=messages.append)
    assert any("taking over the stale lock" in m and "is gone" in m for m in messages)
    taker.release()
    # metrics past the resumed step move aside, so a fallback resume never repeats a step
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    assert rewind_metrics(tmp_path, 2) == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.rewound.jsonl").read_text().splitlines()] == [3, 4]


# ---------------------------------------------------------------------------------------------- launches
@pytest.mark.slow
@pytest.mark.distributed
def test_divergence_stops_cleanly_and_keeps_the_checkpoint_before_it(corpus, tmp_path):
    """optim.lr=1000 on the pipeline engine (2 stages): the first update wrecks the weights, every later step is
    a loss spike and is skipped, the third in a row stops the run with exit 3; the checkpoint written after the
    wrecking update is moved aside, nothing is exported."""
    run_dir = tmp_path / "run"
    result = launcher(2, [*base_overrides(corpus, run_dir), "parallel.pipeline=2", "optim.lr=1000",
                        "run.save_interval=1", "run.steps=10"])
    assert result.returncode == 3, result.stderr[-3000:]
    line = one_error(result)
    assert "training diverged at step 4: loss spike" in line and "first at step 2" in line, line
    assert "nothing exported" in line and "diverged" in line
    assert not (run_dir / "final").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["diverged"]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "diverged").iterdir()) == ["step_00000001"]
    steps = metric_steps(run_dir)
    assert steps == [1, 2, 3, 4]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 2, 3]
    status = run_status(run_dir)          # lamemo-status names the quarantined checkpoint
    assert status["state"] == "diverged" and status["checkpoints"]["quarantined"] == ["step_00000001"]
    assert status["step"] == 4 and status["export"] is None and status["lock"] is None
    assert "quarantined checkpoints/diverged/: step_00000001" in render(status)


@pytest.mark.slow
@pytest.mark.distributed
def test_non_finite_gradient_skips_the_update_under_zero(corpus, tmp_path):
    """NaN gradients injected on the last step (4; data parallel 2, ZeRO-2): the update is skipped on every rank,
    the final checkpoint's weights equal those after step 3 exactly, the run finishes and exports."""
    from pretrain.checkpoint.export import export_checkpoint
    run_dir = tmp_path / "run"
    result = launcher(2, [*base_overrides(corpus, run_dir), "parallel.zero_stage=2", "run.save_interval=1",
                        "run.steps=4", "run.keep_checkpoints=4"], env_extra={"LAMEMO_FAULT_NAN_STEPS": "4"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: step 4 skipped (non-finite gradient); weights unchanged" in result.stdout
    ckpts = run_dir / "checkpoints"
    after = {}
    for step in (3, 4):
        export_checkpoint(ckpts / f"step_{step:08d}", tmp_path / f"w{step}")
        after[step] = LaMemoModel.from_pretrained(tmp_path / f"w{step}").state_dict()
    assert all(torch.equal(after[3][k], after[4][k]) for k in after[3])
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert [r.get("skipped_steps", 0) for r in records] == [0, 0, 0, 1]
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_run_directory_reuse_and_resume_with_changed_settings(corpus, tmp_path):
    """One process: the trainer alone (as a user starts it), and under the project's launcher where the launcher
    is what is checked (a refused start is its one line)."""
    run_dir = tmp_path / "run"
    base = [*base_overrides(corpus, run_dir), "run.steps=4", "run.save_interval=1"]
    first = launch(1, [*base, "run.exit_after=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    # the newest checkpoint is damaged: the resume falls back to step 2 and steps 3.. are trained again, once
    (run_dir / "checkpoints" / "step_00000003" / "COMPLETE.json").unlink()
    again = launch(1, [*base, "optim.lr=0.001", "optim.weight_decay=0.01"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "optim.lr 0.003 -> 0.001" in again.stdout and "optim.weight_decay 0.0 -> 0.01" in again.stdout
    assert "resumed from" in again.stdout and "step_00000002" in again.stdout
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
               if "lr" in r}
    from pretrain.optim import lr_factor
    expected = 0.001 * lr_factor(2, total_steps=4, warmup_steps=0, schedule="cosine", lr=0.001, min_lr=0.0)
    assert records[3]["lr"] == pytest.approx(expected, rel=1e-9)
    # an unreachable MLflow server: retried for run.mlflow_connect_timeout_s, then one line; nothing is lost
    unreachable = launch(1, [*base, "run.mlflow=true", "run.mlflow_connect_timeout_s=2"],
                         env_extra={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 2 and "is not reachable" in one_error(unreachable)
    # a logger that cannot start (W&B refuses its settings): one line before step 1, nothing changed
    no_wandb = launch(1, [*base, "run.loggers=[wandb]"], env_extra={"WANDB_MODE": "bogus"})
    assert no_wandb.returncode == 2 and "cannot start the W&B run" in one_error(no_wandb)
    assert metric_steps(run_dir) == [1, 2, 3, 4] and (run_dir / "checkpoints" / "step_00000004").is_dir()
    # other data of the same size and tokenizer: refused before step 1 by name, and the refused start changes
    # nothing in the run directory (config, metrics, lock, checkpoints); run.data_changed=restart_streams
    # continues on it from position 0 with empty memory and says so
    from pretrain.data.indexed import preprocess
    (tmp_path / "other.txt").write_text((corpus / "train.txt").read_text()[::-1])
    preprocess([tmp_path / "other.txt"], corpus / "tok", tmp_path / "other", workers=1)
    assert json.loads((tmp_path / "other.meta.json").read_text())["num_tokens"] == \
        json.loads((corpus / "train.meta.json").read_text())["num_tokens"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    other_data = launcher(1, [*base, f"data.train={tmp_path / 'other'}", "run.steps=5"])
    line = one_error(other_data)
    assert other_data.returncode == 2 and "data.train" in line and "run.data_changed=restart_streams" in line
    # under the project's launcher that line is the only one (no ChildFailedError report, no summary)
    assert [x for x in other_data.stderr.splitlines() if x.startswith("error:")] == [line]
    assert "ChildFailedError" not in other_data.stderr
    assert "step 1/" not in other_data.stdout and "step 5/" not in other_data.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    restarted = launch(1, [*base, f"data.train={tmp_path / 'other'}", "run.steps=5",
                           "run.data_changed=restart_streams"])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "run.data_changed=restart_streams: data.train" in restarted.stdout and "position 0" in restarted.stdout
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5]
    # run.resume=never in a used directory: refused; with run.overwrite=true the old run is moved aside whole
    refused = launch(1, [*base, "run.resume=never"])
    assert refused.returncode == 2 and "run.overwrite=true" in one_error(refused)
    # ... and with run.overwrite=true but a start refused later (here: data.valid missing), nothing is moved
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refused_later = launch(1, [*base, "run.resume=never", "run.overwrite=true", f"data.valid={tmp_path / 'none'}"])
    assert refused_later.returncode == 2 and "data.valid" in one_error(refused_later)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    # a refused first start in a new directory leaves no directory behind
    new_dir = launch(1, [*base_overrides(corpus, tmp_path / "new"), f"data.valid={tmp_path / 'none'}"])
    assert new_dir.returncode == 2 and "data.valid" in one_error(new_dir) and not (tmp_path / "new").exists()
    fresh = launch(1, [*base, "run.resume=never", "run.overwrite=true", "run.steps=2"])
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step_00000005").is_dir()
    assert metric_steps(run_dir) == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


@pytest.mark.slow
@pytest.mark.distributed
def test_second_trainer_is_refused_and_sigterm_under_the_launcher_exits_zero(corpus, tmp_path):
    run_dir = tmp_path / "run"
    args = [*base_overrides(corpus, run_dir), "run.steps=100000", "run.log_interval=1"]
    job = subprocess.Popen(launcher_cmd(2, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                           cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(1)
        second = launcher(1, args)
        assert second.returncode == 2
        assert "is in use by another trainer" in one_error(second)
        running = run_status(run_dir)        # lamemo-status: the live trainer (rank 0) holds the lock
        assert running["state"] == "running" and running["lock"]["host"] == socket.gethostname()
        assert running["lock"]["pid"] != job.pid and running["total_steps"] == 100000 and running["step"] >= 1
        assert f"[running: pid {running['lock']['pid']} on" in render(running)
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=180)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "checkpoint saved, exiting cleanly" in out and "Traceback" not in err
    assert not (run_dir / "run.lock").exists()
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    assert int(newest.name.split("_")[1]) == metric_steps(run_dir)[-1]
    stopped = run_status(run_dir)
    assert stopped["state"] == "stopped" and stopped["lock"] is None
    assert stopped["checkpoints"]["newest"]["step"] == stopped["step"] == metric_steps(run_dir)[-1]
