"""Finetuning data that does not fit in memory (issue 14 item 1): released-format indexes keep their images on
disk, decoded when a batch reads them, in DataLoader worker processes, with exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from beit3.finetune.data import sources
from beit3.finetune.data.batches import BatchLoader, Collator
from beit3.finetune.data.sources import DataSourceError, LazyImages, load_image, load_jsonl_split

SIZE = 16


def write_index(root, n: int) -> str:
    """``n`` images (each its own colour) and a VQA-style index over them; returns the index path."""
    rows = []
    for i in range(n):
        Image.new("RGB", (12 + i % 5, 10), (i * 7 % 256, i * 13 % 256, 40)).save(root / f"im{i}.png")
        row = {"image_path": f"im{i}.png", "text_segment": [5 + i % 4], "labels": [i % 3], "scores": [1.0]}
        rows.append({**row, "qid": i})
    path = root / "idx.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


class PidCollator(Collator):
    """The VQA collator, recording which process built each batch."""

    def __call__(self, examples, generator):
        batch = super().__call__(examples, generator)
        batch["pid"] = torch.tensor(os.getpid())
        return batch


def test_a_released_index_keeps_its_images_on_disk_until_a_batch_reads_them(tmp_path, monkeypatch):
    index = write_index(tmp_path, 9)
    decoded = []
    monkeypatch.setattr(sources, "load_image", lambda p, s: decoded.append(p) or load_image(p, s))
    split = load_jsonl_split(index, tmp_path, SIZE)
    assert isinstance(split.images, LazyImages) and decoded == []  # memory: the index and the paths only
    assert split.images.shape == (9, 3, SIZE, SIZE) and len(split.images) == 9
    rows = split.images[torch.tensor([4, 1])]
    assert rows.dtype == torch.uint8 and rows.shape == (2, 3, SIZE, SIZE) and len(decoded) == 2
    assert torch.equal(rows[0], load_image(tmp_path / "im4.png", SIZE))
    assert torch.equal(split.images[1], rows[1]) and split.images[2:4].shape == (2, 3, SIZE, SIZE)


def test_a_missing_image_is_found_when_the_index_is_loaded(tmp_path):
    index = write_index(tmp_path, 5)
    (tmp_path / "im3.png").unlink()
    with pytest.raises(DataSourceError, match="im3.png.*data.root"):
        load_jsonl_split(index, tmp_path, SIZE)


def _batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() - {"pid"} == y.keys() - {"pid"}
        for k in x.keys() - {"pid"}:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("world_size", [1, 2])
def test_worker_batches_equal_in_process_batches_and_resume_exactly(tmp_path, world_size):
    """Batches decoded in 2 worker processes equal those decoded in the process, epoch after epoch, on every
    rank; a loader restored from the state after 3 batches continues with exactly the uninterrupted run's
    batches (the workers' prefetching does not move the position)."""
    split = load_jsonl_split(write_index(tmp_path, 21), tmp_path, SIZE)

    def loader(rank: int, workers: int) -> BatchLoader:
        collate = PidCollator("vqa", split.images, num_answers=3, hflip=True)
        return BatchLoader(split, collate, 3, rank, world_size, seed=4, num_workers=workers)

    for rank in range(world_size):
        plain, workers = loader(rank, 0), loader(rank, 2)
        expected = _batches(plain) + _batches(plain)  # two epochs
        got = _batches(workers) + _batches(workers)
        _same(expected, got)
        assert all(int(b["pid"]) == os.getpid() for b in expected)
        assert all(int(b["pid"]) != os.getpid() for b in got)  # decoded in the workers
        interrupted = loader(rank, 2)
        _batches(interrupted, 3)
        resumed = loader(rank, 2)
        resumed.load_state_dict(interrupted.state_dict())
        _same(expected[3:], _batches(resumed) + _batches(resumed))


def test_persistent_workers_serve_every_epoch_and_an_abandoned_iteration_resumes_exactly(tmp_path):
    """The default: the same 2 worker processes build every epoch's batches; an iteration abandoned after 2
    batches (their prefetched successors dropped) continues on the same workers with exactly the next batch;
    after close() a new iteration forks new workers and still continues where the loader was. Without
    persistence each epoch has workers of its own."""
    split = load_jsonl_split(write_index(tmp_path, 12), tmp_path, SIZE)

    def loader(workers: int, persistent: bool = True) -> BatchLoader:
        collate = PidCollator("vqa", split.images, num_answers=3, hflip=True)
        return BatchLoader(split, collate, 2, seed=3, num_workers=workers, persistent_workers=persistent)

    plain = loader(0)
    expected = [b for _ in range(4) for b in _batches(plain)]  # 4 epochs of 6 batches, in the process
    persistent = loader(2)
    got = _batches(persistent) + _batches(persistent, 2)  # epoch 0, then 2 batches of epoch 1 (abandoned)
    assert persistent.state_dict() == {"epoch": 1, "position": 2}
    got += _batches(persistent)  # the rest of epoch 1, on the same workers
    pids = {int(b["pid"]) for b in got}
    assert len(pids) == 2 and os.getpid() not in pids
    persistent.close()
    got += _batches(persistent, 3)  # new workers after close(), from where the loader was
    new_pids = {int(b["pid"]) for b in got[-3:]}
    assert new_pids and not new_pids & pids
    got += _batches(persistent) + _batches(persistent)
    _same(expected[: len(got)], got)
    assert len(got) == 24
    persistent.close()

    per_epoch = loader(2, persistent=False)
    first, second = _batches(per_epoch), _batches(per_epoch)
    _same(expected[:12], first + second)
    assert not {int(b["pid"]) for b in first} & {int(b["pid"]) for b in second}


class _ImageLogits(torch.nn.Module):
    """A stand-in task module for the evaluation loops: logits from the images' pixels and the texts."""

    def prepare_batch(self, batch, device):
        return batch

    def __call__(self, batch):
        image = batch["image"].flatten(1)
        return torch.stack([image[:, ::3].sum(1), image[:, 1::3].sum(1), batch["text"].sum(1).float()], 1)


@pytest.mark.parametrize("world", [1, 2])
def test_evaluation_decodes_on_disk_images_in_workers_as_in_the_process(tmp_path, monkeypatch, world):
    """An on-disk eval split with workers = 2: its images are decoded in worker processes (none here), and the
    hits, predictions and image batches equal those built in the process, on each rank of a sharded run."""
    from beit3.finetune import evaluate as ev
    from beit3.finetune.tasks import get_task

    split = load_jsonl_split(write_index(tmp_path, 13), tmp_path, SIZE)
    here = []
    monkeypatch.setattr(sources, "load_image", lambda *a: here.append(a[0]) or load_image(*a))
    rows = list(range(13))
    monkeypatch.setattr(ev, "_sum_across_ranks", lambda values, device: values)  # this rank's share
    for rank in range(world):
        monkeypatch.setattr(ev, "_world", lambda rank=rank: (rank, world))
        found = {}
        for workers in (0, 2):
            here.clear()
            ctx = ev.EvalContext(get_task("vqa"), _ImageLogits(), split, 2, num_answers=3, workers=workers)
            hits = ctx.hits(_ImageLogits(), soft=True)
            images = [b for b, _ in ev._built(13, 3, "images", ev._image_rows(split, rows), workers)]
            found[workers] = (hits, torch.cat(images), len(here))
            if world == 1:  # predictions gather over ranks
                found[workers] += (ctx.predictions(_ImageLogits()),)
        assert found[0][2] > 0 and found[2][2] == 0  # decoded here without workers, in the workers with
        assert found[0][0] == found[2][0] and torch.equal(found[0][1], found[2][1])
        assert found[0][3:] == found[2][3:]
    in_memory = ev.EvalContext(get_task("vqa"), _ImageLogits(), split, 2, workers=2)
    in_memory.split = type(split)(split.examples, torch.zeros(13, 3, SIZE, SIZE, dtype=torch.uint8))
    in_memory.__post_init__()
    assert in_memory.workers == 0  # images in memory: nothing to decode, no workers


def test_finetuning_on_a_released_index_decodes_in_workers_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    """beit3-finetune on a released-format VQA index with 2 loader workers: 4 steps straight, and 2 + a
    resume to 4; the resumed run's losses equal the straight run's."""
    from engine_helpers import tensorboard_scalars
    from tiny_data import shapes_recipe, shapes_spm

    from beit3.engine.launch import init_distributed
    from beit3.finetune.train import main

    init_distributed()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "spm").mkdir()
    spm = shapes_spm(tmp_path / "spm")
    index = tmp_path / "vqa"
    index.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (40, 30 + i), ((37 * i) % 256, 200, (90 * i) % 256)).save(index / f"im{i}.png")
        for j, question in enumerate(("what color is it?", "what shape is it?")):
            row = {"image_path": f"im{i}.png", "text": question, "labels": [(i + j) % 3], "scores": [1.0]}
            rows.append({**row, "qid": 10 * i + j})
    (index / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = shapes_recipe(tmp_path / "vqa.toml", spm, "vqa", train={"warmup_steps": 1, "save_every": 2})
    common = ["--config", recipe, "--ds-config", "ds_configs/zero0_fp32.json",
              "--ds-set", "train_micro_batch_size_per_gpu=4",
              "--set", "data.source=jsonl", "--set", f"data.root={index}",
              "--set", f"data.train={index / 'train.jsonl'}", "--set", f"data.eval={index / 'train.jsonl'}",
              "--set", "data.num_workers=2", "--set", "data.hflip=true",
              "--set", "model.drop_path_rate=0.1"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--output-dir", str(straight), "--set", "train.total_steps=4"]) == 0
    assert main([*common, "--output-dir", str(resumed), "--set", "train.total_steps=2"]) == 0
    with caplog.at_level("INFO", logger="beit3.engine.trainer"):
        assert main([*common, "--output-dir", str(resumed), "--set", "train.total_steps=4"]) == 0
    assert "at step 2" in caplog.text  # continued from the checkpoint, not started again
    expected = tensorboard_scalars(straight, "loss/total")
    assert sorted(expected) == [1, 2, 3, 4]
    assert tensorboard_scalars(resumed, "loss/total") == expected


GROUP_CHILD = """
import signal, sys, time
from pathlib import Path
import psutil
sys.path.insert(0, sys.argv[2])
from test_finetune_streaming import SIZE, write_index
from beit3.finetune.data.batches import BatchLoader, Collator
from beit3.finetune.data.sources import load_jsonl_split

root = Path(sys.argv[1])
received = []
for s in (signal.SIGTERM, signal.SIGUSR1):  # the trainer's part: note it, carry on to the step boundary
    signal.signal(s, lambda s, f: received.append(s))
split = load_jsonl_split(write_index(root, 24), root, SIZE)
loader = BatchLoader(split, Collator("vqa", split.images, num_answers=3), 2, seed=1, num_workers=2)
it = iter(loader)
next(it)
print("ready", *[c.pid for c in psutil.Process().children()], flush=True)
deadline = time.time() + 30
while len(received) < 2 and time.time() < deadline:
    time.sleep(0.05)
for _ in range(6):
    next(it)
print("survived", len(received), flush=True)
# No loader.close(): the exit hook must stop the workers, or the exit would wait for them forever.
"""


def test_stop_signals_to_the_whole_process_group_leave_the_workers_running_and_the_exit_clean(tmp_path):
    """srun forwards Slurm's SIGUSR1 (and a scancel's SIGTERM) to every process of the step: the loader's
    workers ignore them, the batches keep coming until the trainer's checkpoint, and the process then exits
    at once with its workers gone (beit3.engine.workers)."""
    import signal
    from pathlib import Path

    from engine_helpers import signal_loader_group

    args = [str(tmp_path), str(Path(__file__).parent)]
    out, err, workers = signal_loader_group(GROUP_CHILD, args, (signal.SIGUSR1, signal.SIGTERM))
    assert "survived 2" in out and len(workers) == 2, out + err[-2000:]


def test_workers_fix_the_glibc_mmap_threshold():
    """On glibc the worker init switches off the dynamic mmap threshold (the heap of a worker building large
    batches otherwise grows to ~1 GB, bench/finetune_stream.py); elsewhere it reports that it did nothing."""
    import ctypes

    from beit3.engine.workers import fix_mmap_threshold

    has_mallopt = getattr(ctypes.CDLL(None), "mallopt", None) is not None
    assert fix_mmap_threshold() is has_mallopt


def write_shards(root, index: str, per_shard: int = 4) -> str:
    """The rows of a released-format index as webdataset shards: ``KEY.png`` + ``KEY.json`` (the row without
    its image path), in index order; returns the shards' brace spec."""
    import io
    import tarfile

    rows = [json.loads(line) for line in Path(index).read_text().splitlines()]
    shards = [rows[i : i + per_shard] for i in range(0, len(rows), per_shard)]
    for s, chunk in enumerate(shards):
        with tarfile.open(root / f"train-{s:03d}.tar", "w") as tar:
            for j, row in enumerate(chunk):
                key = f"sample{s:03d}{j:03d}"
                meta = {k: v for k, v in row.items() if k != "image_path"}
                for name, data in ((f"{key}.png", (root / row["image_path"]).read_bytes()),
                                   (f"{key}.json", json.dumps(meta).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"train-{{000..{len(shards) - 1:03d}}}.tar")


def test_webdataset_shards_give_the_index_examples_and_the_same_batches_in_workers(tmp_path):
    """data.source = "wds": local shards indexed by their member headers, images read by seeking when a
    batch needs them; examples, pixels and worker batches equal those of the same rows as a JSONL index."""
    from beit3.finetune.data.sources import TarMember, load_wds_split

    index = write_index(tmp_path, 10)
    spec = write_shards(tmp_path, index)
    jsonl, wds = load_jsonl_split(index, tmp_path, SIZE), load_wds_split(spec, SIZE)
    assert isinstance(wds.images, LazyImages) and all(isinstance(m, TarMember) for m in wds.images.paths)
    assert wds.examples == jsonl.examples
    assert torch.equal(wds.images[torch.arange(10)], jsonl.images[torch.arange(10)])

    def batches(split, workers):
        collate = Collator("vqa", split.images, num_answers=3, hflip=True)
        return _batches(BatchLoader(split, collate, 3, seed=2, num_workers=workers))

    _same(batches(jsonl, 0), batches(wds, 2))


def test_webdataset_fields_cls_txt_and_a_second_image(tmp_path):
    import io
    import tarfile

    from beit3.finetune.data.sources import load_wds_split

    png = io.BytesIO()
    Image.new("RGB", (9, 7), (10, 200, 30)).save(png, "PNG")
    with tarfile.open(tmp_path / "pairs.tar", "w") as tar:
        for name, data in (
            ("a/x1.png", png.getvalue()),
            ("a/x1.image2.png", png.getvalue()),
            ("a/x1.cls", b"1\n"),
            ("a/x1.txt", b"two green boxes\n"),
            ("a/x2.json", b'{"label": 0}'),
        ):  # fmt: skip  (x2: no image, left out)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    split = load_wds_split(str(tmp_path / "*.tar"), SIZE)
    (ex,) = split.examples
    assert ex["label"] == 1 and ex["text"] == "two green boxes" and ex["image"] == 0 and ex["image2"] == 1
    assert split.images[1].shape == (3, SIZE, SIZE)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("https://example.com/train-{000..003}.tar", "must be local files"),
        ("pipe:cat train.tar", "must be local files"),
        ("<root>/missing-{000..001}.tar", "no shard file"),
        ("<root>/*.nothing", "no shard file"),
        ("", "data.source = 'wds' needs data.train"),
    ],
)
def test_webdataset_specs_that_cannot_be_read_are_named(tmp_path, spec, message):
    from beit3.finetune.data.sources import load_wds_split

    with pytest.raises(DataSourceError, match=message):
        load_wds_split(spec.replace("<root>", str(tmp_path)), SIZE)


def test_finetuning_reads_webdataset_shards_in_workers(tmp_path, monkeypatch):
    """beit3-finetune with data.source = "wds" (VQA rows in shards, 2 loader workers) trains, evaluates the
    eval shards and exports."""
    from tiny_data import shapes_recipe, shapes_spm

    from beit3.engine.launch import init_distributed
    from beit3.finetune.train import main

    init_distributed()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "spm").mkdir()
    spm = shapes_spm(tmp_path / "spm")
    spec = write_shards(tmp_path, write_index(tmp_path, 12))
    recipe = shapes_recipe(tmp_path / "vqa.toml", spm, "vqa", train={"warmup_steps": 1, "save_every": 2})
    run = tmp_path / "run"
    args = ["--config", recipe, "--ds-config", "ds_configs/zero0_fp32.json", "--output-dir", str(run),
            "--ds-set", "train_micro_batch_size_per_gpu=4", "--set", "train.total_steps=2",
            "--set", "data.source=wds", "--set", f"data.train={spec}", "--set", f"data.eval={spec}",
            "--set", "data.num_workers=2"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((run / "eval.json").read_text())
    assert 0.0 <= report["eval/vqa_score"] <= 1.0 and (run / "model.pth").is_file()
