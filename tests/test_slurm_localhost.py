"""scripts/slurm_localhost.sh: start gives an idle node; stop leaves no job, daemon or scratch behind."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

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
    # A deep scratch folder: a spool inside it would give slurmstepd a Unix socket path over 108 bytes
    # (<spool>/localhost_<job>.4294967291), and no job would launch.
    scratch = tmp_path / ("deep" * 12) / "cluster"
    assert len(f"{scratch}/spool/localhost_1.4294967291") > 108
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
        spool = Path(re.search(r"^SlurmdSpoolDir=(.+)$", (scratch / "slurm.conf").read_text(), re.M)[1])
        assert not spool.is_relative_to(scratch)
        spool_used = any(spool.iterdir())  # slurmd's state and the job's step sockets
    finally:
        cluster.stop()
    # The job must not survive the cluster (scontrol shutdown alone leaves it running under linuxproc).
    assert not _alive(job_pid), "the job's process survived stop"
    assert not [name for name, pid in daemons.items() if _alive(pid)], "a daemon survived stop"
    assert not scratch.exists(), "the scratch folder must go so that the next start is clean"
    assert spool_used and not spool.exists(), "slurmd's spool (outside the scratch folder) must go too"


def test_two_node_cluster_has_a_hostname_and_address_per_node_and_stop_removes_every_trace(tmp_path):
    """BEIT3_SLURM_NODES=2: one network namespace per node (own hostname, address, slurmd); a job on both
    nodes sees two hosts that resolve each other. stop ends the daemons and removes namespaces, bridge and
    per-node hosts files, also when the job is still running."""
    scratch = tmp_path / "cluster2"
    cluster = start_cluster(scratch, nodes=2)
    out = tmp_path / "hosts.out"
    script = tmp_path / "hosts.sh"
    # Each task: its hostname and the addresses of both node names, then the job stays running.
    script.write_text(
        "#!/bin/bash\n"
        "addr() { getent hosts $1 | cut -d' ' -f1; }; export -f addr\n"
        "srun bash -c 'echo $(hostname) $(addr b3n1) $(addr b3n2)'\n"
        "exec sleep 300\n"
    )
    try:
        daemons = [int(p.read_text()) for p in scratch.glob("*.pid")]
        assert len(daemons) == 4, "slurmctld, munged and one slurmd per node"
        job = cluster.sbatch(script, "--nodes=2", "--ntasks-per-node=1", f"--output={out}", cwd=tmp_path)
        cluster.wait_for(job, {"RUNNING"}, timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.2)
        lines = sorted(out.read_text().splitlines())
        net = lines[0].split()[1].rsplit(".", 1)[0]
        assert lines == [f"b3n1 {net}.11 {net}.12", f"b3n2 {net}.11 {net}.12"], lines
        assert cluster.leftovers(), "the namespaces exist while the cluster runs"
    finally:
        cluster.stop()
    assert not cluster.leftovers(), "stop left namespaces, the bridge or hosts files behind"
    assert not [pid for pid in daemons if _alive(pid)], "a daemon survived stop"
    assert not scratch.exists()
    assert "b3n1" not in Path("/etc/hosts").read_text(), "the machine's /etc/hosts is never edited"
