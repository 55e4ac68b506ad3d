"""The hang watchdog: no step progress for too long dumps this rank's Python stacks, names the rank that is
behind, and ends the process with EXIT_HUNG (76), which the Slurm scripts requeue within a failure budget.

Each rank runs one daemon thread. The training loop marks where each optimizer step begins and ends
(``step_begins``, ``progress``: a few attribute writes, no I/O on the step path). The thread
wakes every ``poll`` seconds, writes ``<run dir>/heartbeat/rank<r>.json`` (step, time of the last progress,
pid, host) and, when the limit has passed without progress, writes
``<run dir>/hang/rank<r>-<UTC time>.txt`` with ``faulthandler`` (every thread), reads every rank's
heartbeat, logs which ranks are behind (lowest step, or a heartbeat that stopped: the process is stopped
or frozen and cannot dump its own stacks; its peers do), records the exit code for ``beit3-launch`` and
calls ``os._exit(76)``: a rank blocked in a gloo/NCCL collective cannot return normally.

The limit: ``BEIT3_WATCHDOG_S`` (environment) or ``TrainerConfig.watchdog_s`` when set (0 turns the
watchdog off), else ``max(floor, factor x median step time)`` over the last 50 steps (``watchdog_floor_s``
600 s, ``watchdog_factor`` 10). With the derived limit the first step after the start and the time
between steps (logging, evaluation, saving) get at least ``2 x floor`` (20 min by default): they are
legitimately slow and unrelated to the step time. A fixed limit applies to everything.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from beit3.engine.supervise import EXIT_HUNG, record_exit

log = logging.getLogger(__name__)

ENV_LIMIT = "BEIT3_WATCHDOG_S"
STEP_WINDOW = 50
SLOW_FLOOR_FACTOR = 2.0  # 20 min by default: below the 30 min collective timeout


def limit_from_env(configured: float | None) -> float | None:
    """The fixed limit in force: ``BEIT3_WATCHDOG_S`` if set and not empty, else ``configured``.

    Raises ValueError naming the variable when it is not a number >= 0."""
    raw = os.environ.get(ENV_LIMIT, "").strip()
    if not raw:
        return configured
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(
            f"{ENV_LIMIT}={raw!r} must be a number of seconds >= 0 (0: no watchdog; unset: derived)"
        )
    return value


def derived_limit(
    step_times: list[float], floor_s: float, factor: float, fixed_s: float | None = None
) -> float:
    """Seconds without step progress before the watchdog fires: ``fixed_s`` if given, else
    ``max(floor_s, factor x median(step_times))`` (``floor_s`` alone before any step time is known)."""
    if fixed_s is not None:
        return fixed_s
    if not step_times:
        return floor_s
    return max(floor_s, factor * statistics.median(step_times))


def behind_report(heartbeats: list[dict], now: float, stale_after_s: float, host: str) -> str:
    """One sentence naming the ranks that are behind. In order of evidence: ranks whose heartbeat stopped
    (older than ``stale_after_s``: stopped or frozen, with the process state when it runs on ``host``); else
    ranks outside any collective while others wait in one (the heartbeat's ``collective`` and ``where``);
    else the lowest step. Pure but for reading ``/proc`` of stale ranks on this host."""
    if not heartbeats:
        return "no heartbeat files found"
    beats = sorted(heartbeats, key=lambda h: h["rank"])
    stale = [hb for hb in beats if now - hb["written"] > stale_after_s]
    live = [hb for hb in beats if hb not in stale]
    waiting = [hb for hb in live if hb.get("collective")]
    elsewhere = [hb for hb in live if "collective" in hb and not hb["collective"]]
    low = min(hb["step"] for hb in beats)

    def name(hb: dict) -> str:
        return f"rank {hb['rank']} (pid {hb['pid']} on {hb['host']}) at step {hb['step']}"

    parts = []
    for hb in stale:
        state = _state_words(hb["pid"]) if hb["host"] == host else "its state is unknown (another host)"
        age = now - hb["written"]
        parts.append(f"{name(hb)}: heartbeat stopped {age:.0f} s ago, {state}; it cannot dump its own "
                     "stacks, its peers' dumps show where they wait for it")  # fmt: skip
    if not parts and waiting and elsewhere:
        peers = f"{len(waiting)} rank(s) wait in {waiting[0].get('where', 'a collective')}"
        for hb in elsewhere:
            parts.append(f"{name(hb)}: outside any collective, in {hb.get('where', '?')}, while {peers}")
    if not parts and low < max(hb["step"] for hb in beats):
        parts = [f"{name(hb)}: the lowest step" for hb in beats if hb["step"] == low]
    if not parts:
        where = beats[0].get("where", "?")
        return f"no rank is behind: every rank is alive at step {low} (rank {beats[0]['rank']} in {where})"
    return "behind: " + "; ".join(parts)


COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "monitored_barrier",
    "all_to_all", "all_to_all_single", "reduce", "gather", "scatter", "send", "recv",
})  # fmt: skip


def main_thread_position() -> tuple[str, bool]:
    """Where the main thread is (innermost frame, ``function (file:line)``) and whether it is inside a
    torch.distributed collective: what a heartbeat tells the peers about this rank."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "?", False
    where = f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
    collective, depth = False, 0
    while frame is not None and depth < 12:
        code = frame.f_code
        if code.co_name in COLLECTIVES and "distributed" in code.co_filename:
            collective = True
            where = f"{code.co_name} ({Path(code.co_filename).name}:{frame.f_lineno})"
            break
        frame, depth = frame.f_back, depth + 1
    return where, collective


def _state_words(pid: int) -> str:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "the process is gone"
    return {
        "T": "the process is stopped (SIGSTOP)",
        "t": "the process is stopped by a debugger",
        "D": "the process is in uninterruptible I/O",
        "Z": "the process has exited",
    }.get(state, f"the process is in state {state}")


class Watchdog:
    """One rank's hang watchdog (see the module docstring); ``start`` and ``stop`` bracket ``fit``."""

    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        fixed_s: float | None = None,
        floor_s: float = 600.0,
        factor: float = 10.0,
        exit_fn=os._exit,
    ):
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.fixed_s, self.floor_s, self.factor = fixed_s, floor_s, factor
        self.enabled = fixed_s is None or fixed_s > 0
        self._exit = exit_fn
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._step = self._first_step = 0
        self._step_began = self._last_progress = time.monotonic()
        self._last_progress_wall = time.time()
        self._slow = True  # until the first step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._host = socket.gethostname()
        self._started_wall = time.time()
        self.fired_file: Path | None = None

    # ----- called by the training loop -----
    def step_begins(self) -> None:
        """An optimizer step starts: the step limit applies until ``progress``."""
        self._step_began = self._last_progress = time.monotonic()
        self._slow = not self._step_times and self._step == self._first_step  # the first step is slow

    def progress(self, step: int) -> None:
        """A step finished (``step`` steps done); what follows until the next step (logging, evaluation,
        saving) is a slow phase."""
        now = time.monotonic()
        if self._step != self._first_step or self._step_times:  # the first step's time (warm-up) is left out
            self._step_times.append(now - self._step_began)
        self._step = step
        self._last_progress, self._last_progress_wall = now, time.time()
        self._slow = True

    # ----- the limit -----
    def limit(self) -> float:
        """The current limit in seconds: a fixed limit applies to everything; the derived one is raised to
        ``2 x floor`` for the first step and between steps (logging, evaluation, saving)."""
        fast = derived_limit(list(self._step_times), self.floor_s, self.factor, self.fixed_s)
        if self._slow and self.fixed_s is None:
            return max(fast, SLOW_FLOOR_FACTOR * self.floor_s)
        return fast

    def poll_s(self) -> float:
        """How often the thread wakes: a tenth of the step limit, between 0.2 and 15 s."""
        fast = derived_limit(list(self._step_times), self.floor_s, self.factor, self.fixed_s)
        return min(15.0, max(0.2, fast / 10))

    # ----- the thread -----
    def start(self, step: int = 0) -> Watchdog:
        """Start the thread at ``step`` (where training resumes); a no-op when the limit is 0."""
        self._step = self._first_step = step
        if not self.enabled or self._thread is not None:
            return self
        self._last_progress, self._last_progress_wall = time.monotonic(), time.time()
        self._started_wall = time.time()
        try:
            (self.run_dir / "heartbeat").mkdir(parents=True, exist_ok=True)
            self._write_heartbeat()
        except OSError as err:  # the watch itself still works; only the report of the others is lost
            log.warning("watchdog: cannot write heartbeats in %s (%s)", self.run_dir, err)
        self._thread = threading.Thread(target=self._run, name="beit3-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (the loop ended)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s()):
            with contextlib.suppress(OSError):  # a full or unreachable file system must not stop the watch
                self._write_heartbeat()
            idle = time.monotonic() - self._last_progress
            if idle > self.limit() and not self._stop.is_set():
                try:
                    self._fire(idle)
                except Exception:  # the exit below must happen whatever the report hit
                    log.exception("watchdog: the hang report failed")
                    record_exit(EXIT_HUNG)
                    self._exit(EXIT_HUNG)

    def _heartbeat_path(self, rank: int) -> Path:
        return self.run_dir / "heartbeat" / f"rank{rank:05d}.json"

    def _write_heartbeat(self) -> None:
        where, collective = main_thread_position()
        beat = {
            "where": where,
            "collective": collective,
            "rank": self.rank,
            "pid": os.getpid(),
            "host": self._host,
            "step": self._step,
            "progress": self._last_progress_wall,
            "written": time.time(),
            "started": self._started_wall,
        }
        path = self._heartbeat_path(self.rank)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(beat))
        os.replace(tmp, path)

    def _read_heartbeats(self) -> list[dict]:
        beats = []
        for rank in range(self.world_size):
            try:
                beat = json.loads(self._heartbeat_path(rank).read_text())
            except (OSError, ValueError):
                continue
            # A file left by an earlier attempt of this run says nothing about this one.
            if beat.get("started", 0) >= self._started_wall - 3600 or rank == self.rank:
                beats.append(beat)
        return beats

    def _fire(self, idle: float) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dump = self.run_dir / "hang" / f"rank{self.rank:05d}-{stamp}.txt"
        try:
            dump.parent.mkdir(parents=True, exist_ok=True)
            with open(dump, "w") as f:
                f.write(f"rank {self.rank} pid {os.getpid()} on {self._host}: no step progress for "
                        f"{idle:.1f} s (limit {self.limit():.1f} s) after step {self._step}\n\n")  # fmt: skip
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            self.fired_file = dump
        except OSError as err:
            dump = f"(not written: {err})"
        stale = 3 * self.poll_s() + 2.0
        report = behind_report(self._read_heartbeats(), time.time(), stale, self._host)
        log.error(
            "watchdog: rank %d made no step progress for %.0f s (limit %.0f s, after step %d); %s. "
            "Stacks of this rank: %s. Exiting with %d (hung).",
            self.rank, idle, self.limit(), self._step, report, dump, EXIT_HUNG,
        )  # fmt: skip
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        self._wait_for_peer_dumps()
        record_exit(EXIT_HUNG)
        self._exit(EXIT_HUNG)

    def _wait_for_peer_dumps(self) -> None:
        """The first rank to fire would exit before its peers' watchdogs fire (their last progress came up
        to a step later), and the launcher would then end them: their stacks, where they wait for it, would
        be lost. So wait, at most two polls and a second, for every rank's dump of this attempt."""
        if self.world_size <= 1:
            return
        hang, deadline = self.run_dir / "hang", time.monotonic() + 2 * self.poll_s() + 1.0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                dumped = {
                    p.name[4:9] for p in hang.glob("rank*-*.txt") if p.stat().st_mtime >= self._started_wall
                }
                if len(dumped) >= self.world_size:
                    return
            time.sleep(0.1)
