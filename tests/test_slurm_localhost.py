"""scripts/slurm_localhost.sh: start gives an idle node; stop leaves no job, daemon or scratch behind."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from slurm_fixtures import LOCALHOST_SCRIPT, start_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_gives_an_idle_node_and_stop_cancels_jobs_and_ends_every_daemon(tmp_path):
    scratch = tmp_path / "cluster"
    cluster = start_cluster(scratch)
    try:
        status = subprocess.run(
            ["bash", str(LOCALHOST_SCRIPT), "status"], env=cluster.env, capture_output=True, text=True
        )
        assert "node localhost: idle" in status.stdout
        daemons = {
            name: int((scratch / f"{name}.pid").read_text()) for name in ("slurmctld", "slurmd", "munged")
        }
        pid_file = tmp_path / "job.pid"
        job = cluster.sbatch(
            None, f"--wrap=echo $$ > {pid_file}; exec sleep 300", "--output=/dev/null", cwd=tmp_path
        )
        cluster.wait_for(job, {"RUNNING"}, timeout=30)
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.2)
        job_pid = int(pid_file.read_text())
        assert _alive(job_pid)
    finally:
        cluster.stop()
    # The job must not survive the cluster (scontrol shutdown alone leaves it running under linuxproc).
    assert not _alive(job_pid), "the job's process survived stop"
    assert not [name for name, pid in daemons.items() if _alive(pid)], "a daemon survived stop"
    assert not scratch.exists(), "the scratch folder must go so that the next start is clean"
