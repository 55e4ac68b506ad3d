"""``beit3-launch``: run torchrun or the ``deepspeed`` launcher so that the exit-code contract and preemption
signals survive the launcher.

    beit3-launch [--grace S] [--] torchrun --standalone --nproc_per_node 8 -m beit3.pretrain.train ...
    beit3-launch [--grace S] [--] deepspeed --num_gpus 8 --module beit3.pretrain.train ...

Why: torchrun returns 1 with a ``ChildFailedError`` traceback whenever a rank exits non-zero, so 75
(preempted) and 2 (configuration) are lost; SIGUSR1 kills torchrun and leaves the ranks training as orphans;
SIGTERM to either launcher reaches the DataLoader workers and, 30 s later, becomes SIGKILL.

How: the launcher runs in its own session (process group). Every rank registers its pid in a directory named
by ``BEIT3_LAUNCH_DIR`` (``init_distributed`` does it) and records its exit code there (the ``supervised``
decorator on the program's ``main``, or the watchdog before ``os._exit(76)``). ``beit3-launch`` traps
SIGTERM, SIGUSR1, SIGINT and SIGHUP and sends them to the registered ranks only (SIGINT and SIGHUP as
SIGTERM), never to the launcher, so the ranks checkpoint and exit 75 before anyone tears them down; ranks
that register after a signal get it too. When the launcher ends and ranks are still alive (it was killed),
they get SIGTERM, then SIGKILL after ``--grace`` seconds. When a rank reports 76 (hung), the ranks still
running get SIGKILL after ``BEIT3_HUNG_GRACE_S`` seconds (30, as in the Slurm scripts): they are stuck in
a collective or stopped.

Exit code: the most severe code the ranks recorded, in the order 2 (configuration) > 3 (non-finite) >
76 (hung) > 1 (any other failure, including unknown codes) > 75 (preempted) > 0 (finished), the order in
which the Slurm scripts rank a step's tasks. Without any
record (a program without the hooks), the launcher's own code (0, 2, 3, 75, 76 kept; anything else 1).
One summary line replaces torchrun's traceback.

This module imports neither torch nor deepspeed: the rank-side hooks run in every rank, the launcher starts
in milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ENV_DIR = "BEIT3_LAUNCH_DIR"
EXIT_OK, EXIT_OTHER, EXIT_CONFIG, EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_HUNG = 0, 1, 2, 3, 75, 76
# Most severe first, as the Slurm scripts rank a step's tasks (slurm/common.sh): a configuration error or a
# non-finite stop will not go away by retrying; a hang (requeued within the failure budget) outranks the
# failures it causes in its peers; a preemption counts only when nothing failed.
SEVERITY = (EXIT_CONFIG, EXIT_NONFINITE, EXIT_HUNG, EXIT_OTHER, EXIT_PREEMPTED, EXIT_OK)
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1,
             signal.SIGINT: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}  # fmt: skip
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HUNG_GRACE_ENV, HUNG_GRACE_DEFAULT_S = "BEIT3_HUNG_GRACE_S", 30.0  # as slurm/common.sh

_pending_signal = 0  # a preemption signal that arrived before the Trainer installed its handler


# ----- rank side -----
def _launch_dir() -> Path | None:
    path = os.environ.get(ENV_DIR)
    return Path(path) if path else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _early_handler(signum, frame) -> None:
    global _pending_signal
    _pending_signal = signum


def pending_signal() -> int:
    """The preemption signal received before the Trainer's own handler took over (0: none)."""
    return _pending_signal


def register_rank(rank: int | None = None) -> None:
    """Under ``beit3-launch``: catch preemption signals from now on (acted on by the Trainer at its first
    step) and tell the launcher this process's pid. A no-op otherwise. Idempotent."""
    directory = _launch_dir()
    if directory is None:
        return
    if threading.current_thread() is threading.main_thread():
        for sig in PREEMPT_SIGNALS:  # before the pid is published: a forwarded signal must not kill us
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _early_handler)
                signal.siginterrupt(sig, False)
    info = {"pid": os.getpid(), "rank": rank, "host": socket.gethostname()}
    _write_atomic(directory / f"rank-{os.getpid()}.json", json.dumps(info))


def record_exit(code: int) -> None:
    """Under ``beit3-launch``: record the exit code this rank is about to return (the last call wins)."""
    directory = _launch_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            _write_atomic(directory / f"exit-{os.getpid()}", str(int(code)))


def _code_of(value) -> int:
    if value is None:
        return EXIT_OK
    if isinstance(value, int):
        return value
    return EXIT_OTHER  # sys.exit("message") exits 1


def supervised(main: Callable) -> Callable:
    """Decorate a training program's ``main``: its return value, ``SystemExit`` or exception becomes the
    exit code recorded for ``beit3-launch``. A pass-through when not launched by it."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        if _launch_dir() is None:
            return main(*args, **kwargs)
        register_rank()
        try:
            code = main(*args, **kwargs)
        except SystemExit as exit_:
            record_exit(_code_of(exit_.code))
            raise
        except BaseException:
            record_exit(EXIT_OTHER)
            raise
        record_exit(_code_of(code))
        return code

    return wrapper


# ----- launcher side -----
def combine_exit_codes(codes: list[int]) -> int:
    """The job's exit code from the ranks' codes: the most severe (SEVERITY); unknown codes count as 1."""
    known = [c if c in SEVERITY else EXIT_OTHER for c in codes]
    return min(known, key=SEVERITY.index) if known else EXIT_OTHER


def _is_torchrun(cmd: list[str]) -> int:
    """Index of the first torchrun argument when ``cmd`` runs torchrun, else -1."""
    if cmd and os.path.basename(cmd[0]) == "torchrun":
        return 1
    python_m = len(cmd) >= 3 and os.path.basename(cmd[0]).startswith("python") and cmd[1] == "-m"
    if python_m and cmd[2] in ("torch.distributed.run", "torch.distributed.launch"):
        return 3
    return -1


def child_command(cmd: list[str]) -> list[str]:
    """The command to start: torchrun through a shim that returns its exit code without the traceback."""
    start = _is_torchrun(cmd)
    if start < 0:
        return cmd
    python = cmd[0] if start == 3 else sys.executable  # `python -m torch.distributed.run`: that python
    return [python, "-m", "beit3.engine.supervise", "_torchrun", *cmd[start:]]


def _torchrun(argv: list[str]) -> int:
    """torchrun's main without its ``@record`` wrapper: a failed rank ends in exit 1, not a traceback."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError:
        return EXIT_OTHER
    except SignalException as err:  # torchrun itself was signalled: it has already stopped its workers
        return 128 + int(err.sigval)
    return EXIT_OK


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (R, S, T, Z, ...), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _proc_state(pid) not in (None, "Z", "X")


def _become_subreaper() -> None:
    """Orphaned ranks (their launcher died) are re-parented to this process, which reaps them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _children() -> list[int]:
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(entry.name))
    return out


class Supervisor:
    """Starts the launcher, forwards signals to the registered ranks, collects their exit codes."""

    def __init__(self, cmd: list[str], grace_s: float, directory: Path, hung_grace_s: float, out=sys.stderr):
        self.cmd, self.grace_s, self.dir, self.out = cmd, grace_s, directory, out
        self.hung_grace_s = hung_grace_s
        self.signals: list[int] = []  # received, not yet forwarded
        self.forwarded: int = 0  # the last signal forwarded to the ranks
        self.signalled: set[int] = set()  # rank pids that got it
        self.interrupts = 0
        self.child_pid = -1
        self.child_status: int | None = None
        self.orphan_codes: dict[int, int] = {}

    def say(self, message: str) -> None:
        print(f"beit3-launch: {message}", file=self.out, flush=True)

    # ranks
    def ranks(self) -> dict[int, dict]:
        out = {}
        for path in self.dir.glob("rank-*.json"):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if info.get("host", socket.gethostname()) == socket.gethostname():
                out[int(info["pid"])] = info
        return out

    def recorded(self) -> dict[int, int]:
        codes = {}
        for path in self.dir.glob("exit-*"):
            try:
                codes[int(path.name.split("-", 1)[1])] = int(path.read_text())
            except (OSError, ValueError):
                continue
        return codes

    def _on_signal(self, signum, frame) -> None:
        self.signals.append(signum)

    def _forward_pending(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGINT:
                self.interrupts += 1
                if self.interrupts >= 2:
                    self.say("second interrupt: killing the launcher and every rank")
                    self._kill_all(signal.SIGKILL)
                    continue
            self.forwarded = FORWARDED[signum]
            self.signalled.clear()
            self.say(f"{signal.Signals(signum).name} received: sending {signal.Signals(self.forwarded).name} "
                     f"to the ranks (they checkpoint and exit {EXIT_PREEMPTED})")  # fmt: skip
        if self.forwarded:
            recorded = self.recorded()
            for pid in self.ranks():
                if pid not in self.signalled and pid not in recorded and _alive(pid):
                    self._send(pid, self.forwarded)
                    self.signalled.add(pid)

    @staticmethod
    def _send(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)

    def _kill_all(self, sig: int) -> None:
        for pid in self.ranks():
            self._send(pid, sig)
        if self.child_pid > 0:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child_pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            if pid == self.child_pid:
                self.child_status = code
            else:
                self.orphan_codes[pid] = code

    def run(self) -> int:
        import subprocess

        _become_subreaper()
        for sig in FORWARDED:
            signal.signal(sig, self._on_signal)
        env = {**os.environ, ENV_DIR: str(self.dir)}
        child = subprocess.Popen(child_command(self.cmd), env=env, start_new_session=True)
        self.child_pid = child.pid
        hung_since = None
        while self.child_status is None:
            self._forward_pending()
            self._reap()
            if hung_since is None and EXIT_HUNG in self.recorded().values():
                hung_since = time.monotonic()
            if hung_since is not None and time.monotonic() - hung_since > self.hung_grace_s:
                self._kill_stuck_ranks()
                hung_since = float("inf")
            time.sleep(0.1)
        child.returncode = self.child_status  # reaped here, not by Popen
        self._end_orphans()
        return self._summarise()

    def _kill_stuck_ranks(self) -> None:
        recorded = self.recorded()
        for pid, info in self.ranks().items():
            if pid not in recorded and _alive(pid):
                self.say(f"rank {info.get('rank')} (pid {pid}) is still running after a hang was reported: "
                         "killing it")  # fmt: skip
                self._send(pid, signal.SIGKILL)  # works on a stopped process too

    def _end_orphans(self) -> None:
        """Ranks that outlive their launcher (it was killed) checkpoint on SIGTERM, or die after the grace."""
        recorded = self.recorded()
        alive = [pid for pid in self.ranks() if pid not in recorded and _alive(pid)]
        if alive:
            self.say(f"the launcher ended with {len(alive)} rank(s) still running: sending SIGTERM "
                     f"(SIGKILL after {self.grace_s:g} s)")  # fmt: skip
            for pid in alive:
                self._send(pid, signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            while time.monotonic() < deadline and any(_alive(p) for p in alive):
                self._forward_pending()
                self._reap()
                time.sleep(0.1)
            for pid in alive:
                if _alive(pid):
                    self._send(pid, signal.SIGKILL)
        # Whatever else was re-parented to us (loader workers of orphaned ranks): give it a moment, then kill.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            self._reap()
            left = [p for p in _children() if _alive(p)]
            if not left:
                break
            time.sleep(0.1)
        for pid in _children():
            self._send(pid, signal.SIGKILL)
        self._reap()

    def _summarise(self) -> int:
        ranks, recorded = self.ranks(), self.recorded()
        codes = [recorded[pid] for pid in ranks if pid in recorded]
        codes += [c for pid, c in recorded.items() if pid not in ranks]
        silent = sorted(pid for pid in ranks if pid not in recorded)
        child = self.child_status if self.child_status is not None else EXIT_OTHER
        if codes:
            code = combine_exit_codes(codes)
        else:
            code = child if child in SEVERITY else EXIT_OTHER
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        detail = ", ".join(f"{n} x {c}" for c, n in counts.items()) or "none"
        line = f"exit {code}: rank exit codes {detail}; launcher exit {child}"
        if silent:
            names = ", ".join(f"rank {ranks[p].get('rank')} (pid {p})" for p in silent)
            line += f"; no exit code recorded by {names} (killed by a signal or stopped)"
        self.say(line)
        return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beit3-launch",
        description="Run torchrun or deepspeed keeping the exit codes 0/2/3/75/76/1 and forwarding "
        "SIGTERM/SIGUSR1 (and SIGINT/SIGHUP as SIGTERM) to the ranks.",
        usage="beit3-launch [--grace S] [--] torchrun|deepspeed ...",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=120.0,
        help="seconds that ranks outliving their launcher get to save (default 120)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the launcher command line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``beit3-launch`` (and the internal ``_torchrun`` shim)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_torchrun"]:
        return _torchrun(argv[1:])
    args = build_parser().parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("beit3-launch: error: no command: give e.g. `beit3-launch torchrun --nproc_per_node 2 -m "
              "beit3.pretrain.train ...`", file=sys.stderr)  # fmt: skip
        return EXIT_CONFIG
    raw = os.environ.get(HUNG_GRACE_ENV, "").strip()
    try:
        hung_grace = float(raw) if raw else HUNG_GRACE_DEFAULT_S
    except ValueError:
        hung_grace = -1.0
    if not hung_grace >= 0:
        print(f"beit3-launch: error: {HUNG_GRACE_ENV}={raw!r} must be seconds >= 0", file=sys.stderr)
        return EXIT_CONFIG
    with tempfile.TemporaryDirectory(prefix="beit3-launch-") as directory:
        try:
            return Supervisor(cmd, args.grace, Path(directory), hung_grace).run()
        except FileNotFoundError as err:
            print(f"beit3-launch: error: cannot start {shlex.join(cmd[:1])}: {err.strerror}", file=sys.stderr)
            return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
