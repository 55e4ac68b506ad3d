"""beit3.engine.workers: DataLoader workers still hand over their batches when TMPDIR is a deep folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A loader with two workers started as the project's loaders start theirs (workers_starting, init_worker);
# DataLoader's timeout turns the failure (a dropped batch: the training process would wait forever) into
# an error. Prints the batches' sum and multiprocessing's temporary folder.
LOADER = """
import multiprocessing.process, sys, torch
from torch.utils.data import DataLoader
from beit3.engine.workers import init_worker, short_socket_tempdir, workers_starting

class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return torch.full((4,), float(i))

if sys.argv[1] == "plain":  # torch's own start, without the project's helper
    batches = iter(DataLoader(Numbers(), batch_size=2, num_workers=2, timeout=10))
else:
    loader = DataLoader(Numbers(), batch_size=2, num_workers=2, timeout=10, worker_init_fn=init_worker)
    with workers_starting():
        batches = iter(loader)
print(int(sum(b.sum() for b in batches)), multiprocessing.process.current_process()._config.get("tempdir"))
print("AGAIN", short_socket_tempdir())  # the folder is made once
"""


def _run(tmp_path: Path, tmpdir: Path, mode: str) -> subprocess.CompletedProcess:
    tmpdir.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def _deep(tmp_path: Path) -> Path:
    from beit3.engine.workers import LISTENER_SUFFIX, SOCKET_PATH_MAX

    deep = tmp_path / ("d" * max(1, SOCKET_PATH_MAX - LISTENER_SUFFIX - len(str(tmp_path))))
    assert len(str(deep)) + LISTENER_SUFFIX > SOCKET_PATH_MAX
    return deep


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the 107-byte socket path is Linux's")
def test_torch_alone_loses_the_batches_under_a_deep_tmpdir(tmp_path):
    # The defect the helper works around, shown with torch alone: the batch cannot be sent.
    proc = _run(tmp_path, _deep(tmp_path), "plain")
    assert proc.returncode != 0
    assert "AF_UNIX path too long" in proc.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the 107-byte socket path is Linux's")
def test_workers_started_by_the_project_deliver_every_batch_under_a_deep_tmpdir(tmp_path):
    proc = _run(tmp_path, _deep(tmp_path), "project")
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, folder = proc.stdout.splitlines()[0].split()
    assert int(total) == 4 * sum(range(8))
    assert folder.startswith(("/tmp/pymp-", "/var/tmp/pymp-", "/dev/shm/pymp-"))
    assert "AGAIN None" in proc.stdout
    assert not Path(folder).exists(), "the short folder must be removed at exit"


def test_a_short_tmpdir_is_left_as_it_is(tmp_path):
    proc = _run(tmp_path, tmp_path / "t", "project")
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, folder = proc.stdout.splitlines()[0].split()
    assert int(total) == 4 * sum(range(8))
    assert folder == "None" or folder.startswith(str(tmp_path / "t"))
