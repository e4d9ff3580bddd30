"""The local SLURM cluster of tools/slurm_local for the tests in this folder.

``setup.sh`` brings up munged, slurmctld and two slurmd daemons (node1, node2) on this machine, installing the
SLURM packages with apt-get where they are missing; it needs root. Where that is impossible (exit status 3:
not root, no apt-get, no package source) the SLURM tests skip with the script's reason -- except under CI
(``CI`` set), where they must run, so the same situation fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from helpers import ROOT

SLURM_LOCAL = ROOT / "tools" / "slurm_local"
IMPOSSIBLE = 3          # setup.sh's exit status when this machine cannot host the cluster


@pytest.fixture(scope="session")
def cluster():
    """2 nodes with 2 CPUs and 2 fake GPUs each (jobs get CUDA_VISIBLE_DEVICES; torch here is CPU-only)."""
    env = dict(os.environ, SLURM_LOCAL_NODES="2", SLURM_LOCAL_CPUS="2", SLURM_LOCAL_GPUS="2")
    setup = subprocess.run(["bash", str(SLURM_LOCAL / "setup.sh")], capture_output=True, text=True, timeout=900,
                           env=env)
    if setup.returncode == IMPOSSIBLE and not os.environ.get("CI"):
        reason = setup.stderr.strip().splitlines()[-1] if setup.stderr.strip() else "setup.sh exit 3"
        pytest.skip(f"no local SLURM cluster on this machine: {reason}")
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-4000:]
    yield
    stop = subprocess.run(["bash", str(SLURM_LOCAL / "stop.sh")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert stop.returncode == 0, stop.stderr[-2000:]


@pytest.fixture(autouse=True)
def _cancel_leftover_jobs():
    """A test that fails mid-job leaves its jobs running; cancel them so that the next test gets the nodes."""
    yield
    if shutil.which("squeue") is None:        # no cluster here (the tests skipped)
        return
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout.split()
    if queued:
        subprocess.run(["scancel", *queued], capture_output=True, text=True, timeout=30)
