"""The localhost Slurm cluster for the sbatch tests, and a stand-in trainer honouring the training contract.

``SlurmCluster`` drives ``scripts/slurm_localhost.sh`` and the real Slurm clients (sbatch, scontrol,
scancel). ``slurm_cluster`` is a module-scoped fixture: one cluster per test module. If Slurm cannot start,
the fixture fails under ``CI=true`` and skips elsewhere, naming the cause.

Run as a module (``python -m slurm_fixtures`` with ``tests/`` on ``PYTHONPATH``, which is what the sbatch
scripts do with ``BEIT3_MODULE=slurm_fixtures``), this file is a tiny distributed "trainer" with the same
contract as ``beit3-pretrain``: ranks from the Slurm (or deepspeed-launcher) variables, gloo rendezvous on
MASTER_ADDR/MASTER_PORT, a checkpoint plus ``checkpoints/latest`` pointer, ``--resume auto``, and on SIGUSR1
or SIGTERM a checkpoint at the next step boundary followed by exit code 75. It lets the Slurm side be tested
in seconds, independently of the model, and pins down the contract the real programs are tested against too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCALHOST_SCRIPT = REPO / "scripts" / "slurm_localhost.sh"
EXIT_PREEMPTED = 75


def in_ci() -> bool:
    """CI sets CI=true; there a cluster that cannot start is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlurmCluster:
    """A running one-node cluster: its environment and thin wrappers over the real Slurm clients."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        # Free ports, so that the test cluster never meets another one running on this machine.
        self.env = dict(
            os.environ,
            BEIT3_SLURM_DIR=str(scratch),
            SLURM_CONF=str(scratch / "slurm.conf"),
            BEIT3_SLURM_CTLD_PORT=str(free_port()),
            BEIT3_SLURM_SLURMD_PORT=str(free_port()),
        )

    def _run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def start(self) -> None:
        proc = self._run("bash", str(LOCALHOST_SCRIPT), "start", timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"slurm_localhost.sh start failed:\n{proc.stdout}\n{proc.stderr}")

    def stop(self) -> None:
        self._run("bash", str(LOCALHOST_SCRIPT), "stop", timeout=120, check=False)

    def sbatch(
        self, script: Path | None, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO
    ) -> int:
        """Submit ``script`` (None with ``--wrap=...``) with sbatch ``args``; ``env`` adds variables.

        Returns the job id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args, *([str(script)] if script else [])],
            env={**self.env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {proc.stderr}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); finished jobs stay 300 s."""
        out = self._run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail with the job's record if it takes too long."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}")

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """What ``--signal=B:USR1@T`` does at the time limit, but now: signal the batch shell only."""
        self._run("scancel", "--batch", f"--signal={sig}", str(job_id))


def start_cluster(scratch: Path) -> SlurmCluster:
    """Start a cluster, or fail (CI) / skip (elsewhere) naming what is missing."""
    import pytest

    cluster = SlurmCluster(scratch)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        cluster.stop()
        msg = f"cannot start the localhost Slurm cluster: {err}"
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg + " (install with: bash scripts/install.sh --tests)")
    return cluster


def wait_for_text(path: Path, pattern: str, timeout: float) -> re.Match:
    """Poll a growing log file until ``pattern`` matches."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        found = re.search(pattern, text)
        if found:
            return found
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s; it holds:\n{text[-3000:]}")


# --- the stand-in trainer ---------------------------------------------------------------------------------


def _settings(overrides: list[str]) -> dict[str, float]:
    settings = {"steps": 20, "step_time": 0.2, "save_every": 5, "fail_at_step": -1}
    for item in overrides:
        key, _, value = item.partition("=")
        name = key.removeprefix("standin.")
        if name not in settings:
            raise SystemExit(f"unknown stand-in setting {key!r}; known: {sorted(settings)}")
        settings[name] = float(value)
    return settings


def _save(out: Path, step: int) -> None:
    """Checkpoint then pointer, the pointer replaced atomically and last (as the engine does)."""
    ckpt = out / "checkpoints" / f"step_{step:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    tmp = out / "checkpoints" / "latest.tmp"
    tmp.write_text(ckpt.name)
    os.replace(tmp, out / "checkpoints" / "latest")


def _resume_step(out: Path) -> int:
    pointer = out / "checkpoints" / "latest"
    if not pointer.exists():
        return 0
    return json.loads((out / "checkpoints" / pointer.read_text().strip() / "state.json").read_text())["step"]


def standin_main(argv: list[str] | None = None) -> int:
    """Train nothing for ``standin.steps`` steps, with real gloo collectives and the real exit contract."""
    p = argparse.ArgumentParser(prog="slurm_fixtures")
    for flag in ("--config", "--ds-config", "--output-dir"):
        p.add_argument(flag, required=True)
    p.add_argument("--task", default=None)
    p.add_argument("--resume", default="auto")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = p.parse_args(argv)
    settings = _settings(args.set)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, on_signal)

    import torch
    import torch.distributed as dist

    env = os.environ
    if "RANK" in env:  # the deepspeed launcher
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    else:  # one srun task per rank
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    dist.init_process_group(
        "gloo", init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}", rank=rank, world_size=world
    )
    out = Path(args.output_dir)
    step = _resume_step(out) if args.resume == "auto" else 0
    if rank == 0:
        (out / "config.json").write_text(json.dumps({"settings": settings, "config": args.config}))
    print(
        f"standin rank={rank} world={world} SLURM_RESTART_COUNT={env.get('SLURM_RESTART_COUNT', 0)} "
        f"resumed_from={step}",
        flush=True,
    )
    while step < settings["steps"]:
        time.sleep(settings["step_time"])
        step += 1
        if step == settings["fail_at_step"]:
            raise RuntimeError(f"stand-in failure at step {step} (a real error)")
        # Every rank must agree on stopping at the same step boundary, as the engine does.
        flags = torch.tensor([1.0, 1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flags)
        if rank == 0:
            print(f"step {step} world_check={int(flags[0])}", flush=True)
        if step % settings["save_every"] == 0 or flags[1] > 0:
            if rank == 0:
                _save(out, step)
            dist.barrier()
        if flags[1] > 0:
            if rank == 0:
                by = stop["signal"] or "a peer"
                print(f"preempted at step {step} by {by}: checkpoint saved", flush=True)
            dist.destroy_process_group()
            return EXIT_PREEMPTED
    if rank == 0:
        print(f"finished at step {step}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(standin_main())
