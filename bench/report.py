"""What every benchmark's results file carries: the machine, the versions, the date, the command; and writing
``<name>.md`` + ``<name>.json`` under the results folder. Imports torch alone (the GPU scripts use it too)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
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
