"""Signals and exit codes through each launcher (issue 11, defects 3 and 4): ``beit3-launch`` over torchrun
and over the ``deepspeed`` launcher keeps 0/2/3/75/76/1, forwards SIGTERM and SIGUSR1 to the ranks, ends
orphans, and a preempted pretraining run with DataLoader workers resumes to the uninterrupted losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from engine_helpers import clean_env, free_port

from beit3.engine.supervise import child_command, combine_exit_codes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LAUNCH = [sys.executable, "-m", "beit3.engine.supervise"]
pytestmark = pytest.mark.multiprocess


def _env(tmp_path: Path, **extra: str) -> dict:
    """No inherited rendezvous; the launcher's pid directory under ``tmp_path`` (TMPDIR) for the test."""
    env = {k: v for k, v in clean_env().items() if k != "BEIT3_LAUNCH_DIR"}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return {**env, "PYTHONWARNINGS": "ignore", "TMPDIR": str(tmp_path / "tmp"), **extra}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), *args]  # fmt: skip


def deepspeed(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(free_port()), *args]  # fmt: skip


def summary_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("beit3-launch: exit")]


# ----- pure parts -----
def test_the_most_severe_rank_code_is_the_job_code():
    assert combine_exit_codes([75, 75]) == 75
    assert combine_exit_codes([0, 0]) == 0
    assert combine_exit_codes([75, 2]) == 2
    assert combine_exit_codes([76, 75]) == 76
    assert combine_exit_codes([76, 1]) == 76  # a hang outranks the errors it causes (as slurm/common.sh)
    assert combine_exit_codes([75, 1]) == 1
    assert combine_exit_codes([3, 1]) == 3
    assert combine_exit_codes([0, 137]) == 1  # an unknown code counts as "other"
    assert combine_exit_codes([]) == 1


def test_torchrun_runs_through_the_shim_and_other_launchers_unchanged():
    shim = [sys.executable, "-m", "beit3.engine.supervise", "_torchrun"]
    assert child_command(["torchrun", "--nnodes", "1", "x.py"]) == [*shim, "--nnodes", "1", "x.py"]
    python_m = child_command(["python3", "-m", "torch.distributed.run", "-m", "m"])
    assert python_m == ["python3", *shim[1:], "-m", "m"]  # the interpreter the user named
    assert child_command(["deepspeed", "--num_gpus", "2", "x.py"]) == ["deepspeed", "--num_gpus", "2", "x.py"]


def test_no_command_or_a_missing_launcher_is_a_usage_error(tmp_path):
    proc = subprocess.run(LAUNCH, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no command" in proc.stderr
    missing = [*LAUNCH, "--", "no-such-launcher", "x.py"]
    proc = subprocess.run(missing, env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot start no-such-launcher" in proc.stderr, proc.stderr


# ----- exit codes through the launchers (ranks that only return a code) -----
FAKE_RANK = """
import os, sys
from beit3.engine.supervise import register_rank, supervised

@supervised
def main():
    rank = int(os.environ["RANK"])
    register_rank(rank)
    return int(os.environ["FAKE_CODES"].split(",")[rank])

sys.exit(main())
"""


@pytest.mark.parametrize(
    ("launcher", "codes", "expected"),
    [
        ("torchrun", "75,75", 75),
        ("torchrun", "2,2", 2),
        ("torchrun", "0,76", 76),
        ("torchrun", "0,0", 0),
        ("deepspeed", "75,75", 75),
        ("deepspeed", "75,2", 2),
    ],
)
def test_the_launcher_returns_the_ranks_code_in_one_line(tmp_path, launcher, codes, expected):
    script = tmp_path / "fake_rank.py"
    script.write_text(FAKE_RANK)
    cmd = LAUNCH + (torchrun if launcher == "torchrun" else deepspeed)(str(script))
    proc = subprocess.run(cmd, env=_env(tmp_path, FAKE_CODES=codes), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == expected, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr[-3000:]
    (line,) = summary_lines(proc.stderr)
    assert line.startswith(f"beit3-launch: exit {expected}: rank exit codes")


DEAF_RANK = """
import os, signal, sys, time
from beit3.engine.supervise import register_rank, supervised

@supervised
def main():
    register_rank(int(os.environ["RANK"]))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a rank that will not stop by itself
    open(os.environ["READY"] + os.environ["RANK"], "w").close()
    time.sleep(600)

sys.exit(main())
"""


def test_a_second_ctrl_c_kills_every_process(tmp_path):
    script = tmp_path / "deaf_rank.py"
    script.write_text(DEAF_RANK)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(LAUNCH + torchrun(str(script)), env=_env(tmp_path, READY=str(ready)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not all(Path(f"{ready}{r}").exists() for r in (0, 1)):
            time.sleep(0.1)
        everything = _tree(proc.pid)
        os.kill(proc.pid, signal.SIGINT)  # forwarded as SIGTERM, which these ranks ignore
        time.sleep(1.0)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            for p in _tree(proc.pid)[::-1]:
                p.kill()
    stderr = proc.stderr.read()
    assert proc.returncode == 1 and "second interrupt" in stderr, stderr[-2000:]
    _assert_gone(everything)


# ----- real Trainers (the toy task, real DeepSpeed on gloo) and real signals -----
TOY_SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import engine_helpers
from beit3.engine.supervise import supervised
sys.exit(supervised(engine_helpers.main)())
"""


def _toy_command(tmp_path: Path, launcher: str, out: Path, save_every: int = 0) -> list[str]:
    script = tmp_path / "toy_rank.py"
    script.write_text(TOY_SCRIPT)
    spec = [{"output_dir": str(out), "ds_config": "zero0_fp32.json", "steps": 100000, "log_every": 50,
             "save_every": save_every}]  # fmt: skip
    args = (str(script), "--runs", json.dumps(spec), "--results", str(out))
    return LAUNCH + (torchrun if launcher == "torchrun" else deepspeed)(*args)


def _rank_pids(tmp_path: Path, deadline: float) -> dict[int, int]:
    """rank -> pid, from the launcher's pid directory (under TMPDIR=tmp_path/tmp)."""
    while time.time() < deadline:
        ranks = {}
        for path in (tmp_path / "tmp").glob("beit3-launch-*/rank-*.json"):
            try:
                info = json.loads(path.read_text())
            except ValueError:
                continue
            if info.get("rank") is not None:
                ranks[info["rank"]] = info["pid"]
        if len(ranks) == 2:
            return ranks
        time.sleep(0.2)
    raise AssertionError("the ranks never registered")


def _wait_training(out: Path, proc: subprocess.Popen, deadline: float, rows: int = 20) -> None:
    losses = out / "losses_rank0.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if losses.is_file() and len(losses.read_text().splitlines()) >= rows:
            return
        time.sleep(0.2)
    raise AssertionError(f"training did not start (launcher exit {proc.poll()})")


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def _assert_gone(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """Every process of the job has ended: a process still tearing down (on a loaded machine, an exiting
    interpreter can take seconds after its parent returned) gets ``grace_s``; one that never ends fails."""
    deadline = time.time() + grace_s
    left = _running(procs)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = _running(left)
    for p in left:  # cleanup for the next tests, then fail
        p.kill()
    assert not left, [(p.pid, p.cmdline()[:4]) for p in left]


def _assert_preempted_and_saved(out: Path, proc: subprocess.Popen) -> str:
    stderr = proc.stderr.read()
    assert proc.returncode == 75, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]
    assert summary_lines(stderr) == [summary_lines(stderr)[0]], stderr[-2000:]
    results = [json.loads((out / f"results_rank{r}.json").read_text())[-1] for r in (0, 1)]
    assert [r["exit_code"] for r in results] == [75, 75], results
    assert results[0]["step"] == results[1]["step"]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{results[0]['step']:08d}"
    return stderr


@pytest.mark.parametrize(
    ("launcher", "target", "sig"),
    [
        ("torchrun", "launcher", signal.SIGUSR1),
        ("torchrun", "launcher twice", signal.SIGTERM),
        ("torchrun", "launcher during set-up", signal.SIGUSR1),  # before fit(): acted on at the first step
        ("torchrun", "one rank", signal.SIGTERM),
        ("torchrun", "one rank while saving", signal.SIGUSR1),  # a checkpoint every step
        ("torchrun", "every process", signal.SIGTERM),
        ("torchrun", "torchrun", signal.SIGTERM),
        ("torchrun", "torchrun", signal.SIGUSR1),  # kills torchrun: beit3-launch ends the orphaned ranks
        ("deepspeed", "launcher", signal.SIGUSR1),
        pytest.param("deepspeed", "every process", signal.SIGTERM, marks=pytest.mark.slow),
    ],
    ids=lambda v: v.name if isinstance(v, signal.Signals) else v.replace(" ", "-"),
)
def test_a_signal_anywhere_ends_in_a_checkpoint_and_75_on_every_rank(tmp_path, launcher, target, sig):
    out = tmp_path / "run"
    save_every = 1 if "saving" in target else 0
    proc = subprocess.Popen(_toy_command(tmp_path, launcher, out, save_every), env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 150
        ranks = _rank_pids(tmp_path, deadline)
        if "set-up" not in target:
            _wait_training(out, proc, deadline)
        everything = _tree(proc.pid)
        if target.startswith("launcher"):
            os.kill(proc.pid, sig)
            if "twice" in target:
                time.sleep(0.05)
                os.kill(proc.pid, sig)
        elif target.startswith("one rank"):
            os.kill(ranks[1], sig)
        elif target == "torchrun":
            (child,) = psutil.Process(proc.pid).children()
            os.kill(child.pid, sig)
        else:  # as scancel does: every process of the job
            for p in everything:
                os.kill(p.pid, sig)
        proc.wait(timeout=120)
        stderr = _assert_preempted_and_saved(out, proc)
        _assert_gone(everything)
        if "set-up" in target:  # caught before the Trainer's handler existed, acted on at its first step
            assert json.loads((out / "results_rank0.json").read_text())[-1]["step"] <= 2
        if target == "torchrun" and sig == signal.SIGUSR1:
            assert "the launcher ended with 2 rank(s) still running" in stderr, stderr[-2000:]
    finally:
        if proc.poll() is None:
            for p in _tree(proc.pid)[::-1]:
                p.kill()


# ----- acceptance: beit3-pretrain with DataLoader workers, SIGTERM to torchrun, exact resume -----
@pytest.mark.slow
def test_sigterm_to_torchrun_with_workers_saves_exits_75_and_resumes_exactly(tmp_path):
    """As the SIGKILL test of test_pretrain_e2e (its helpers, checkpoints every 2 steps), but the run is
    stopped by SIGTERM to torchrun right after its step-2 checkpoint and must save its own."""
    import test_pretrain_e2e as e2e
    from engine_helpers import tensorboard_scalars
    from tiny_data import write_pretrain_data

    assets = write_pretrain_data(tmp_path)
    steps, env = 8, _env(tmp_path)

    reference = tmp_path / "reference"
    proc = subprocess.run(LAUNCH + e2e.command(assets, reference, steps), env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = tensorboard_scalars(reference, "loss/total")
    assert sorted(expected) == list(range(1, steps + 1))

    run = tmp_path / "preempted"
    victim = subprocess.Popen(LAUNCH + e2e.command(assets, run, steps), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    pointer = run / "checkpoints" / "latest"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and victim.poll() is None:
            if pointer.is_file() and pointer.read_text().strip() == "step00000002":
                break
            time.sleep(0.1)
        assert victim.poll() is None, "the run ended before the signal"
        everything = _tree(victim.pid)
        (torchrun_proc,) = psutil.Process(victim.pid).children()
        os.kill(torchrun_proc.pid, signal.SIGTERM)
        victim.wait(timeout=120)
        stderr = victim.stderr.read()
        assert victim.returncode == 75, stderr[-4000:]
        assert "DataLoader worker" not in stderr and "Traceback" not in stderr, stderr[-4000:]
        _assert_gone(everything)
    finally:
        if victim.poll() is None:
            for p in _tree(victim.pid)[::-1]:
                p.kill()
    saved = int(pointer.read_text().strip().removeprefix("step"))
    assert 3 <= saved < steps  # the preemption's own checkpoint

    proc = subprocess.run(LAUNCH + e2e.command(assets, run, steps), env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {pointer.parent / f'step{saved:08d}'} at step {saved}" in proc.stderr
    resumed = tensorboard_scalars(run, "loss/total")
    for step in range(saved + 1, steps + 1):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
