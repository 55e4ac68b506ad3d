"""The hang watchdog (issue 11, defect 5): its limit, its report of the rank behind, its stack dumps, and a
2-rank job with one rank SIGSTOPped that ends in exit 76 from beit3-launch within the limit plus a minute."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from beit3.engine.ds_config import EngineConfigError
from beit3.engine.trainer_config import TrainerConfig
from beit3.engine.watchdog import (
    Watchdog,
    behind_report,
    derived_limit,
    limit_from_env,
    main_thread_position,
)

TESTS = Path(__file__).resolve().parent


# ----- the limit -----
def test_the_derived_limit_is_the_floor_or_a_multiple_of_the_median_step_time():
    assert derived_limit([], floor_s=600, factor=10) == 600  # no step time yet
    assert derived_limit([1.0, 2.0, 90.0], floor_s=600, factor=10) == 600  # median 2 s: the floor holds
    assert derived_limit([80.0, 100.0, 1000.0], floor_s=600, factor=10) == 1000  # median 100 s, not the mean
    assert derived_limit([80.0, 100.0], floor_s=600, factor=10, fixed_s=5) == 5  # a fixed limit wins


def test_the_first_step_and_the_time_between_steps_get_twice_the_floor():
    wd = Watchdog("unused", rank=0, world_size=1, floor_s=3.0, factor=10)
    assert wd.limit() == 6.0  # before the first step
    wd.step_begins()
    assert wd.limit() == 6.0  # the first step: warm-up, data workers starting
    wd.progress(1)
    assert wd.limit() == 6.0  # logging, evaluation, saving
    wd.step_begins()
    assert wd.limit() == 3.0  # a measured step: the step limit
    fixed = Watchdog("unused", rank=0, world_size=1, fixed_s=1.5, floor_s=3.0)
    assert fixed.limit() == 1.5  # a fixed limit applies to everything


def test_the_environment_overrides_the_config_and_mistakes_are_config_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("BEIT3_WATCHDOG_S", raising=False)
    assert limit_from_env(None) is None and limit_from_env(30.0) == 30.0
    monkeypatch.setenv("BEIT3_WATCHDOG_S", "5")
    assert limit_from_env(None) == 5.0 and limit_from_env(30.0) == 5.0
    monkeypatch.setenv("BEIT3_WATCHDOG_S", "ten")
    with pytest.raises(EngineConfigError, match="BEIT3_WATCHDOG_S='ten'"):
        TrainerConfig(output_dir=str(tmp_path), total_steps=1).validate()
    monkeypatch.delenv("BEIT3_WATCHDOG_S")
    with pytest.raises(EngineConfigError, match="watchdog_s"):
        TrainerConfig(output_dir=str(tmp_path), total_steps=1, watchdog_s=-1).validate()
    with pytest.raises(EngineConfigError, match="watchdog_floor_s"):
        TrainerConfig(output_dir=str(tmp_path), total_steps=1, watchdog_floor_s=0).validate()


# ----- the report and the dump -----
def test_the_report_names_the_stopped_rank_and_says_it_cannot_dump_its_stacks():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.2)
        now = time.time()
        beats = [
            {"rank": 0, "pid": os.getpid(), "host": "h", "step": 7, "written": now},
            {"rank": 1, "pid": sleeper.pid, "host": "h", "step": 7, "written": now - 30},
            {"rank": 2, "pid": os.getpid(), "host": "h", "step": 7, "written": now},
        ]
        report = behind_report(beats, now, stale_after_s=5, host="h")
        assert "rank 1" in report and "rank 0" not in report and "rank 2" not in report
        assert "stopped (SIGSTOP)" in report and "cannot dump its own stacks" in report
    finally:
        sleeper.kill()
        sleeper.wait()
    lagging = [dict(beats[0], step=9), dict(beats[1], step=8, written=now), dict(beats[2], step=9)]
    report = behind_report(lagging, now, 5, "h")
    assert "rank 1" in report and "rank 0" not in report
    assert "no rank is behind" in behind_report([beats[0], beats[2]], now, 5, "h")


def test_the_report_names_the_rank_outside_the_collective_the_others_wait_in():
    now = time.time()
    beat = {"host": "h", "step": 7, "written": now, "pid": 1}
    beats = [
        {**beat, "rank": 0, "collective": True, "where": "all_reduce (distributed_c10d.py:3252)"},
        {**beat, "rank": 1, "collective": False, "where": "_next_batch (trainer.py:281)"},
        {**beat, "rank": 2, "collective": True, "where": "all_reduce (distributed_c10d.py:3252)"},
    ]
    report = behind_report(beats, now, stale_after_s=5, host="h")
    assert report.startswith("behind: rank 1 (pid 1 on h) at step 7: outside any collective")
    assert "_next_batch (trainer.py:281)" in report and "2 rank(s) wait in all_reduce" in report
    assert "rank 0" not in report and "rank 2" not in report


def test_a_heartbeat_says_whether_the_main_thread_waits_in_a_collective():
    """The position of the main thread as another thread (the watchdog's) sees it."""
    namespace: dict = {}
    fake = "def all_reduce(done):\n    done.wait(10)\n"  # a collective's name in a torch.distributed file
    exec(compile(fake, "/site-packages/torch/distributed/distributed_c10d.py", "exec"), namespace)
    seen, done = [], threading.Event()

    def look():
        time.sleep(0.3)
        seen.append(main_thread_position())
        done.set()

    threading.Thread(target=look).start()
    namespace["all_reduce"](done)
    assert seen[0][1] is True and seen[0][0].startswith("all_reduce (distributed_c10d.py:")
    done.clear()
    threading.Thread(target=look).start()
    time.sleep(0.6)  # the main thread sleeps here, in this test, outside any collective
    assert seen[1][1] is False and "test_a_heartbeat_says" in seen[1][0]


def test_no_progress_dumps_every_thread_writes_heartbeats_and_exits_76(tmp_path):
    fired = threading.Event()
    codes = []

    def fake_exit(code):
        codes.append(code)
        wd._stop.set()
        fired.set()

    wd = Watchdog(tmp_path, rank=3, world_size=4, fixed_s=0.5, exit_fn=fake_exit).start(step=12)
    try:
        assert fired.wait(10), "the watchdog did not fire"
    finally:
        wd.stop()
    assert codes == [76]
    heartbeat = json.loads((tmp_path / "heartbeat" / "rank00003.json").read_text())
    assert heartbeat["step"] == 12 and heartbeat["pid"] == os.getpid()
    (dump,) = (tmp_path / "hang").glob("rank00003-*.txt")
    text = dump.read_text()
    assert "no step progress" in text and "after step 12" in text
    assert "test_no_progress_dumps_every_thread" in text  # the main thread's stack, waiting in this test
    assert "_fire" in text  # and the watchdog's own thread


def test_progress_keeps_the_watchdog_quiet(tmp_path):
    fired = []
    wd = Watchdog(tmp_path, rank=0, world_size=1, fixed_s=0.6, exit_fn=fired.append).start()
    try:
        for step in range(1, 15):
            wd.step_begins()
            time.sleep(0.1)
            wd.progress(step)
    finally:
        wd.stop()
    assert not fired and not (tmp_path / "hang").exists()


# ----- a real job: 2 ranks under beit3-launch over torchrun, one of them SIGSTOPped -----
TOY_SCRIPT = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import engine_helpers
from beit3.engine.supervise import supervised
sys.exit(supervised(engine_helpers.main)())
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_stopped_rank_ends_the_job_with_76_stack_dumps_and_its_name(tmp_path):
    from test_faults_signals import LAUNCH, _env, _tree, torchrun

    limit = 4
    out = tmp_path / "run"
    script = tmp_path / "toy_rank.py"
    script.write_text(TOY_SCRIPT)
    spec = [{"output_dir": str(out), "ds_config": "zero0_fp32.json", "steps": 100000, "log_every": 50}]
    cmd = LAUNCH + torchrun(str(script), "--runs", json.dumps(spec), "--results", str(out))
    env = _env(tmp_path, BEIT3_WATCHDOG_S=str(limit), BEIT3_HUNG_GRACE_S="5")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    stopped = None
    try:
        deadline = time.time() + 150
        beat = out / "heartbeat" / "rank00001.json"
        while time.time() < deadline and proc.poll() is None:
            if beat.is_file() and json.loads(beat.read_text())["step"] >= 20:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before a rank could be stopped"
        everything = _tree(proc.pid)
        stopped = json.loads(beat.read_text())["pid"]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        proc.wait(timeout=limit + 60)
        elapsed = time.monotonic() - t0
        stderr = proc.stderr.read()
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        if proc.poll() is None:
            for p in _tree(proc.pid)[::-1]:
                p.kill()
    assert proc.returncode == 76, stderr[-4000:]
    assert elapsed < limit + 60
    dumps = sorted(p.name for p in (out / "hang").glob("*.txt"))
    assert len(dumps) == 1 and dumps[0].startswith("rank00000-"), dumps  # the stopped rank cannot dump
    assert "all_reduce" in (out / "hang" / dumps[0]).read_text()  # rank 0 waits in the step's flag reduce
    assert f"rank 1 (pid {stopped}" in stderr and "stopped (SIGSTOP)" in stderr, stderr[-4000:]
    assert "beit3-launch: exit 76" in stderr
    left = []
    for p in everything:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    assert not left, left


# ----- collective timeouts -----
def test_timeouts_come_from_the_environment_and_mistakes_name_the_variable():
    from beit3.engine.launch import LaunchError, timeout_from_env

    assert timeout_from_env("BEIT3_INIT_TIMEOUT_S", 1800.0, {}) == 1800.0
    assert timeout_from_env("BEIT3_INIT_TIMEOUT_S", 1800.0, {"BEIT3_INIT_TIMEOUT_S": "90"}) == 90.0
    for bad in ("0", "-5", "soon"):
        with pytest.raises(LaunchError, match=f"BEIT3_COLLECTIVE_TIMEOUT_S='{bad}'"):
            timeout_from_env("BEIT3_COLLECTIVE_TIMEOUT_S", 1800.0, {"BEIT3_COLLECTIVE_TIMEOUT_S": bad})


def test_the_training_collectives_get_their_own_timeout(tmp_path):
    """A process group set up under BEIT3_INIT_TIMEOUT_S=77 carries BEIT3_COLLECTIVE_TIMEOUT_S=123 after."""
    probe = (
        "import torch; from torch.distributed import distributed_c10d as c; "
        "from beit3.engine.launch import init_distributed; init_distributed(); "
        "print(c._get_default_group()._get_backend(torch.device('cpu')).options._timeout.total_seconds())"
    )
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(BEIT3_INIT_TIMEOUT_S="77", BEIT3_COLLECTIVE_TIMEOUT_S="123")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "123.0"


STUCK_SCRIPT = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
import engine_helpers
from beit3.engine.supervise import supervised

forward = engine_helpers.ToyMultiwayTask.forward


def stuck_forward(self, batch):  # rank 1 stops making progress (alive, outside any collective) on request
    while os.environ["RANK"] == "1" and os.path.exists(os.environ["STUCK_TRIGGER"]):
        time.sleep(0.05)
    return forward(self, batch)


engine_helpers.ToyMultiwayTask.forward = stuck_forward
sys.exit(supervised(engine_helpers.main)())
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_rank_stuck_outside_a_collective_is_named_and_every_rank_dumps_its_stacks(tmp_path):
    from test_faults_signals import LAUNCH, _env, _tree, torchrun

    out, trigger = tmp_path / "run", tmp_path / "stuck"
    script = tmp_path / "stuck_rank.py"
    script.write_text(STUCK_SCRIPT)
    spec = [{"output_dir": str(out), "ds_config": "zero0_fp32.json", "steps": 100000, "log_every": 50}]
    cmd = LAUNCH + torchrun(str(script), "--runs", json.dumps(spec), "--results", str(out))
    env = _env(tmp_path, BEIT3_WATCHDOG_S="4", STUCK_TRIGGER=str(trigger))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        beat = out / "heartbeat" / "rank00001.json"
        deadline = time.time() + 150
        while time.time() < deadline and proc.poll() is None:
            if beat.is_file() and json.loads(beat.read_text())["step"] >= 20:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before a rank could get stuck"
        trigger.touch()
        proc.wait(timeout=64)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            for p in _tree(proc.pid)[::-1]:
                p.kill()
    assert proc.returncode == 76, stderr[-4000:]
    dumps = {p.name[:9]: p.read_text() for p in (out / "hang").glob("*.txt")}
    assert sorted(dumps) == ["rank00000", "rank00001"]
    assert "stuck_forward" in dumps["rank00001"] and "all_reduce" in dumps["rank00000"]
    assert "behind: rank 1" in stderr and "outside any collective, in stuck_forward" in stderr, stderr[-4000:]
