"""The sbatch scripts without a cluster: syntax, the cluster defaults they carry, and the shared shell library
(requeue decision, signal forwarding, rendezvous, DeepSpeed hostfile) exercised in real bash processes.

The jobs themselves run under a real Slurm in tests/test_slurm_jobs.py.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from slurm_fixtures import in_ci

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
    ("rc", "restarts", "terminating", "decision"),
    [
        (0, 0, 0, "finished"),
        (0, 5, 0, "finished"),
        (75, 0, 0, "requeue"),
        (75, 2, 0, "requeue"),
        (75, 3, 0, "cap"),
        (75, 0, 1, "cancelled"),
        (1, 0, 0, "failed"),
        (2, 0, 0, "failed"),
        (138, 0, 0, "failed"),
    ],
)
def test_requeue_decision(rc, restarts, terminating, decision):
    """Only a checkpointed stop (exit 75) under the cap, while Slurm is not ending the job, is requeued."""
    proc = run_bash(
        f"BEIT3_MAX_REQUEUES=3 SLURM_RESTART_COUNT={restarts} BEIT3_TERMINATING={terminating} "
        f"beit3_decide {rc}"
    )
    assert proc.stdout.strip() == decision, proc.stderr


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
