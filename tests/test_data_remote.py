"""Remote shards (issue 15 item 1): webdataset's URL forms (``http://`` from a server on 127.0.0.1,
``pipe:cat``) give the local files' batches tensor for tensor and resume exactly (by skipping samples);
failed transfers are retried with exponential backoff, a shard that keeps failing is skipped for the round
and counted; stream damage is counted and ends the shard; specs expand as webdataset expands them; and a
2-rank ``beit3-pretrain`` over HTTP, killed with SIGKILL and resumed, has the uninterrupted run's losses."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from bad_input_fixtures import corrupt_header, cut, data_offsets, header_offsets, jpeg, overwrite, tar_shard
from engine_helpers import free_port, tensorboard_scalars
from test_data_loader import _assert_same, _keys, make_cfg, take
from tiny_data import write_pretrain_data, write_tiny_shards

from beit3.pretrain.data import DataConfigError, build_pretrain_loader, expand_shards, tario
from beit3.pretrain.data.tario import RemoteReadError, gopen_url, iter_shard

SHARDS = {"images": 3, "texts": 2, "pairs": 2}  # shards per kind, 4 samples each


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server.root``; ``server.behave(path, n)`` (for the n-th request of that path) may make the
    request fail instead: ``"fail"`` (HTTP 503) or ``"cut"`` (the connection closes halfway through)."""

    def __init__(self, request, client_address, server) -> None:
        super().__init__(request, client_address, server, directory=server.root)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests[self.path] += 1
            how = self.server.behave(self.path, self.server.requests[self.path])
        if how == "fail":
            self.send_error(503)
        elif how == "cut":
            body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    for kind, n in SHARDS.items():
        write_tiny_shards(str(root / kind), kind, 4 * n, 4, seed=n)
    return root


def _ok(path: str, n: int) -> str:
    return "ok"


@pytest.fixture(scope="module")
def server():
    """An HTTP server on 127.0.0.1 in a thread of the test process, for the whole module."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.root, srv.lock, srv.requests, srv.behave = None, threading.Lock(), Counter(), _ok
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@contextlib.contextmanager
def serving(server, root: Path, behave=_ok):
    """``server`` serves ``root`` with ``behave`` and fresh request counts; yields its base URL."""
    server.root, server.behave = str(root), behave
    server.requests.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.behave = _ok


@pytest.fixture()
def http_root(server, root):
    with serving(server, root) as base:
        yield base


def cfg_at(root: Path, base: str | None = None, **kw):
    """The loader tests' config over this module's shards: the local directories, or under ``base`` the
    specs of a user's webdataset shards, brace ranges (``pipe:cat /d/images/images-{000000..000002}.tar``)."""
    shards = {
        f"{kind[:-1]}_shards": [str(root / kind)]
        if base is None
        else [f"{base}/{kind}/{kind}-{{000000..{n - 1:06d}}}.tar"]
        for kind, n in SHARDS.items()
    }
    return make_cfg(root, **shards, return_keys=True, **kw)


def assert_same_batches(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        _assert_same(a, b)


@pytest.mark.parametrize("form", ["http", "pipe"])
def test_remote_shards_give_the_local_batches_and_resume_exactly(root, http_root, tok, form):
    base = http_root if form == "http" else f"pipe:cat {root}"
    reference = build_pretrain_loader(cfg_at(root), tok, 2, 2, 2)
    expected = take(reference, 6)
    remote = build_pretrain_loader(cfg_at(root, base), tok, 2, 2, 2)
    assert remote.shards["image"][0] == f"{base}/images/images-000000.tar"  # braces expanded, a URL kept
    assert_same_batches(expected, take(remote, 6))
    assert remote.counters() == {**reference.counters(), "remote/retries": 0, "remote/skipped_shards": 0}
    first = build_pretrain_loader(cfg_at(root, base), tok, 2, 2, 2)
    take(first, 3)
    state = first.state_dict()
    sources = state["producers"][0]["sources"]
    # Mid-shard positions (resumed by skipping samples) and buffered samples (re-read from a new stream).
    assert any(index % 4 for src in sources.values() for _, _, index in src["open"])
    assert all(src["buffer"] for src in sources.values())
    resumed = build_pretrain_loader(cfg_at(root, base), tok, 2, 2, 2)
    resumed.load_state_dict(state)
    assert_same_batches(expected[3:], take(resumed, 3))
    assert resumed.counters() == remote.counters()


def test_failed_and_cut_transfers_are_retried_with_exponential_backoff(root, server, tok, monkeypatch):
    sleeps = []
    monkeypatch.setattr(tario, "sleep", sleeps.append)
    expected = take(build_pretrain_loader(cfg_at(root), tok, 2, 2, 2), 6)
    # Each shard's first request fails (HTTP 503), its second is cut halfway (after some samples were read).
    with serving(server, root, lambda path, n: {1: "fail", 2: "cut"}.get(n, "ok")) as base:
        loader = build_pretrain_loader(cfg_at(root, base, remote_backoff=0.5), tok, 2, 2, 2)
        assert_same_batches(expected, take(loader, 6))
    opened = len(server.requests)
    assert opened == sum(SHARDS.values()) and all(n >= 3 for n in server.requests.values())
    counts = loader.counters()
    assert counts["remote/retries"] == 2 * opened and counts["remote/skipped_shards"] == 0
    assert Counter(sleeps) == {0.5: opened, 1.0: opened}  # per shard: 0.5 s, then 1 s


def test_a_shard_that_keeps_failing_is_skipped_each_round_and_counted(root, server, tok, monkeypatch):
    monkeypatch.setattr(tario, "sleep", lambda s: None)
    bad = "/images/images-000001.tar"
    with serving(server, root, lambda path, n: "fail" if path == bad else "ok") as base:
        cfg = cfg_at(root, base, remote_tries=2, open_shards=1, shuffle_buffer=0)
        loader = build_pretrain_loader(cfg, tok, 4, 1, 1)
        keys = _keys(take(loader, 6), "image")  # 24 images: three rounds over the two good shards
    good = [f"image{i:05d}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert Counter(keys) == dict.fromkeys(good, 3)
    counts = loader.counters()
    tried = server.requests[bad]
    assert tried >= 4 and counts["remote/skipped_shards"] == tried // 2 == counts["remote/retries"]
    assert counts["skipped/tar_read"] == 0


def test_failing_commands_and_refused_connections_raise_after_their_tries(monkeypatch, tmp_path):
    sleeps, reports = [], []
    monkeypatch.setattr(tario, "sleep", sleeps.append)
    for url in (f"pipe:cat {tmp_path}/missing.tar", f"http://127.0.0.1:{free_port()}/a.tar"):
        sleeps.clear(), reports.clear()
        with pytest.raises(RemoteReadError, match="exited with status"):
            list(iter_shard(url, report=lambda *r: reports.append(r), tries=3, backoff=0.25))
        assert sleeps == [0.25, 0.5] and [kind for kind, _, _ in reports] == ["remote/retries"] * 2


def test_stream_damage_is_counted_and_ends_the_shard(tmp_path, server):
    keys = [f"k{i}" for i in range(5)]

    def shard(name):
        return tar_shard(tmp_path / name, [(f"{k}.jpg", jpeg(size=24 + 8 * i)) for i, k in enumerate(keys)])

    def read(url):
        reports = []
        got = [s.key for s, _, _ in iter_shard(url, report=lambda *r: reports.append(r[0])) if s is not None]
        return got, reports

    corrupt = shard("corrupt.tar")
    corrupt_header(corrupt, "k2.jpg")
    assert read(f"pipe:cat {corrupt}") == (["k0", "k1"], ["tar_read"])  # a local read resyncs, a stream ends
    zeroed = shard("zeroed.tar")
    overwrite(zeroed, header_offsets(zeroed)["k2.jpg"], bytes(512))  # an end-of-archive marker, then data
    assert read(f"pipe:cat {zeroed}") == (["k0", "k1"], ["tar_read"])
    truncated = shard("cut.tar")
    offset, size = data_offsets(truncated)["k3.jpg"]
    cut(truncated, offset + size // 2)
    assert read(f"pipe:cat {truncated}") == (["k0", "k1", "k2"], ["tar_read"])  # cut, and `cat` exits 0
    with serving(server, tmp_path) as base:  # served whole: the transfer succeeds, the shard is cut
        assert read(f"{base}/cut.tar") == (["k0", "k1", "k2"], ["tar_read"])
    gz = tmp_path / "g.tar.gz"
    gz.write_bytes(gzip.compress(shard("plain.tar").read_bytes()))
    got, reports = read(f"pipe:cat {gz}")
    assert got == [] and reports == ["tar_read"]
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    assert read(f"pipe:cat {empty}") == ([], ["tar_read"])


def test_specs_expand_as_webdataset_does_and_impossible_ones_are_config_errors(tmp_path, monkeypatch):
    local = write_tiny_shards(str(tmp_path / "d"), "pairs", 4, 2)
    got = expand_shards([
        "http://h:1/a-{000..002}.tar::https://h/b-{x,y}.tar",
        "pipe:cat /d/c-{8..10}.tar",
        f"file://{tmp_path}/d/pairs-{{000000..000001}}.tar",
    ])  # fmt: skip
    assert got == sorted([
        *(f"http://h:1/a-{i:03d}.tar" for i in range(3)), "https://h/b-x.tar", "https://h/b-y.tar",
        "pipe:cat /d/c-8.tar", "pipe:cat /d/c-9.tar", "pipe:cat /d/c-10.tar", *local,
    ])  # fmt: skip
    monkeypatch.setenv("WDS_BUCKET", "laion")
    assert expand_shards("s3://${BUCKET}/{0..1}.tar") == ["s3://laion/0.tar", "s3://laion/1.tar"]
    assert gopen_url("s3://laion/0.tar") == "pipe:aws s3 cp s3://laion/0.tar -"
    assert gopen_url("http://h/a b.tar") == f"pipe:{tario.CURL} 'http://h/a b.tar'"  # quoted for the shell
    assert gopen_url("gs://b/0.tar") == "gs://b/0.tar"  # webdataset's own gsutil handler
    with pytest.raises(DataConfigError, match="unknown URL scheme 'ftp'"):
        expand_shards(["ftp://h/a.tar"])
    with pytest.raises(DataConfigError, match="no shard file matches"):
        expand_shards([f"file://{tmp_path}/none-{{0..1}}.tar"])  # local checks stay for file://
    with pytest.raises(DataConfigError, match="WDS_NOPE"):
        expand_shards(["http://h/${NOPE}.tar"])
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataConfigError, match="`curl`, which is not on PATH"):
        expand_shards(["https://h/a.tar"])
    assert expand_shards(["pipe:anything {1..2}"]) == ["pipe:anything 1", "pipe:anything 2"]


# ----- acceptance: 2-rank beit3-pretrain over HTTP, SIGKILL, resume -----
@pytest.mark.slow
@pytest.mark.multiprocess
def test_pretraining_over_http_killed_and_resumed_has_the_uninterrupted_losses(tmp_path, server):
    """test_pretrain_e2e's run (2 ranks, ZeRO-3, a loader worker each, dropout and drop path, checkpoints
    every 2 steps) with its three streams from the test's HTTP server, SIGKILLed (every process of the
    tree) after a checkpoint and resumed: the steps after the checkpoint have exactly the uninterrupted
    run's losses (dropout, drop path, masking RNG, data state), while the server fails the first request of
    each shard (retried and logged)."""
    import test_pretrain_e2e as e2e

    assets = write_pretrain_data(tmp_path / "data")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    kinds = ("images", "texts", "pairs")
    urls = [f'data.{k[:-1]}_shards=["{base}/{k}/{k}-{{000000..000002}}.tar"]' for k in kinds]
    extra = [a for s in (*urls, "data.remote_backoff=0.05") for a in ("--set", s)]
    steps = 6

    def run(out: Path) -> subprocess.CompletedProcess:
        proc = subprocess.run(e2e.command(assets, out, steps, *extra), env=e2e.env(), capture_output=True,
                              text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    with serving(server, assets["root"]):
        reference = tmp_path / "reference"
        run(reference)
        assert len(server.requests) == 9, server.requests  # every shard read over HTTP
    expected = tensorboard_scalars(reference, "loss/total")
    assert sorted(expected) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    pointer = killed / "checkpoints" / "latest"
    with serving(server, assets["root"], lambda path, n: "fail" if n == 1 else "ok"):
        victim = subprocess.Popen(e2e.command(assets, killed, steps, *extra), env=e2e.env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)  # fmt: skip
        try:
            deadline = time.time() + 200
            while time.time() < deadline and victim.poll() is None:
                if pointer.is_file() and pointer.read_text().strip() >= "step00000002":
                    break
                time.sleep(0.05)
            assert victim.poll() is None, "the run ended before it could be killed"
        finally:  # every process of the tree, ranks first (as a node failure would); curls come and go
            tree = []
            with contextlib.suppress(psutil.NoSuchProcess):
                tree = psutil.Process(victim.pid).children(recursive=True)
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            psutil.wait_procs(tree, timeout=30)
    saved = int(pointer.read_text().strip().removeprefix("step"))
    assert saved < steps, "the run finished before it was killed"
    with serving(server, assets["root"], lambda path, n: "fail" if n == 1 else "ok"):
        proc = run(killed)
    assert f"at step {saved}" in proc.stdout + proc.stderr
    resumed = tensorboard_scalars(killed, "loss/total")
    for step in range(saved + 1, steps + 1):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    retries = tensorboard_scalars(killed, "data/remote/retries")
    assert retries and max(retries.values()) > 0  # the failed requests were retried and logged
