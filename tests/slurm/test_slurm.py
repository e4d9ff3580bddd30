"""The real sbatch scripts in slurm/ on a real 2-node SLURM cluster (tools/slurm_local, started by the
``cluster`` fixture of this folder's conftest.py: munged, slurmctld and two slurmd daemons on this machine).
Every job is a tiny CPU run (gloo): 2 nodes x 2 trainer processes, data parallel 4 with ZeRO-1, dropout on, so
an exact resume needs the checkpoint's RNG states, data offset and memory.

Jobs are polled with `scontrol show job` (the cluster has no accounting) under bounded timeouts."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from lamemo_parallel import LaMemoModel

from helpers import ROOT, free_port, losses, subprocess_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed]

CONFIG = "configs/tiny-cpu.yaml"
STEPS = 80
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE"}


def overrides(corpus, run_dir, *extra):
    return [f"data.train={corpus / 'train'}", "data.valid=", f"data.tokenizer={corpus / 'tok'}", f"run.dir={run_dir}",
            f"run.steps={STEPS}", "data.tgt_len=8", "data.mem_len=8", "data.micro_batch_size=2",
            "data.micro_batches=2", "model.n_layer=2", "model.d_model=16", "model.n_head=4", "model.d_inner=32",
            "model.dropout=0.1", "model.dropatt=0.1", "optim.lr=0.003", "parallel.zero_stage=1", "run.mlflow=false",
            "run.log_interval=10", *extra]


@pytest.fixture(scope="module")
def direct(corpus, tmp_path_factory):
    """The same run launched directly: one torchrun, 4 processes, no SLURM."""
    run_dir = tmp_path_factory.mktemp("direct") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "pretrain.train", "--config", CONFIG, *overrides(corpus, run_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def sbatch(script, args, *options, env=None):
    """Submit one of our scripts from the repository root, as a user would; returns the job id. The job
    inherits this environment (sbatch's default --export=ALL); its trainers run this test's Python."""
    base = {k: v for k, v in os.environ.items() if k not in ("NPROC_PER_NODE", "LAUNCHER", "MASTER_PORT")}
    cmd = ["sbatch", "--parsable", *options, str(ROOT / "slurm" / script), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env=dict(base, PYTHON=sys.executable, **(env or {})))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_info(job):
    """``scontrol show job``'s fields. On a loaded machine an RPC to slurmctld now and then fails outright
    ("Zero Bytes were transmitted or received"): ask again rather than read that as the job's state."""
    for _ in range(10):
        result = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and "JobState=" in result.stdout:
            return dict(re.findall(r"(\w+)=(\S*)", result.stdout))
        time.sleep(1)
    pytest.fail(f"scontrol show job {job} keeps failing: {result.stderr.strip()}")


def wait_job(job, timeout):
    """Poll until the job has left the queue for good (a requeued job passes through PENDING again)."""
    end = time.monotonic() + timeout
    info = {}
    while time.monotonic() < end:
        info = job_info(job)
        if info.get("JobState") in DONE:
            return info
        time.sleep(0.25)
    subprocess.run(["scancel", job], timeout=30)
    pytest.fail(f"job {job} still {info.get('JobState')} after {timeout} s: {info}")


def two_by_two(log, name):
    """sbatch options: 2 nodes, one task per node (torchrun) with both of the node's CPUs."""
    return ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--job-name={name}", f"--output={log}"]


def usr1_after_steps(job, metrics, log, steps):
    """Wait until the run has logged ``steps`` steps, then USR1 to the batch script (checkpoint and requeue)."""
    end = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < end and job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-4000:] if log.exists() else job_info(job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)


TWO_PER_NODE = {"NPROC_PER_NODE": "2"}


def test_two_nodes_equal_direct_torchrun(cluster, corpus, direct, tmp_path):
    """torchrun on each of 2 nodes, c10d rendezvous on the first: the same losses as one local torchrun.
    Trainers per node come from --gpus-per-node (the GPU-cluster path); the trainer sees no usable GPU and
    picks gloo on CPU by itself."""
    log = tmp_path / "train.out"
    job = sbatch("pretrain.sbatch", [CONFIG, *overrides(corpus, tmp_path / "run")], *two_by_two(log, "t-2x2"),
                 "--gpus-per-node=2")
    info = wait_job(job, 240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    assert "--nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=node1:" in text   # the real command
    assert "layout: world 4 = tensor 1 x pipeline 1 x data 4" in text
    assert losses(tmp_path / "run") == losses(direct)      # bitwise: same world size, same reduction order
    assert sorted(losses(direct)) == list(range(1, STEPS + 1))


def test_usr1_checkpoints_requeues_and_resumes(cluster, corpus, direct, tmp_path):
    """USR1 to the batch script mid-run (what --signal=B:USR1@S does before the time limit): the trainers save
    a checkpoint and exit 0, the job requeues itself, the second start resumes and finishes. Export and
    evaluation jobs chained with afterok wait through the requeue."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    job = sbatch("pretrain.sbatch", [CONFIG, *overrides(corpus, run_dir)], *two_by_two(log, "t-requeue"),
                 env=TWO_PER_NODE)
    export = sbatch("export.sbatch", [run_dir, tmp_path / "export"], f"--dependency=afterok:{job}",
                    "--job-name=t-export", f"--output={tmp_path / 'export.out'}")
    evaluate = sbatch("evaluate.sbatch", [tmp_path / "export", "--tokens", corpus / "train", "--max-tokens", "2000",
                                          "--device", "cpu", "--json"],
                      f"--dependency=afterok:{export}", "--job-name=t-evaluate", f"--output={tmp_path / 'eval.out'}")
    metrics = run_dir / "metrics.jsonl"
    usr1_after_steps(job, metrics, log, 3)
    # the requeued job may start again once its old credential expires (setup.sh: cred_expire=5 s). Forcing it
    # earlier (scontrol update StartTime=now) makes slurmctld kill it: "Job credential revoked".
    info = wait_job(job, 240)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-4000:]
    stopped = int(re.search(r"stopping at step (\d+) on signal 10: checkpoint saved, exiting cleanly", text)[1])
    assert 3 <= stopped < STEPS
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in text
    assert losses(run_dir) == losses(direct)      # the combined curve, steps 1..STEPS, bitwise
    lines = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert lines == list(range(1, stopped + 1)) + list(range(stopped + 1, STEPS + 1))

    for chained, name in ((export, "export.out"), (evaluate, "eval.out")):
        done = wait_job(chained, 120)
        assert done["JobState"] == "COMPLETED", (tmp_path / name).read_text()[-3000:]
    assert f"exported step {STEPS} of" in (tmp_path / "export.out").read_text()
    exported = LaMemoModel.from_pretrained(tmp_path / "export").state_dict()
    reference = LaMemoModel.from_pretrained(direct / "final").state_dict()
    assert all(torch.equal(exported[k], reference[k]) for k in reference)
    report = json.loads(next(x for x in (tmp_path / "eval.out").read_text().splitlines() if x.startswith("{")))
    assert report["tokens"] == 1999 and 0 < report["loss"] < 6


def test_requeue_onto_one_node_keeps_the_memory(cluster, corpus, tmp_path):
    """2 nodes x 2 trainers; USR1 checkpoints and requeues the job while node2 is drained (a node going away),
    so the requeued job waits for a node that will not come; shrunk to 1 node (`scontrol update NumNodes=1`) it
    starts on node1 with 2 trainers. data.streams=8 keeps the 8 streams (micro-batches 1 -> 2 per rank), and
    every stream continues with its position and memory."""
    run_dir, log = tmp_path / "run", tmp_path / "train.out"
    args = overrides(corpus, run_dir, "run.steps=30", "model.dropout=0.0", "model.dropatt=0.0", "data.streams=8",
                     "data.micro_batches=1")
    job = sbatch("pretrain.sbatch", [CONFIG, *args], *two_by_two(log, "t-shrink"), env=TWO_PER_NODE)
    try:
        usr1_after_steps(job, run_dir / "metrics.jsonl", log, 3)
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=shrink-test"], check=True,
                       timeout=30)
        end = time.monotonic() + 180
        while (info := job_info(job)).get("Restarts") != "1" or info.get("JobState") != "PENDING":
            assert time.monotonic() < end and info.get("JobState") not in DONE, info
            time.sleep(0.25)
        # one node, one task (torchrun), that node's CPUs: SLURM keeps the submitted task and CPU counts otherwise
        subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1", "NumCPUs=2"], check=True,
                       timeout=30)
        info = wait_job(job, 300)
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], timeout=30)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1" and info["NumNodes"] == "1", text[-4000:]
    assert "layout: world 4 = tensor 1 x pipeline 1 x data 4" in text
    assert "layout: world 2 = tensor 1 x pipeline 1 x data 2" in text
    assert "resharding weights and optimizer state" in text and "all 8 streams keep their position and memory" in text
    assert sorted(losses(run_dir)) == list(range(1, 31))


def test_bad_config_and_impossible_layout_fail_fast(cluster, corpus, tmp_path):
    """Both fail before any compute, with the trainer's one-line message in the job's log, and are not requeued."""
    start = time.monotonic()
    missing = sbatch("pretrain.sbatch", ["configs/missing.yaml"], *two_by_two(tmp_path / "missing.out", "t-missing"),
                     env=TWO_PER_NODE)
    layout = sbatch("pretrain.sbatch", [CONFIG, *overrides(corpus, tmp_path / "run", "parallel.tensor=3")],
                    *two_by_two(tmp_path / "layout.out", "t-layout"), env=TWO_PER_NODE)
    # the other launcher: one srun task per trainer, 2 nodes x 2 tasks, ranks from SLURM_PROCID / SLURM_NTASKS;
    # the layout check runs after the process group is up, so "world size 4" proves the 2-node rendezvous
    per_task = sbatch("pretrain.sbatch", [CONFIG, *overrides(corpus, tmp_path / "run2", "parallel.tensor=3")],
                      "--nodes=2", "--ntasks-per-node=2", "--job-name=t-layout-srun",
                      f"--output={tmp_path / 'srun.out'}", env={"LAUNCHER": "srun", "OMP_NUM_THREADS": "1"})
    info = wait_job(missing, 60)
    text = (tmp_path / "missing.out").read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
    assert "error: config file not found: configs/missing.yaml" in text and "srun" not in text
    for job, name in ((layout, "layout.out"), (per_task, "srun.out")):
        info = wait_job(job, 120)
        text = (tmp_path / name).read_text()
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", text[-4000:]
        assert "error: impossible parallel layout: world size 4 is not divisible by tensor x pipeline = 3 x 1" in text
        assert str(ROOT / "pretrain") not in text and "step 1" not in text   # no frame of ours: a clean exit 2
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run2" / "checkpoints").exists()
    assert time.monotonic() - start < 150


def test_preprocess_array_job_writes_shards_read_as_one_source(cluster, corpus, tmp_path):
    """slurm/preprocess.sbatch as a 3-task array job: one shard per input line, named so that a glob reads them
    in the list's order; the shards together hold exactly the tokens of the whole text."""
    import numpy as np

    from pretrain.data.indexed import load_tokens, preprocess
    from pretrain.data.sources import load_sources, parse_sources
    text = (corpus / "train.txt").read_text()
    parts = [text[:20000], text[20000:40000], text[40000:]]
    for i, part in enumerate(parts):
        (tmp_path / f"part{i}.txt").write_text(part)
    (tmp_path / "inputs.txt").write_text("".join(f"{tmp_path / f'part{i}.txt'}\n" for i in range(3)))
    job = sbatch("preprocess.sbatch", [tmp_path / "inputs.txt", corpus / "tok", tmp_path / "web" / "train"],
                 "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path / 'pre-%a.out'}")
    for task in range(3):
        info = wait_job(f"{job}_{task}", 120)
        assert info["JobState"] == "COMPLETED", (tmp_path / f"pre-{task}.out").read_text()[-2000:]
    (source,) = load_sources(parse_sources([{"name": "web", "path": str(tmp_path / "web" / "train-*")}], "data.train"),
                             "data.train", load=load_tokens)
    assert source.prefixes == tuple(str(tmp_path / "web" / f"train-{i:05d}") for i in range(3))
    preprocess([tmp_path / f"part{i}.txt" for i in range(3)], corpus / "tok", tmp_path / "whole", workers=1,
               progress=False)
    whole = np.asarray(load_tokens(tmp_path / "whole"))
    assert len(source.tokens) == len(whole) and (source.tokens[np.arange(len(whole))] == whole).all()
