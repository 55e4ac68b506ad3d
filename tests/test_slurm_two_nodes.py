"""Two Slurm nodes on one machine, made of network namespaces (scripts/slurm_localhost.sh with
BEIT3_SLURM_NODES=2): each node has its own hostname, address and slurmd; the controller listens on the
bridge between them. The sbatch scripts run across both nodes with 1 rank per node over gloo.

- the real beit3-pretrain: rendezvous from the node list (MASTER_ADDR = the first node, resolved inside the
  nodes), one rank per node, USR1 to the batch shell forwarded to the ranks on both nodes, checkpoint, exit 75
  on every node, requeue, and a resumed run whose losses equal an uninterrupted run's exactly;
- a rank stopped (SIGSTOP) on the second node: the first node's watchdog dumps stacks and exits 76, the batch
  shell kills the stopped rank after a grace, the job is requeued as a hang and resumes from its checkpoint;
- a rank killed by SIGKILL: the node it ran on is excluded and the requeued job runs on the other one.

If the kernel refuses namespaces, the module skips with the kernel's reason (also under CI).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from engine_helpers import tensorboard_scalars
from slurm_fixtures import (
    REPO,
    SlurmCluster,
    pretrain_args,
    read_attempts,
    start_cluster,
    wait_for_text,
    write_pretrain_data,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# One task per node, one CPU each (every node declares the machine's CPUs, so two such jobs run at once).
TWO_NODE_JOB = [
    "--nodes=2",
    "--ntasks=2",
    "--ntasks-per-node=1",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=10",
    "--signal=B:USR1@5",
]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A two-node cluster for the module; torn down (daemons, namespaces, bridge, hosts files) even if a
    test fails, and checked to leave nothing behind."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()
    assert not cluster.leftovers(), f"the two-node cluster left {cluster.leftovers()}"


def submit(cluster: SlurmCluster, run_dir: Path, log: Path, *sbatch_args: str, **env: str) -> int:
    """pretrain_giant.sbatch as a CPU job on both nodes (``sbatch_args`` win); the stand-in trainer unless
    ``env`` names another module."""
    job_env = {
        "BEIT3_MODULE": "slurm_fixtures",
        "PYTHONPATH": str(REPO / "tests"),
        "BEIT3_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    return cluster.sbatch(
        REPO / "slurm" / "pretrain_giant.sbatch",
        *TWO_NODE_JOB,
        *sbatch_args,
        f"--job-name={log.stem}",
        f"--output={log}",
        env=job_env,
    )


def task_records(run_dir: Path, job: int, restart: int) -> dict[str, tuple[str, str]]:
    """Task id -> (node, exit code), as slurm/task.sh left them for one attempt."""
    folder = run_dir / "logs" / "tasks" / f"{job}.{restart}"
    return {f.name: tuple(f.read_text().split()) for f in folder.iterdir()}


def test_pretraining_across_two_nodes_preempts_requeues_and_resumes_exactly(two_nodes, tmp_path):
    """Real beit3-pretrain, 1 rank per node over gloo, preempted at step 3 by a USR1 to the batch shell.

    An uninterrupted run of the same job runs beside it; the resumed run's losses must equal its losses.
    The tiny model's steps take a fraction of a second: 24 of them leave the signal, sent once step 3 is
    logged, seconds to arrive before the run would have finished."""
    steps = 24
    data = write_pretrain_data(tmp_path / "data")
    program = {
        "BEIT3_MODULE": "beit3.pretrain.train",
        "BEIT3_RECIPE": "pretrain/recipes/demo.toml",
        "BEIT3_DS_CONFIG": "ds_configs/zero3_fp32.json",
        "BEIT3_EXTRA_ARGS": pretrain_args(data, steps),
        "PYTHONWARNINGS": "ignore",
    }
    ref_dir, ref_log = tmp_path / "reference", tmp_path / "reference.out"
    run_dir, log = tmp_path / "preempted", tmp_path / "preempted.out"
    reference = submit(two_nodes, ref_dir, ref_log, **program)
    job = submit(two_nodes, run_dir, log, **program)

    wait_for_text(log, rf"step 3/{steps} ", timeout=240)
    two_nodes.signal_batch(job, "USR1")
    info = two_nodes.wait_for(job, DONE, timeout=300)
    ref_info = two_nodes.wait_for(reference, DONE, timeout=300)
    text = log.read_text()
    assert ref_info["JobState"] == "COMPLETED", (ref_info, ref_log.read_text()[-3000:])
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])

    # Rendezvous from the node list: the first node, whose name only resolves inside the nodes.
    assert info["NodeList"] == "b3n[1-2]" and "MASTER_ADDR=b3n1 " in text
    # The signal reached the rank on each node: both checkpointed and exited 75; then both finished.
    assert task_records(run_dir, job, 0) == {"0": ("b3n1", "75"), "1": ("b3n2", "75")}
    assert task_records(run_dir, job, 1) == {"0": ("b3n1", "0"), "1": ("b3n2", "0")}
    rows = read_attempts(run_dir)
    assert [(r["restart"], r["exit_code"], r["reason"], r["decision"]) for r in rows] == [
        ("0", "75", "preempted", "requeue"),
        ("1", "0", "finished", "finished"),
    ]
    first, second = text.split("SLURM_RESTART_COUNT=1", 1)
    stopped_at = max(int(n) for n in re.findall(rf"^step (\d+)/{steps} ", first, re.M))
    assert 3 <= stopped_at < steps and rows[0]["last_step"] == str(stopped_at)
    resumed = [int(n) for n in re.findall(rf"^step (\d+)/{steps} ", second, re.M)]
    assert resumed == list(range(stopped_at + 1, steps + 1)), "the requeued job did not resume"

    assert (run_dir / "checkpoints" / f"step{stopped_at:08d}").is_dir(), "no checkpoint at the preemption"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{steps:08d}"
    assert (run_dir / "config.json").is_file()
    assert (run_dir / "logs" / log.name).resolve() == log, "the console log is not linked from the run dir"

    expected = tensorboard_scalars(ref_dir, "loss/total")
    got = tensorboard_scalars(run_dir, "loss/total")
    assert sorted(expected) == list(range(1, steps + 1))
    assert got == expected, "the resumed run's losses differ from the uninterrupted run's"


def test_a_rank_killed_on_one_node_excludes_that_node_from_the_requeued_job(two_nodes, tmp_path):
    """A one-node job (2 ranks) whose rank 1 dies of SIGKILL: node fault, the node is excluded
    (ExcNodeList, set while the requeued job is pending) and the next attempt runs on the other node."""
    run_dir, log = tmp_path / "run", tmp_path / "exclude.out"
    settings = ("steps=8", "step_time=0.1", "save_every=2", "fault_at_step=3", "fault_rank=1")
    settings += ("fault_signal=9", "fault_attempts=1")
    job = submit(
        two_nodes,
        run_dir,
        log,
        "--nodes=1",
        "--ntasks-per-node=2",
        BEIT3_EXTRA_ARGS=" ".join(f"--set standin.{item}" for item in settings),
    )
    info = two_nodes.wait_for(job, DONE, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    first, second = read_attempts(run_dir)
    assert (first["exit_code"], first["reason"], first["decision"]) == ("137", "node_fault", "requeue")
    failed = first["nodes"]
    assert failed in ("b3n1", "b3n2") and first["failed_nodes"] == failed
    assert second["nodes"] == ({"b3n1", "b3n2"} - {failed}).pop(), "the requeued job ran on the failed node"
    assert second["reason"] == "finished" and second["last_step"] == "8"
    assert info["ExcNodeList"] == failed, info
    assert f"excluding {failed} from the requeued job" in text
    assert "resumed_from=2" in text.split("SLURM_RESTART_COUNT=1", 1)[1]


def test_a_rank_stopped_on_one_node_ends_in_stack_dumps_and_a_requeue_as_a_hang(two_nodes, tmp_path):
    """Real beit3-pretrain on two nodes; the rank on b3n2 is stopped (SIGSTOP) after step 3. The watchdog of
    the rank on b3n1 (BEIT3_WATCHDOG_S=20, passed on by the sbatch script) dumps its stacks and exits 76; 5 s
    later (BEIT3_HUNG_GRACE_S) the batch shell kills the stopped rank; the attempt counts as a hang against
    the failure budget, is requeued and resumes from its last checkpoint, within the limit plus a minute.
    The tiny model's steps take a fraction of a second: 24 of them leave the stop, sent once step 3 is logged,
    time to land before the run would have finished."""
    steps = 24
    data = write_pretrain_data(tmp_path / "data")
    run_dir, log = tmp_path / "run", tmp_path / "hang.out"
    args = pretrain_args(data, steps) + " --set train.save_every=2"
    job = submit(
        two_nodes,
        run_dir,
        log,
        BEIT3_MODULE="beit3.pretrain.train",
        BEIT3_RECIPE="pretrain/recipes/demo.toml",
        BEIT3_DS_CONFIG="ds_configs/zero3_fp32.json",
        BEIT3_EXTRA_ARGS=args,
        BEIT3_WATCHDOG_S="20",
        BEIT3_HUNG_GRACE_S="5",
        PYTHONWARNINGS="ignore",
    )
    wait_for_text(log, rf"step 3/{steps} ", timeout=240)
    beat = json.loads((run_dir / "heartbeat" / "rank00001.json").read_text())
    assert beat["host"] == "b3n2", beat
    os.kill(beat["pid"], signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for_text(log, r"requeueing job", timeout=20 + 60)
        hung_for = time.monotonic() - stopped_at
        info = two_nodes.wait_for(job, DONE, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(beat["pid"], signal.SIGKILL)  # never leave a stopped process behind a failed test
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    first, second = read_attempts(run_dir)
    assert (first["reason"], first["decision"], first["failed_nodes"]) == ("hung", "requeue", "b3n2"), first
    # the last checkpoint (every 2 steps) before the stop, which came after step 3
    last = int(first["last_step"])
    assert last % 2 == 0 and 2 <= last < steps and second["reason"] == "finished", (first, second)
    # rank 0 exited 76 on b3n1; the stopped rank left no record (it was killed)
    assert task_records(run_dir, job, 0) == {"0": ("b3n1", "76")}
    dumps = list((run_dir / "hang").glob("rank00000-*.txt"))
    assert dumps and "Thread" in dumps[0].read_text(), "no stack dump from the rank that waited"
    assert "rank 1 (pid" in text and "on b3n2" in text, "the log does not say which rank is behind"
    assert "failure 1 of BEIT3_MAX_FAILURES=3" in text
    assert "not excluding b3n2: the partition would keep 1 node(s) for a 2-node job" in text
    resumed = [
        int(n) for n in re.findall(rf"^step (\d+)/{steps} ", text.split("SLURM_RESTART_COUNT=1", 1)[1], re.M)
    ]
    assert resumed == list(range(int(first["last_step"]) + 1, steps + 1)), resumed
    print(f"stopped rank -> requeue decision in {hung_for:.0f} s")
