"""``beit3-shards`` at scale (issue 15 item 3): N workers write the same bytes as one, an interrupted run
resumes without rewriting finished shards, img2dataset output is read, texts stream in bounded memory."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import signal
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
from tiny_data import noise_image

from beit3.pretrain import shard_writer, shards
from beit3.pretrain.shards import main


def members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture()
def photos(tmp_path):
    """36 images in 3 class folders (JPEG kept, PNG re-encoded), one broken."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            fmt = "PNG" if i % 3 == 0 else "JPEG"
            (root / f"c{c}" / f"{i}.{fmt.lower()}").write_bytes(noise_image(rng, 24 + i, 32, fmt=fmt))
    (root / "c1" / "5.jpeg").write_bytes(b"\xff\xd8 broken")
    return root


def test_ordered_map_runs_chunks_in_other_processes_and_keeps_their_order():
    out = list(shard_writer.ordered_map(_pid_after_sleep, ((i, 1, i) for i in range(12)), 3, 4))
    assert [pos for pos, _, _ in out] == list(range(12))
    assert [res[0] for _, _, res in out] == list(range(12))
    pids = {res[1] for _, _, res in out}
    assert os.getpid() not in pids and len(pids) >= 2


def _pid_after_sleep(i: int) -> tuple[int, int]:
    time.sleep(0.02 * (i % 3 == 0))  # the first of every three is slow: results arrive out of order
    return i, os.getpid()


def test_one_and_four_workers_write_byte_identical_shards(tmp_path, photos, monkeypatch):
    outs = {}
    for n in ("1", "4"):
        out = tmp_path / f"images{n}"
        assert main(["images", str(out), str(photos), "--workers", n, "--max-samples", "5", "--quiet"]) == 0
        outs[n] = out
    assert files(outs["1"]) == files(outs["4"])
    m = manifest(outs["4"])
    assert m["samples"] == 35 and m["skipped"] == {"image_decode": 1} and len(m["shards"]) == 7
    assert sorted(files(outs["4"])) == [f"images-{i:06d}.tar" for i in range(7)] + ["manifest.json"]
    # Texts: many chunks (small ones), so that four workers really interleave.
    monkeypatch.setattr(shards, "TEXT_CHUNK_BYTES", 2000)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} " + "word " * (i % 50) + "\n" for i in range(400)))
    for n in ("1", "4"):
        assert main(["texts", str(tmp_path / f"texts{n}"), str(corpus), "--workers", n, "--quiet"]) == 0
    assert files(tmp_path / "texts1") == files(tmp_path / "texts4")
    assert manifest(tmp_path / "texts4")["samples"] == 400


def _slow_run(argv: list[str]) -> None:
    """A forked child (torch already imported: no 10 s start): its own process group, 30 ms per image."""
    os.setsid()
    prepare = shard_writer.prepare_image

    def slow(*args, **kwargs):
        time.sleep(0.03)
        return prepare(*args, **kwargs)

    shard_writer.prepare_image = slow
    os._exit(main(argv))


def test_a_run_killed_with_sigkill_resumes_without_rewriting_finished_shards(tmp_path, photos, capsys):
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = [str(photos), "--max-samples", "4", "--shorter-side", "20"]
    assert main(["images", str(ref), *args, "--workers", "1", "--quiet"]) == 0
    progress = out / shard_writer.PROGRESS_FILE
    proc = multiprocessing.get_context("fork").Process(
        target=_slow_run, args=(["images", str(out), *args, "--workers", "2", "--quiet"],)
    )
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.is_alive():
            if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
                break
            time.sleep(0.01)
        assert proc.is_alive(), "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its pool workers
    finally:
        proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    done = json.loads(progress.read_text())["shards"]
    assert 2 <= len(done) < len(manifest(ref)["shards"]) and not (out / "manifest.json").exists()
    before = {s["name"]: os.stat(out / s["name"]) for s in done}
    assert main(["images", str(out), *args, "--workers", "2"]) == 0
    assert f"{len(done)} shards kept from an earlier run" in capsys.readouterr().err
    assert files(out) == files(ref)  # no progress file or .tmp left, every byte equal
    for name, st in before.items():  # finished shards were not written again
        now = os.stat(out / name)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    # Run again: complete, nothing written; other options: written again.
    stamp = os.stat(out / "images-000000.tar").st_mtime_ns
    assert main(["images", str(out), *args]) == 0
    assert "already complete" in capsys.readouterr().err
    assert os.stat(out / "images-000000.tar").st_mtime_ns == stamp
    assert main(["images", str(out), str(photos), "--max-samples", "4", "--quiet"]) == 0
    assert os.stat(out / "images-000000.tar").st_mtime_ns != stamp


def _img2dataset_sample(rng, i: int, caption_in: str) -> dict[str, bytes]:
    meta = {
        "url": f"http://example.com/{i}.jpg",
        "key": f"{i:09d}",
        "status": "success",
        "caption": f"json {i}",
    }
    fields = {"jpg": noise_image(rng, 30, 30)}
    if caption_in == "txt":
        fields["txt"] = f"text {i}".encode()
    fields["json"] = json.dumps(meta, indent=4).encode()
    return fields


def test_img2dataset_webdataset_and_files_output_become_pairs(tmp_path, capsys):
    rng = np.random.default_rng(4)
    tars = tmp_path / "wds"  # output_format="webdataset": 00000.tar + 00000.parquet + 00000_stats.json
    tars.mkdir()
    for shard in range(2):
        with tarfile.open(tars / f"{shard:05d}.tar", "w") as tf:
            for i in range(shard * 10, shard * 10 + 5):
                for ext, data in _img2dataset_sample(rng, i, "txt" if i % 2 else "json").items():
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        (tars / f"{shard:05d}_stats.json").write_text("{}")
        (tars / f"{shard:05d}.parquet").write_bytes(b"PAR1")
    with tarfile.open(tars / "00001.tar") as tf:
        last = tf.getmembers()[-1]  # 000000014.json: the only caption of that sample
    with open(tars / "00001.tar", "r+b") as f:
        f.truncate(last.offset_data + 10)  # cut short inside it
    folder = tmp_path / "files"  # output_format="files": 00000/KEY.jpg + KEY.txt + KEY.json
    (folder / "00000").mkdir(parents=True)
    for i in range(4):
        for ext, data in _img2dataset_sample(rng, 100 + i, "txt" if i % 2 else "json").items():
            if not (i == 3 and ext != "jpg"):  # the last image has no caption at all
                (folder / "00000" / f"{100 + i:09d}.{ext}").write_bytes(data)
    out = tmp_path / "pairs"
    assert main(["pairs", str(out), str(folder), str(tars), "--shuffle-seed", "-1", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "samples/s" in err and "MB/s" in err and "\r" not in err  # a summary; no progress bar off a tty
    m = manifest(out)
    captions = [
        v.decode()
        for s in m["shards"]
        for k, v in sorted(members(out / s["name"]).items())
        if k.endswith(".txt")
    ]
    wds = [f"json {i}" if i % 2 == 0 else f"text {i}" for i in (0, 1, 2, 3, 4)]
    assert captions[:3] == ["json 100", "text 101", "json 102"] and captions[3:8] == wds
    assert m["samples"] == 3 + 5 + 4 and captions[8:] == ["json 10", "text 11", "json 12", "text 13"]
    assert m["skipped"] == {"missing_field": 2, "tar_read": 1}  # no caption (files), the cut json
    assert main(["images", str(tmp_path / "images"), str(tars / "00000.tar"), "--quiet"]) == 0
    only = members(tmp_path / "images" / "images-000000.tar")
    assert len(only) == 5 and all(k.endswith(".jpg") for k in only)


def test_gzipped_jsonl_and_txt_give_the_segments_of_the_plain_files(tmp_path):
    docs = [f"doc {i} " + " ".join(f"w{j}" for j in range(i % 7 * 5)) for i in range(60)]
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "{broken\n")
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "b.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress((tmp_path / "b.txt").read_bytes()))
    texts = {}
    for name in ("a.jsonl", "a.jsonl.gz", "b.txt", "b.txt.gz"):
        out = tmp_path / f"out-{name}"
        assert main(["texts", str(out), str(tmp_path / name), "--max-units", "8", "--quiet"]) == 0
        m = manifest(out)
        texts[name] = [members(out / s["name"]) for s in m["shards"]]
        assert m["skipped"] == ({"bad_line": 1} if name.startswith("a") else {})
    assert texts["a.jsonl"] == texts["a.jsonl.gz"] == texts["b.txt"] == texts["b.txt.gz"]
    segs = list(texts["b.txt"][0].values())
    assert segs[0] == b"doc 0" and segs[2] == b"doc 2 w0 w1 w2 w3 w4 w5"


def test_huge_text_files_stream_in_bounded_memory(tmp_path, monkeypatch):
    """A 3 MB gzipped corpus, most of it one line: the conversion's peak Python allocation stays far below
    the file's size (chunks, reads and overlong lines scaled down 64-fold, as if the corpus were 200 MB)."""
    monkeypatch.setattr(shards, "TEXT_CHUNK_BYTES", 16 << 10)
    monkeypatch.setattr(shards, "READ_BYTES", 16 << 10)
    monkeypatch.setattr(shards, "MAX_LINE_BYTES", 16 << 10)
    rng = np.random.default_rng(5)
    words = np.array([f"{i:03d}-long-word-of-twenty" for i in range(1000)])  # few words: tracing is slow
    path = tmp_path / "big.txt.gz"
    with gzip.open(path, "wt", compresslevel=1) as f:
        for _ in range(300):
            f.write(" ".join(words[rng.integers(0, 1000, 100)]) + "\n")
        f.write(" ".join(words[rng.integers(0, 1000, 100_000)]) + "\n")  # one 2.5 MB document
    with gzip.open(path, "rb") as f:
        size = sum(len(line) for line in f)
    assert size > 3_000_000
    out = tmp_path / "out"
    args = ["texts", str(out), str(path), "--workers", "1", "--max-units", "400", "--quiet"]
    tracemalloc.start()
    try:
        assert main(args) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak
    m = manifest(out)
    whole = 300 + 100_000 // 400  # the segments if the long line were not cut
    assert whole < m["samples"] <= whole + size // (16 << 10)  # each cut ends one segment early at most
    assert m["skipped"] == {}
    longest = max(len(v.split()) for v in members(out / m["shards"][0]["name"]).values())
    assert longest == 400


def test_read_lines_gives_offsets_and_cuts_overlong_lines_the_same_way_however_the_file_is_read(
    monkeypatch,
):
    data = b"one\ntwo three\n" + b"x" * 5 + b" " + b"y" * 3 + b" zz\nlast"
    want = [(0, b"one\n"), (4, b"two "), (8, b"three\n"), (14, b"xxxxx "), (20, b"yyy zz\n"), (27, b"last")]
    for read_bytes in (1, 4, 7, 1 << 20):  # lines and pieces across reads, or all in one read
        monkeypatch.setattr(shards, "READ_BYTES", read_bytes)
        assert list(shards.read_lines(io.BytesIO(data), 0, max_line=8)) == want
        f = io.BytesIO(data)
        f.seek(8)  # where a resumed run starts: the rest is cut as in the whole read
        assert list(shards.read_lines(f, 8, max_line=8)) == want[2:]


def test_progress_off_a_terminal_is_one_line_per_interval_and_nothing_when_quiet(capsys):
    progress = shard_writer.Progress(100, "input", quiet=False, every=0.0)
    assert progress.bar is None  # pytest's stderr is no terminal: no tqdm bar
    progress.update(40, 38)
    progress.close()
    quiet = shard_writer.Progress(100, "input", quiet=True, every=0.0)
    quiet.update(40, 38)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "40/100 input read, 38 samples written" in err


def test_an_interrupted_gzipped_text_run_resumes_inside_a_chunk_to_the_same_bytes(tmp_path, monkeypatch):
    """Shards end inside work chunks and documents: the resumed run seeks (decompresses) to the chunk, drops
    what the finished shards hold and writes the rest as one run would."""
    monkeypatch.setattr(shards, "TEXT_CHUNK_BYTES", 3000)
    corpus = tmp_path / "c.jsonl.gz"
    docs = [json.dumps({"text": f"d{i} " + "x " * (i % 40)}) for i in range(300)]
    corpus.write_bytes(gzip.compress(("\n".join(docs) + "\n{bad\n").encode()))
    args = [str(corpus), "--max-units", "7", "--max-samples", "45", "--workers", "1", "--quiet"]
    assert main(["texts", str(tmp_path / "ref"), *args]) == 0
    work, calls = shards._work, []

    def dies_on_the_fifth_chunk(payload):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill) does between two shards' writes
        return work(payload)

    monkeypatch.setattr(shards, "_work", dies_on_the_fifth_chunk)
    with pytest.raises(KeyboardInterrupt):
        main(["texts", str(tmp_path / "out"), *args])
    state = json.loads((tmp_path / "out" / shard_writer.PROGRESS_FILE).read_text())
    assert state["resume"][1] > 0 and len(state["shards"]) >= 2  # inside a chunk, after finished shards
    monkeypatch.setattr(shards, "_work", work)
    assert main(["texts", str(tmp_path / "out"), *args]) == 0
    assert files(tmp_path / "out") == files(tmp_path / "ref")
    assert manifest(tmp_path / "ref")["skipped"] == {"bad_line": 1}
