"""The sbatch scripts under a real Slurm (scripts/slurm_localhost.sh): submitted with sbatch as 2 CPU tasks.

Each test overrides the #SBATCH lines the way docs/slurm.md tells a CPU user to, and runs the training step
with the stand-in trainer of tests/slurm_fixtures.py (same contract as beit3-pretrain, seconds instead of
minutes). Preemption is triggered with ``scancel --batch --signal=USR1``, which is what ``--signal=B:USR1@T``
does at the time limit.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from engine_helpers import tensorboard_scalars
from slurm_fixtures import (
    REPO,
    SlurmCluster,
    read_attempts,
    start_cluster,
    wait_for_text,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SLURM = REPO / "slurm"
# Two CPU tasks on one node, no GPU; a time limit far from the signal so that only the test sends USR1.
CPU_JOB = [
    "--nodes=1",
    "--ntasks=2",
    "--ntasks-per-node=2",
    "--cpus-per-task=1",
    "--gpus-per-node=0",
    "--time=10",
    "--signal=B:USR1@5",
]


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """One localhost cluster for the module (fails under CI=true if Slurm cannot start)."""
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


def submit(
    cluster: SlurmCluster, script: str, tmp_path: Path, name: str, *sbatch_args: str, **env: str
) -> tuple[int, Path, Path]:
    """Submit slurm/<script> as a CPU job; returns (job id, console log, run dir).

    The program is the stand-in trainer unless ``env`` says otherwise; ``sbatch_args`` win over CPU_JOB.
    """
    run_dir = tmp_path / "run"
    log = tmp_path / f"slurm-{name}.out"
    job_env = {
        "BEIT3_MODULE": "slurm_fixtures",
        "PYTHONPATH": str(REPO / "tests"),
        "BEIT3_RUN_DIR": str(run_dir),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    job_id = cluster.sbatch(
        SLURM / script, *CPU_JOB, *sbatch_args, f"--job-name={name}", f"--output={log}", env=job_env
    )
    return job_id, log, run_dir


def attempts(run_dir: Path) -> list[tuple[str, str, str]]:
    """(restart count, exit code, decision) per attempt, from RUN_DIR/attempts.tsv (checked line by line)."""
    return [(row["restart"], row["exit_code"], row["decision"]) for row in read_attempts(run_dir)]


def tensorboard_steps(run_dir: Path, tag: str) -> set[int]:
    return set(tensorboard_scalars(run_dir, tag))


# Preemption of the real pretraining program through pretrain_giant.sbatch (USR1 -> checkpoint, exit 75,
# requeue, exact resume, the run directory's records) is tests/test_slurm_two_nodes.py's first test.


def shapes_recipe(root: Path, steps: int) -> Path:
    """A finetuning recipe for the tiny model on generated shapes data (no download), with its tokenizer."""
    from tiny_data import shapes_recipe as write_recipe
    from tiny_data import shapes_spm

    return Path(
        write_recipe(
            root / "shapes_classification.toml", shapes_spm(root), "image_classification",
            model={"drop_path_rate": 0.1},
            data={"max_train": 48, "max_eval": 16},
            train={"total_steps": steps, "warmup_steps": 2, "log_every": 2, "save_every": 4},
        )
    )  # fmt: skip


def test_finetune_job_trains_the_real_program_to_completion(slurm_cluster, tmp_path):
    """Real beit3-finetune (tiny model, shapes data, ZeRO-0 fp32, 2 gloo ranks) via finetune.sbatch."""
    job, log, run_dir = submit(
        slurm_cluster,
        "finetune.sbatch",
        tmp_path,
        "finetune",
        BEIT3_TASK="shapes",
        BEIT3_MODULE="beit3.finetune.train",
        BEIT3_RECIPE=str(shapes_recipe(tmp_path, steps=8)),
        BEIT3_DS_CONFIG="ds_configs/zero0_fp32.json",
        BEIT3_EXTRA_ARGS="--ds-set train_micro_batch_size_per_gpu=4",
        PYTHONWARNINGS="ignore",
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=150)
    assert info["JobState"] == "COMPLETED", (info, log.read_text()[-3000:])
    assert attempts(run_dir) == [("0", "0", "finished")]
    assert tensorboard_steps(run_dir, "loss/cls") == {2, 4, 6, 8}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000008"
    assert (run_dir / "eval.json").is_file() and (run_dir / "model.pth").is_file()


def test_job_failing_with_a_real_error_is_not_requeued(slurm_cluster, tmp_path):
    job, log, run_dir = submit(
        slurm_cluster,
        "finetune.sbatch",
        tmp_path,
        "fails",
        BEIT3_TASK="vqav2_base",
        BEIT3_EXTRA_ARGS="--set standin.fail_at_step=3 --set standin.step_time=0.1",
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert info["ExitCode"] == "1:0"
    assert f"--config {REPO}/finetune/recipes/vqav2_base.toml" in log.read_text(), (
        "BEIT3_TASK picks the recipe"
    )
    assert "stand-in failure at step 3" in log.read_text()
    assert "not requeued" in log.read_text()
    assert attempts(run_dir) == [("0", "1", "failed")]


def test_finetune_script_refuses_to_start_without_a_task(slurm_cluster, tmp_path):
    job, log, _ = submit(slurm_cluster, "finetune.sbatch", tmp_path, "notask")
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0"
    assert "BEIT3_TASK is not set" in log.read_text()


def test_time_limit_signal_checkpoints_and_the_requeue_cap_ends_the_loop(slurm_cluster, tmp_path):
    """The real time-limit path: Slurm sends B:USR1 50 s before a 1-minute limit (it checks every 30 s)."""
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_base_ablation.sbatch",
        tmp_path,
        "cap",
        "--time=1",
        "--signal=B:USR1@50",
        BEIT3_MAX_REQUEUES="0",
        BEIT3_EXTRA_ARGS="--set standin.steps=2000 --set standin.step_time=0.1",
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=90)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "75:0", info
    assert "USR1 received" in text and "requeues are used up" in text
    # Slurm checks the time every 30 s: on a loaded machine the signal can come before the step started
    # (then nothing was trained and nothing is saved; test_usr1_before_the_step_starts_... covers that path).
    if "came before the training step started" not in text:
        assert "preempted at step" in text
        assert (run_dir / "checkpoints" / "latest").exists(), "the checkpoint must be kept for a resubmission"
    assert attempts(run_dir) == [("0", "75", "cap")]


def test_usr1_before_the_step_starts_is_a_preemption_not_a_dead_batch_shell(slurm_cluster, tmp_path):
    """USR1 while the job is still setting up (here: a site set-up script that takes its time) used to kill
    the batch shell (job FAILED with signal 10, no requeue). Now: the step is not started, the attempt is a
    preemption, requeued within the cap, and the requeued attempt trains to the end."""
    ready, setup = tmp_path / "setting-up", tmp_path / "env.sh"
    setup.write_text(f"touch {ready}\nif [[ ${{SLURM_RESTART_COUNT:-0}} == 0 ]]; then sleep 8; fi\n")
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_base_ablation.sbatch",
        tmp_path,
        "early",
        BEIT3_ENV_SETUP=str(setup),
        BEIT3_MAX_REQUEUES="1",
        BEIT3_EXTRA_ARGS="--set standin.steps=3 --set standin.step_time=0.1",
    )
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.exists(), log.read_text() if log.exists() else "the job never started"
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-2000:])
    assert "came before the training step started: not starting it" in text
    assert attempts(run_dir) == [("0", "75", "requeue"), ("1", "0", "finished")]


def test_scancel_ends_the_job_with_a_checkpoint_and_no_requeue(slurm_cluster, tmp_path):
    """scancel sends TERM to the batch shell and every step process: checkpoint, exit 75, but no requeue."""
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_giant.sbatch",
        tmp_path,
        "cancel",
        BEIT3_EXTRA_ARGS="--set standin.steps=2000 --set standin.step_time=0.1 --set standin.save_every=1000",
    )
    wait_for_text(log, r"step 3 ", timeout=60)
    subprocess.run(["scancel", str(job)], env=slurm_cluster.env, check=True, timeout=30)
    info = slurm_cluster.wait_for(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    wait_for_text(log, r"preempted at step \d+ by SIGTERM", timeout=10)
    assert (run_dir / "checkpoints" / "latest").exists()
    assert attempts(run_dir) == [("0", "75", "cancelled")]


def test_deepspeed_launcher_path_preempts_and_resumes(slurm_cluster, tmp_path):
    """One deepspeed launcher per node (ignoring USR1) starting 2 ranks; the ranks checkpoint and exit 75."""
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm-ds.out"
    job = slurm_cluster.sbatch(
        SLURM / "pretrain_giant.sbatch",
        "--nodes=1",
        "--ntasks=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--gpus-per-node=0",
        "--time=10",
        "--signal=B:USR1@5",
        "--job-name=ds",
        f"--output={log}",
        env={
            "BEIT3_LAUNCHER": "deepspeed",
            "BEIT3_GPUS_PER_NODE": "2",
            "BEIT3_MODULE": "slurm_fixtures",
            "PYTHONPATH": str(REPO / "tests"),
            "BEIT3_RUN_DIR": str(run_dir),
            "BEIT3_EXTRA_ARGS": "--set standin.steps=15 --set standin.step_time=0.2",
            "OMP_NUM_THREADS": "1",
        },
    )
    wait_for_text(log, r"step 3 ", timeout=90)
    slurm_cluster.signal_batch(job, "USR1")
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert "standin rank=1 world=2" in text, "the launcher did not start 2 ranks"
    assert "preempted at step" in text and "finished at step 15" in text
    assert attempts(run_dir) == [("0", "75", "requeue"), ("1", "0", "finished")]
    assert (run_dir / "logs" / f"hostfile-{job}").read_text() == "localhost slots=2\n"


# --- requeue beyond preemption: hangs and node faults within a failure budget ------------------------------


def standin_args(*settings: str) -> str:
    """BEIT3_EXTRA_ARGS: a short stand-in run (8 steps of 0.1 s, a checkpoint every 2) plus ``settings``."""
    base = ("steps=8", "step_time=0.1", "save_every=2", *settings)
    return " ".join(f"--set standin.{item}" for item in base)


def test_a_hung_step_requeues_counts_a_failure_and_resumes(slurm_cluster, tmp_path):
    """Exit 76 (the watchdog's "hung") on the first attempt: requeued within the failure budget, resumed."""
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_giant.sbatch",
        tmp_path,
        "hung",
        BEIT3_EXTRA_ARGS=standin_args("fault_at_step=5", "fault_exit=76", "fault_attempts=1"),
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    rows = read_attempts(run_dir)
    assert [(r["restart"], r["exit_code"], r["reason"], r["decision"]) for r in rows] == [
        ("0", "76", "hung", "requeue"),
        ("1", "0", "finished", "finished"),
    ]
    assert {r["job_id"] for r in rows} == {str(job)}
    assert [r["last_step"] for r in rows] == ["4", "8"], (
        "last step: the checkpoint before the hang, then the end"
    )
    assert "failure 1 of BEIT3_MAX_FAILURES=3" in text
    assert "resumed_from=4" in text.split("SLURM_RESTART_COUNT=1", 1)[1]


def test_a_rank_killed_by_sigkill_requeues_as_a_node_fault(slurm_cluster, tmp_path):
    """Rank 1 dies of SIGKILL (the OOM killer's way), rank 0 then fails at its collective: a node fault.

    The one node of this cluster is named but not excluded: the requeued job would have nowhere to run."""
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_giant.sbatch",
        tmp_path,
        "killed",
        BEIT3_EXTRA_ARGS=standin_args(
            "fault_at_step=3", "fault_rank=1", "fault_signal=9", "fault_attempts=1"
        ),
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-3000:])
    rows = read_attempts(run_dir)
    assert [(r["exit_code"], r["reason"], r["decision"], r["failed_nodes"]) for r in rows] == [
        ("137", "node_fault", "requeue", "localhost"),
        ("0", "finished", "finished", "-"),
    ]
    assert "not excluding localhost: the partition would keep 0 node(s) for a 1-node job" in text
    assert info.get("ExcNodeList") in ("(null)", None), info


def test_the_failure_budget_stops_requeues(slurm_cluster, tmp_path):
    """A run that hangs on every attempt: with BEIT3_MAX_FAILURES=1 the second hang ends the job (76)."""
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_base_ablation.sbatch",
        tmp_path,
        "budget",
        BEIT3_MAX_FAILURES="1",
        BEIT3_EXTRA_ARGS=standin_args("fault_at_step=3", "fault_exit=76"),
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1" and info["ExitCode"] == "76:0", info
    assert [(r["restart"], r["reason"], r["decision"]) for r in read_attempts(run_dir)] == [
        ("0", "hung", "requeue"),
        ("1", "hung", "budget"),
    ]
    assert "the failure budget BEIT3_MAX_FAILURES=1" in text and "is used up" in text


def test_a_configuration_error_is_never_requeued(slurm_cluster, tmp_path):
    job, log, run_dir = submit(
        slurm_cluster,
        "pretrain_giant.sbatch",
        tmp_path,
        "config",
        BEIT3_EXTRA_ARGS=standin_args("fault_at_step=1", "fault_exit=2"),
    )
    info = slurm_cluster.wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=90)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "2:0", info
    assert [(r["exit_code"], r["reason"], r["decision"]) for r in read_attempts(run_dir)] == [
        ("2", "config", "failed")
    ]
    assert "(config): not requeued" in log.read_text()
