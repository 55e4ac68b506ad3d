"""bench/finetune_stream.py runs end to end at a tiny size and writes its table (a harness check: the
benchmark is a program, its figures are not asserted)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import finetune_stream as bench  # noqa: E402


def test_jpeg_comment_makes_distinct_files_of_the_same_pixels(tmp_path):
    from PIL import Image

    (blob,) = bench.distinct_jpegs(1, 24, 16, seed=0)
    a, b = bench.with_comment(blob, b"train 1"), bench.with_comment(blob, b"train 2")
    assert a != b
    (tmp_path / "a.jpg").write_bytes(a)
    (tmp_path / "b.jpg").write_bytes(b)
    with Image.open(tmp_path / "a.jpg") as x, Image.open(tmp_path / "b.jpg") as y:
        assert x.size == (24, 16) and x.tobytes() == y.tobytes()


def test_the_benchmark_writes_a_row_per_size_and_worker_count(tmp_path):
    work = tmp_path / "work"
    code = bench.main(["--sizes", "40", "80", "--workers", "1", "--batches", "3", "--warmup", "1",
                       "--batch-size", "4", "--repeats", "1", "--img-size", "32", "--full-epoch",
                       "--augment", "none", "--work-dir", str(work), "--name", "smoke",
                       "--results-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "smoke.json").read_text())
    rows = record["rows"]
    assert [(r["size"], r["workers"]) for r in rows] == [(40, 1), (80, 1)]
    for r in rows:
        assert r["batches"] == 3 and r["step"] == "data"
        assert r["images_per_s"] > 0 and r["cpu_ms_per_image"] > 0
        assert r["main_peak_rss_mib"] > 0 and r["tree_peak_pss_mib"] > 0
        assert r["workers_peak_rss_mib"] > 0 and r["largest_worker_rusage_mib"] > 0  # the worker was seen
        assert r["processes_seen"] == 2  # the main process and its one worker
    (ratio,) = record["ratios"]
    assert ratio["workers"] == 1 and ratio["main"] > 0 and ratio["tree_pss"] > 0
    assert record["trees"]["80"]["index_bytes"] > record["trees"]["40"]["index_bytes"] > 0
    text = (tmp_path / "smoke.md").read_text()
    assert "| 80 | 1 | 3 (0.15) |" in text and "at most 1.2x" in text and "- command:" in text
    assert list(work.iterdir()) == []  # the trees are deleted without --keep
