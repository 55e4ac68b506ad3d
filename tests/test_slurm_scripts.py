"""The sbatch scripts without a cluster: syntax, the cluster defaults they carry, and the shared shell library
(requeue decision, signal forwarding, rendezvous, DeepSpeed hostfile) exercised in real bash processes.

The jobs themselves run under a real Slurm in tests/test_slurm_jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from slurm_fixtures import in_ci, read_attempts

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "slurm" / "common.sh"
SBATCH_SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
SHELL_SCRIPTS = [
    *SBATCH_SCRIPTS,
    *sorted((REPO / "slurm").glob("*.sh")),
    REPO / "scripts" / "slurm_localhost.sh",
]


def sbatch_options(script: Path) -> dict[str, str]:
    """The ``#SBATCH --key=value`` lines of a script ("" for flags)."""
    options = {}
    for line in script.read_text().splitlines():
        found = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if found:
            options[found.group(1)] = found.group(2) or ""
    return options


def script_default(script: Path, name: str) -> str:
    """The value of ``: "${NAME:=value}"`` in a script."""
    found = re.search(r': "\$\{' + name + r':=([^}]*)\}"', script.read_text())
    assert found, f"{script.name} sets no default for {name}"
    return found.group(1)


def run_bash(
    snippet: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    """Run ``snippet`` in bash after sourcing slurm/common.sh."""
    return subprocess.run(
        ["bash", "-c", f"source {COMMON}\n{snippet}"],
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def slurm_conf(tmp_path) -> Path:
    """A minimal slurm.conf: enough for scontrol's local host-list expansion, no daemon needed."""
    if shutil.which("scontrol") is None:
        msg = "needs Slurm's scontrol: bash scripts/install.sh --tests"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n"
    )
    return conf


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_every_shell_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_delegate_to_the_shared_library(script):
    """One library, no copies: signal handling, requeue and launch exist only in common.sh."""
    text = script.read_text()
    assert "slurm/common.sh" in text and re.search(r"^beit3_main beit3\.\w+\.train$", text, re.M)
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for logic in (r"\btrap\b", r"scontrol requeue", r"\bsrun\b", r"MASTER_PORT=", r"\bdeepspeed\b"):
        assert not re.search(logic, code), (
            f"{script.name} duplicates {logic!r}: it belongs in slurm/common.sh"
        )


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_requeue_on_a_batch_signal_and_append_to_one_log(script):
    opts = sbatch_options(script)
    assert "requeue" in opts
    assert re.fullmatch(r"B:USR1@\d+", opts["signal"]), "the batch shell must get the signal, to forward it"
    assert opts["open-mode"] == "append", "a requeued job would truncate its console log"
    assert "%x" in opts["output"] and "%j" in opts["output"]
    assert opts["gpus-per-node"] == opts["ntasks-per-node"], "one process per GPU"


def test_giant_script_is_256_gpus_for_the_giant_recipe_and_its_batch():
    script = REPO / "slurm" / "pretrain_giant.sbatch"
    opts = sbatch_options(script)
    gpus = int(opts["nodes"]) * int(opts["gpus-per-node"])
    assert (int(opts["nodes"]), gpus) == (32, 256)
    recipe = tomllib.loads((REPO / script_default(script, "BEIT3_RECIPE")).read_text())
    assert recipe["model"]["name"] == "beit3_giant_patch14_224"
    ds = json.loads((REPO / script_default(script, "BEIT3_DS_CONFIG")).read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_micro_batch_size_per_gpu"] * gpus == ds["train_batch_size"] == 6144


def test_base_ablation_script_is_the_papers_base_setting():
    from beit3.model import get_config

    script = REPO / "slurm" / "pretrain_base_ablation.sbatch"
    opts = sbatch_options(script)
    gpus = int(opts["nodes"]) * int(opts["gpus-per-node"])
    recipe = tomllib.loads((REPO / script_default(script, "BEIT3_RECIPE")).read_text())
    cfg = get_config(recipe["model"]["name"])
    assert (cfg.depth, cfg.embed_dim, cfg.patch_size) == (12, 768, 16)
    assert recipe["train"]["total_steps"] == 200_000
    ds = json.loads((REPO / script_default(script, "BEIT3_DS_CONFIG")).read_text())
    accumulation = int(
        re.search(r"gradient_accumulation_steps=(\d+)", script_default(script, "BEIT3_EXTRA_ARGS"))[1]
    )
    assert ds["train_micro_batch_size_per_gpu"] * accumulation * gpus == 6144


@pytest.mark.parametrize(
    ("reason", "restarts", "terminating", "failures", "decision"),
    [
        ("finished", 0, 0, 0, "finished"),
        ("finished", 5, 0, 9, "finished"),
        ("preempted", 0, 0, 0, "requeue"),
        ("preempted", 2, 0, 0, "requeue"),
        ("preempted", 3, 0, 0, "cap"),
        ("preempted", 2, 0, 2, "requeue"),  # preemptions do not spend the failure budget
        ("preempted", 0, 1, 0, "cancelled"),
        ("hung", 0, 0, 0, "requeue"),
        ("hung", 1, 0, 1, "requeue"),
        ("hung", 2, 0, 2, "budget"),
        ("node_fault", 0, 0, 0, "requeue"),
        ("node_fault", 2, 0, 2, "budget"),
        ("node_fault", 3, 0, 0, "cap"),
        ("node_fault", 0, 1, 0, "cancelled"),
        ("config", 0, 0, 0, "failed"),
        ("nonfinite", 0, 0, 0, "failed"),
        ("error", 0, 0, 0, "failed"),
    ],
)
def test_requeue_decision(tmp_path, reason, restarts, terminating, failures, decision):
    """Preemptions requeue under the restart cap; hangs and node faults also within the failure budget
    (BEIT3_MAX_FAILURES=2, earlier failures counted from attempts.tsv); config, non-finite and real errors
    never; nothing while Slurm is ending the job."""
    lines = ["job_id\trestart\tstart\tend\texit_code\treason\tdecision\tlast_step\tnodes\tfailed_nodes"]
    lines += [f"41\t{i}\tt\tt\t76\thung\trequeue\t-\tn1\t-" for i in range(failures)]
    lines += ["41\t9\tt\tt\t75\tpreempted\trequeue\t-\tn1\t-"]  # preemptions are not failures
    lines += ["40\t0\tt\tt\t76\thung\trequeue\t-\tn1\t-"] * 5  # another job's failures do not count
    (tmp_path / "attempts.tsv").write_text("\n".join(lines) + "\n")
    proc = run_bash(
        f"BEIT3_RUN_DIR={tmp_path} SLURM_JOB_ID=41 BEIT3_MAX_REQUEUES=3 BEIT3_MAX_FAILURES=2 "
        f"SLURM_RESTART_COUNT={restarts} BEIT3_TERMINATING={terminating} beit3_decide {reason}"
    )
    assert proc.stdout.strip() == decision, proc.stderr


def classify(tmp_path: Path, rc: int, records: dict[int, tuple[str, int]], env: dict | None = None) -> list:
    """beit3_classify on task records {task id: (node, exit code)}; returns [reason, failed nodes]."""
    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    for task, (node, code) in records.items():
        (tasks / str(task)).write_text(f"{node}\t{code}\n")
    proc = run_bash(
        f'BEIT3_TASK_DIR={tasks}; beit3_classify {rc}; echo "$BEIT3_REASON|$BEIT3_FAILED_NODES"',
        env={"BEIT3_STEP_TASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split("|")


@pytest.mark.parametrize(
    ("rc", "codes", "reason", "failed"),
    [
        (0, (0, 0), "finished", ""),
        (75, (75, 75), "preempted", ""),
        (76, (76, 76), "hung", ""),
        (76, (76, 75), "hung", ""),  # one rank's watchdog fired while the other was stopping
        (2, (2, 2), "config", ""),
        (3, (3, 1), "nonfinite", ""),
        (1, (1, 1), "error", ""),
        (1, (75, 1), "error", ""),
        # rank 1 killed by the kernel (SIGKILL) on n2, rank 0 failed at its next collective: n2 is to blame
        (137, (1, 137), "node_fault", "n2"),
        (139, (139, 0), "node_fault", "n1"),  # a segfault
        (134, (134, 134), "node_fault", ""),  # every rank aborted (NCCL timeout): no node to blame
        (138, (138, 75), "node_fault", ""),  # died of our own USR1 before its handler: not the node's fault
        # rank 0's watchdog fired (76); rank 1, stopped, was then killed on n2: a hang, and n2 is behind
        (137, (76, 137), "hung", "n2"),
        (2, (2, 137), "config", "n2"),  # a configuration mistake is never requeued, whatever else happened
    ],
)
def test_classify_tells_faults_from_errors_by_every_tasks_exit_code(tmp_path, rc, codes, reason, failed):
    records = {task: (f"n{task + 1}", code) for task, code in enumerate(codes)}
    assert classify(tmp_path, rc, records) == [reason, failed]


def test_classify_blames_a_node_whose_task_left_no_record(tmp_path, slurm_conf):
    """A node that went away takes its task's record with it."""
    assert classify(tmp_path, 1, {0: ("n1", 1)}, env={"SLURM_CONF": str(slurm_conf)}) == ["node_fault", "n2"]


@pytest.mark.parametrize(
    ("rc", "reason"),
    [(0, "finished"), (2, "config"), (3, "nonfinite"), (75, "preempted"), (76, "hung"), (1, "error"),
     (137, "node_fault")],
)  # fmt: skip
def test_classify_without_task_records_reads_the_step_exit_code(tmp_path, rc, reason):
    assert classify(tmp_path, rc, {}) == [reason, ""]


def test_a_step_left_running_after_a_rank_hung_is_killed_after_the_grace(tmp_path):
    """A rank exits 76 while another stays stuck (stopped): srun would wait forever. The batch shell kills the
    step's remaining tasks (scancel --signal=KILL JOB.STEP) BEIT3_HUNG_GRACE_S after the 76 is recorded."""
    tasks, bin_dir = tmp_path / "tasks", tmp_path / "bin"
    tasks.mkdir()
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/bash\necho 5.0\necho 5.batch\n")
    (bin_dir / "scancel").write_text(
        f'#!/bin/bash\necho "$@" > {tmp_path}/scancel\nkill -9 $(cat {tmp_path}/pid)\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    step = tmp_path / "step.sh"  # records 76 for task 0, then stays stuck as a stopped rank would
    step.write_text(f"echo $$ > {tmp_path}/pid\nprintf 'n1\\t76\\n' > {tasks}/0\nexec sleep 60\n")
    start = time.monotonic()
    proc = run_bash(
        f"BEIT3_TASK_DIR={tasks} SLURM_JOB_ID=5 BEIT3_HUNG_GRACE_S=2\n"
        f"rc=0; beit3_run_step bash {step} || rc=$?; echo rc=$rc",
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    elapsed = time.monotonic() - start
    assert proc.stdout.strip().splitlines()[-1] == "rc=137", proc.stdout + proc.stderr
    assert (tmp_path / "scancel").read_text().split() == ["--signal=KILL", "5.0"]
    assert 2 <= elapsed < 15, elapsed
    assert "killing its remaining tasks" in proc.stdout


def test_an_srun_that_outlives_the_kill_is_cancelled_then_killed(tmp_path):
    """srun can wait on after its tasks got SIGKILL (a task's exit message that never comes from a slow or
    lost node, a process that kept the step's output open). Each further grace period escalates: the step is
    cancelled, then srun itself is killed, and the batch shell goes on with the records it has."""
    tasks, bin_dir = tmp_path / "tasks", tmp_path / "bin"
    tasks.mkdir()
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/bash\necho 5.0\necho 5.batch\n")
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scancel\n')  # changes nothing
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    step = tmp_path / "step.sh"  # records 76 for task 0, then waits as an srun that never hears back would
    step.write_text(f"printf 'n1\\t76\\n' > {tasks}/0\nexec sleep 60\n")
    start = time.monotonic()
    proc = run_bash(
        f"BEIT3_TASK_DIR={tasks} SLURM_JOB_ID=5 BEIT3_HUNG_GRACE_S=1\n"
        f"rc=0; beit3_run_step bash {step} || rc=$?; echo rc=$rc",
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    elapsed = time.monotonic() - start
    assert proc.stdout.strip().splitlines()[-1] == "rc=137", proc.stdout + proc.stderr
    calls = (tmp_path / "scancel").read_text().splitlines()
    assert calls == ["--signal=KILL 5.0", "5.0"], calls
    assert 3 <= elapsed < 20, elapsed
    for said in ("killing its remaining tasks", "cancelling the step", "killing srun"):
        assert said in proc.stdout, proc.stdout


def test_task_wrapper_records_node_and_exit_code_and_survives_the_step_signals(tmp_path):
    """slurm/task.sh outlives USR1 sent to the whole step and records what ended its program."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    child = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "BEIT3_TASK_DIR": str(tasks), "SLURMD_NODENAME": "gpu7"}
    task = subprocess.Popen(
        ["bash", str(REPO / "slurm" / "task.sh"), sys.executable, "-c", child],
        env={**env, "SLURM_PROCID": "3"},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert task.stdout.readline().strip() == "ready"
    os.killpg(task.pid, signal.SIGUSR1)  # what srun does: every process of the step
    assert task.wait(timeout=20) == 75
    assert (tasks / "3").read_text() == "gpu7\t75\n"

    killed = subprocess.run(
        ["bash", str(REPO / "slurm" / "task.sh"), sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
        env={**env, "SLURM_PROCID": "4"},
        timeout=30,
    )
    assert killed.returncode == 137
    assert (tasks / "4").read_text() == "gpu7\t137\n"


def test_attempts_file_has_a_header_and_one_line_per_attempt_with_the_last_step(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00001000")
    proc = run_bash(
        f"BEIT3_RUN_DIR={tmp_path} SLURM_JOB_ID=12 SLURM_JOB_NODELIST=n[1-2]\n"
        "BEIT3_ATTEMPT_START=$(beit3_now)\n"
        "beit3_record_attempt 76 hung requeue\n"
        "SLURM_RESTART_COUNT=1 BEIT3_FAILED_NODES=n2 beit3_record_attempt 0 finished finished\n"
        "beit3_failures_so_far"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1", "the hung attempt counts against the failure budget"
    rows = read_attempts(tmp_path)
    assert [(r["job_id"], r["restart"], r["exit_code"], r["reason"], r["decision"]) for r in rows] == [
        ("12", "0", "76", "hung", "requeue"),
        ("12", "1", "0", "finished", "finished"),
    ]
    assert [r["last_step"] for r in rows] == ["1000", "1000"]
    assert [r["failed_nodes"] for r in rows] == ["-", "n2"]
    assert rows[0]["nodes"] == "n[1-2]"


# The flight-recorder variables the scripts export, each checked against torch's own sources below.
FLIGHT_RECORDER = (
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "TORCH_FR_BUFFER_SIZE",
    "TORCH_NCCL_TRACE_BUFFER_SIZE",
    "TORCH_NCCL_DUMP_ON_TIMEOUT",
    "TORCH_NCCL_ENABLE_MONITORING",
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE",
    "TORCH_FR_DUMP_TEMP_FILE",
)


def test_flight_recorder_variable_names_are_the_ones_torch_reads():
    """A misspelt variable is silently ignored: every name must occur in the installed torch, in its
    c10d headers (ProcessGroupNCCL.hpp declares the NCCL-only ones, absent from a CPU build's library) or
    as a string in its library (the flight recorder's dump-file names)."""
    import mmap

    import torch

    root = Path(torch.__file__).parent
    headers = "".join(
        p.read_text(errors="replace") for p in root.glob("include/torch/csrc/distributed/c10d/*.hpp")
    )
    missing = [name for name in FLIGHT_RECORDER if f'"{name}"' not in headers]
    lib = root / "lib" / "libtorch_cpu.so"
    if missing and lib.is_file():
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            missing = [name for name in missing if data.find(name.encode() + b"\0") < 0]
    assert not missing, f"torch {torch.__version__} does not read {missing}"


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_export_timeouts_and_the_flight_recorder_to_the_step(script, tmp_path):
    """Run the script with stand-ins for srun and scontrol; the step's environment is what srun got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\nenv > {tmp_path}/step.env\nexit 0\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\n[[ $2 == hostnames ]] && echo node1\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["bash", str(script)],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "BEIT3_REPO": str(REPO),
            "BEIT3_PYTHON": sys.executable,
            "BEIT3_TASK": "vqav2_base",
            "BEIT3_RUN_DIR": str(run_dir),
            "SLURM_JOB_ID": "5",
            "SLURM_JOB_NODELIST": "node1",
            "SLURM_JOB_NUM_NODES": "1",
            "SLURM_NTASKS": "1",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    step_env = dict(
        line.split("=", 1) for line in (tmp_path / "step.env").read_text().splitlines() if "=" in line
    )
    opts = {
        name: script_default(script, name) for name in ("BEIT3_INIT_TIMEOUT_S", "BEIT3_COLLECTIVE_TIMEOUT_S")
    }
    for name, value in opts.items():
        assert int(value) >= 60 and step_env[name] == value, name
    assert int(opts["BEIT3_COLLECTIVE_TIMEOUT_S"]) >= int(opts["BEIT3_INIT_TIMEOUT_S"]) // 2
    assert "BEIT3_WATCHDOG_S" not in step_env, "empty: the program derives it from the step time"
    assert int(step_env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert step_env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert step_env["TORCH_NCCL_ENABLE_MONITORING"] == "1"
    assert step_env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    prefix = Path(step_env["TORCH_FR_DUMP_TEMP_FILE"])
    assert prefix.parent == run_dir / "nccl_trace" and prefix.parent.is_dir()
    # torch 2.13 warns about the older names on every rank: they are set only for an older torch
    assert (
        "TORCH_NCCL_TRACE_BUFFER_SIZE" not in step_env and "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in step_env
    )
    assert [r["reason"] for r in read_attempts(run_dir)] == ["finished"]


def test_an_older_torch_gets_the_older_flight_recorder_names_too(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\necho 2.5.1+cu124\n")
    fake.chmod(0o755)
    proc = run_bash(
        f"BEIT3_PYTHON={fake} BEIT3_RUN_DIR={tmp_path}/run; beit3_fault_env\n"
        'echo "$TORCH_NCCL_TRACE_BUFFER_SIZE $TORCH_NCCL_DEBUG_INFO_TEMP_FILE $TORCH_FR_BUFFER_SIZE"'
    )
    assert proc.stdout.split() == ["2000", f"{tmp_path}/run/nccl_trace/rank_", "2000"], proc.stderr


def test_a_site_value_wins_over_the_defaults_and_a_bad_timeout_is_refused(tmp_path):
    env = {
        "SLURM_JOB_ID": "7",
        "BEIT3_REPO": str(REPO),
        "BEIT3_PYTHON": sys.executable,
        "BEIT3_RECIPE": "pretrain/recipes/demo.toml",
        "BEIT3_DS_CONFIG": "ds_configs/zero0_fp32.json",
        "BEIT3_RUN_DIR": str(tmp_path / "run"),
    }
    proc = run_bash(
        "beit3_defaults; beit3_fault_env; echo $TORCH_NCCL_TRACE_BUFFER_SIZE $BEIT3_WATCHDOG_S",
        env={**env, "TORCH_NCCL_TRACE_BUFFER_SIZE": "50", "BEIT3_WATCHDOG_S": "300"},
    )
    assert proc.stdout.split() == ["50", "300"], proc.stderr
    proc = run_bash("beit3_main beit3.pretrain.train", env={**env, "BEIT3_COLLECTIVE_TIMEOUT_S": "30m"})
    assert proc.returncode == 2 and "BEIT3_COLLECTIVE_TIMEOUT_S=30m" in proc.stderr


def test_batch_shell_forwards_usr1_to_the_step_and_returns_its_exit_code(tmp_path):
    """The trap interrupts `wait`; the shell must forward the signal, then wait for the step's real status."""
    marker = tmp_path / "got_usr1"
    child = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('yes'); sys.exit(75)\n"
        "signal.signal(signal.SIGUSR1, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30); sys.exit(0)\n"
    )
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f'source {COMMON}\nrc=0; beit3_run_step {sys.executable} -c "$CHILD" || rc=$?; echo rc=$rc',
        ],
        env={"PATH": "/usr/bin:/bin", "CHILD": child},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert shell.stdout.readline().strip() == "ready"
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=20)
    assert marker.read_text() == "yes"
    assert out.strip().splitlines()[-1] == "rc=75"


def test_batch_shell_waits_for_the_step_after_term(tmp_path):
    """TERM is noted, not forwarded (Slurm signals the step itself); the shell returns the step's code."""
    shell = subprocess.Popen(
        [
            "bash",
            "-c",
            f"source {COMMON}\nrc=0; beit3_run_step bash -c 'echo ready; sleep 2; exit 4' || rc=$?\n"
            "echo rc=$rc terminating=$BEIT3_TERMINATING",
        ],
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert shell.stdout.readline().strip() == "ready"
    start = time.monotonic()
    shell.send_signal(signal.SIGTERM)
    out, _ = shell.communicate(timeout=20)
    assert out.strip().splitlines()[-1] == "rc=4 terminating=1"
    assert time.monotonic() - start > 1.0, "the shell returned before its step ended"


def test_hostfile_lists_every_node_of_the_allocation_with_its_slots(tmp_path, slurm_conf):
    hostfile = tmp_path / "hostfile"
    proc = subprocess.run(
        ["bash", str(REPO / "slurm" / "launch_deepspeed.sh"), "--hostfile", str(hostfile), "8"],
        env={
            "PATH": "/usr/bin:/bin",
            "SLURM_CONF": str(slurm_conf),
            "SLURM_JOB_NODELIST": "gpu[07-09],dgx12",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert hostfile.read_text().splitlines() == [
        "gpu07 slots=8",
        "gpu08 slots=8",
        "gpu09 slots=8",
        "dgx12 slots=8",
    ]


def test_hostfile_is_parsed_by_deepspeed_as_the_allocation(tmp_path, slurm_conf):
    """The file must mean to DeepSpeed's runner what it means to us: N hosts x slots GPUs."""
    from deepspeed.launcher.runner import fetch_hostfile

    hostfile = tmp_path / "hostfile"
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": str(slurm_conf), "SLURM_JOB_NODELIST": "n[1-2]"}
    run_bash(f"beit3_write_hostfile {hostfile} 4", env=env)
    assert dict(fetch_hostfile(str(hostfile))) == {"n1": 4, "n2": 4}


def test_rendezvous_is_the_first_host_and_a_port_from_job_and_attempt(slurm_conf):
    def rendezvous(job_id: int, restarts: int) -> tuple[str, int]:
        env = {
            "SLURM_CONF": str(slurm_conf),
            "SLURM_JOB_NODELIST": "gpu[03-04]",
            "SLURM_JOB_ID": str(job_id),
            "SLURM_RESTART_COUNT": str(restarts),
        }
        out = run_bash('beit3_rendezvous; echo "$MASTER_ADDR $MASTER_PORT"', env=env).stdout.split()
        return out[0], int(out[1])

    addr, port = rendezvous(1234, 0)
    assert addr == "gpu03"
    assert 20000 <= port < 40000
    assert rendezvous(1234, 0)[1] == port, "every task of an attempt must agree on the port"
    assert rendezvous(1234, 1)[1] != port, "a requeued attempt takes a fresh port"
    assert rendezvous(1235, 0)[1] != port, "two jobs on one node take different ports"


def test_a_missing_recipe_is_refused_before_launch_naming_the_variable(tmp_path):
    proc = run_bash(
        "beit3_main beit3.pretrain.train",
        env={
            "SLURM_JOB_ID": "7",
            "BEIT3_REPO": str(REPO),
            "BEIT3_PYTHON": sys.executable,
            "BEIT3_RECIPE": str(tmp_path / "missing.toml"),
            "BEIT3_DS_CONFIG": "ds_configs/zero0_fp32.json",
            "BEIT3_RUN_DIR": str(tmp_path / "run"),
        },
    )
    assert proc.returncode == 2
    assert "BEIT3_RECIPE" in proc.stderr and "missing.toml" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_outside_a_job_the_library_says_to_use_sbatch():
    proc = run_bash("BEIT3_RECIPE=x BEIT3_DS_CONFIG=y beit3_main beit3.pretrain.train")
    assert proc.returncode == 2 and "sbatch" in proc.stderr
