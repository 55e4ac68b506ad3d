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


class ClusterRefused(RuntimeError):
    """This machine cannot build the cluster asked for (e.g. the kernel refuses network namespaces)."""


class SlurmCluster:
    """A running cluster: its environment and thin wrappers over the real Slurm clients.

    ``nodes`` > 1 builds that many nodes (b3n1, b3n2, ...) out of network namespaces
    (``BEIT3_SLURM_NODES``, see scripts/slurm_localhost.sh)."""

    def __init__(self, scratch: Path, nodes: int = 1):
        from engine_helpers import free_port

        self.scratch = scratch
        self.nodes = nodes
        # Free ports, so that the test cluster never meets another one running on this machine.
        self.env = dict(
            os.environ,
            BEIT3_SLURM_DIR=str(scratch),
            SLURM_CONF=str(scratch / "slurm.conf"),
            BEIT3_SLURM_CTLD_PORT=str(free_port()),
            BEIT3_SLURM_SLURMD_PORT=str(free_port()),
            BEIT3_SLURM_NODES=str(nodes),
        )

    @property
    def netns_names(self) -> dict[str, str]:
        """Prefixes of what a multi-node cluster creates outside its folder (see slurm_localhost.sh)."""
        import hashlib

        tag = hashlib.md5(str(self.scratch).encode()).hexdigest()[:6]
        return {"netns": f"b3-{tag}-n", "bridge": f"b3br{tag}", "etc": f"/etc/netns/b3-{tag}-n"}

    def leftovers(self) -> list[str]:
        """Namespaces, bridge and /etc/netns files of this cluster that still exist (none after stop)."""
        names = self.netns_names
        found = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        found += [ns for ns in netns if ns.startswith(names["netns"])]
        if subprocess.run(["ip", "link", "show", names["bridge"]], capture_output=True).returncode == 0:
            found.append(names["bridge"])
        found += [str(p) for p in Path("/etc/netns").glob(Path(names["etc"]).name + "*")]
        return found

    def _run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def start(self) -> None:
        proc = self._run("bash", str(LOCALHOST_SCRIPT), "start", timeout=120, check=False)
        if proc.returncode == 3:
            raise ClusterRefused(proc.stderr.strip())
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


def start_cluster(scratch: Path, nodes: int = 1) -> SlurmCluster:
    """Start a cluster, or fail (CI) / skip (elsewhere) naming what is missing.

    A machine whose kernel refuses the namespaces of a multi-node cluster skips everywhere, CI included,
    with the kernel's reason (pytest -rs shows it)."""
    import pytest

    cluster = SlurmCluster(scratch, nodes)
    try:
        cluster.start()
    except ClusterRefused as err:
        cluster.stop()
        pytest.skip(f"cannot build a {nodes}-node Slurm from namespaces here: {err}")
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


ATTEMPT_COLUMNS = ("job_id", "restart", "start", "end", "exit_code", "reason", "decision", "last_step")
ATTEMPT_COLUMNS += ("nodes", "failed_nodes")


def read_attempts(run_dir: Path) -> list[dict[str, str]]:
    """RUN_DIR/attempts.tsv as one dict per attempt, after checking the header and every line's shape."""
    lines = (run_dir / "attempts.tsv").read_text().splitlines()
    assert lines and tuple(lines[0].split("\t")) == ATTEMPT_COLUMNS, lines[:1]
    rows = []
    for line in lines[1:]:
        fields = line.split("\t")
        assert len(fields) == len(ATTEMPT_COLUMNS), f"malformed attempts.tsv line: {line!r}"
        row = dict(zip(ATTEMPT_COLUMNS, fields))
        assert re.fullmatch(r"\d+", row["job_id"]) and re.fullmatch(r"\d+", row["restart"]), line
        assert re.fullmatch(r"-?\d+", row["exit_code"]), line
        assert re.fullmatch(r"\d+|-", row["last_step"]), line
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
        assert re.fullmatch(stamp, row["start"]) and re.fullmatch(stamp, row["end"]), line
        assert row["start"] <= row["end"], line
        rows.append(row)
    return rows


def write_pretrain_data(root: Path) -> Path:
    """Tiny real shards of the three kinds and a tiny SentencePiece model under ``root``, for the real
    beit3-pretrain (see :func:`pretrain_args`)."""
    from tiny_data import write_pretrain_data

    write_pretrain_data(root)
    return root


def pretrain_args(data: Path, steps: int) -> str:
    """BEIT3_EXTRA_ARGS for the demo recipe on the tiny data (no spaces inside a value: the list is split)."""
    from tiny_data import tiny_pretrain_settings

    settings = tiny_pretrain_settings({"root": data, "spm": f"{data}/spm/tiny.model"})
    return " ".join(
        [
            "--ds-set train_micro_batch_size_per_gpu=3",
            *(f"--set {s}" for s in settings),
            "--set data.num_workers=1",
            f"--set train.total_steps={steps}",
            "--set train.warmup_steps=2",
            "--set train.log_every=1",
            "--set train.save_every=1000",  # only the preemption and the final checkpoint
        ]
    )


# --- the stand-in trainer ---------------------------------------------------------------------------------


def _settings(overrides: list[str]) -> dict[str, float]:
    settings = {
        "steps": 20,
        "step_time": 0.2,
        "save_every": 5,
        "fail_at_step": -1,
        # A fault at step ``fault_at_step`` on rank ``fault_rank`` (-1: every rank), only in attempts with
        # SLURM_RESTART_COUNT < ``fault_attempts``: exit with ``fault_exit`` (e.g. 76 hung, 2 config), or, if
        # ``fault_signal`` > 0, die of that signal (9: what the kernel's OOM killer does).
        "fault_at_step": -1,
        "fault_rank": -1,
        "fault_attempts": 1000,
        "fault_exit": 1,
        "fault_signal": 0,
    }
    for item in overrides:
        key, _, value = item.partition("=")
        name = key.removeprefix("standin.")
        if name not in settings:
            raise SystemExit(f"unknown stand-in setting {key!r}; known: {sorted(settings)}")
        settings[name] = float(value)
    return settings


def _save(out: Path, step: int) -> None:
    """Checkpoint then pointer, the pointer replaced atomically and last (as the engine does)."""
    ckpt = out / "checkpoints" / f"step{step:08d}"  # the engine's tag format
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
        f"standin rank={rank} world={world} node={env.get('SLURMD_NODENAME', '?')} "
        f"SLURM_RESTART_COUNT={env.get('SLURM_RESTART_COUNT', 0)} "
        f"resumed_from={step}",
        flush=True,
    )
    while step < settings["steps"]:
        time.sleep(settings["step_time"])
        step += 1
        if step == settings["fail_at_step"]:
            raise RuntimeError(f"stand-in failure at step {step} (a real error)")
        if (
            step == settings["fault_at_step"]
            and settings["fault_rank"] in (-1, rank)
            and int(env.get("SLURM_RESTART_COUNT", 0)) < settings["fault_attempts"]
        ):
            if settings["fault_signal"] > 0:
                print(f"stand-in rank {rank} dies of signal {int(settings['fault_signal'])}", flush=True)
                os.kill(os.getpid(), int(settings["fault_signal"]))
                time.sleep(60)
            print(f"stand-in rank {rank} exits {int(settings['fault_exit'])} at step {step}", flush=True)
            os._exit(int(settings["fault_exit"]))
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
