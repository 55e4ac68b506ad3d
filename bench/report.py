"""What every benchmark's results file carries: the machine, the versions, the date, the command; and writing
``<name>.md`` + ``<name>.json`` under the results folder; and the interleaved A/B timing the CPU comparisons
use. Imports torch alone (the GPU scripts use it too)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
from collections.abc import Callable
from pathlib import Path

import torch


def hide_note(argv: list[str]) -> list[str]:
    """The arguments with the value of ``--note`` replaced by a pointer (the note is printed below)."""
    return ["(see note)" if i and argv[i - 1] == "--note" else a for i, a in enumerate(argv)]


def environment_lines(script: str, argv: list[str]) -> list[str]:
    """Markdown bullet lines: CPU and threads, torch/Python/OS, the date (UTC), the command run."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- device: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        f"- date: {now}",
        f"- command: `python {script} {shlex.join(hide_note(argv))}`",
    ]


def write_results(results_dir: Path, name: str, text: str, record) -> None:
    """Print ``text`` and write it to ``<results_dir>/<name>.md``, ``record`` to ``<name>.json``."""
    print(text)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.md").write_text(text)
    (results_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")


def interleaved_timing(
    a: Callable[[], tuple[float, float]], b: Callable[[], tuple[float, float]], warmup: int, steps: int
) -> dict[str, tuple[float, float, float]]:
    """Time two variants' steps alternately (A then B, B then A, ...: a shared machine's load hits both),
    each step returning its (wall, CPU) seconds; after ``warmup`` rounds, the medians of ``steps`` rounds:
    ``{"wall": (A ms, B ms, B / A), "cpu": (...)}``."""
    samples: dict[tuple[str, str], list[float]] = {}
    for i in range(warmup + steps):
        order = [("a", a), ("b", b)]
        if i % 2:
            order.reverse()
        for name, step in order:
            wall, cpu = step()
            if i >= warmup:
                samples.setdefault(("wall", name), []).append(wall)
                samples.setdefault(("cpu", name), []).append(cpu)
    out = {}
    for kind in ("wall", "cpu"):
        a_s, b_s = statistics.median(samples[kind, "a"]), statistics.median(samples[kind, "b"])
        out[kind] = (a_s * 1e3, b_s * 1e3, b_s / a_s)
    return out


def timing_cells(row: dict) -> list[str]:
    """The table cells of an :func:`interleaved_timing` result: A ms, B ms, B / A, for wall then CPU time."""
    cells = []
    for kind in ("wall", "cpu"):
        a_ms, b_ms, ratio = row[kind]
        cells += [f"{a_ms:.1f}", f"{b_ms:.1f}", f"{ratio:.2f}x"]
    return cells
