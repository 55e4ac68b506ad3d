"""The bad-input catalogue (tests/bad_input_fixtures.py, written with Python's tarfile): every kind of damaged
input is skipped and counted under its kind, nothing else is counted, and the good samples around it are read;
odd but valid inputs are converted and used. Then one loader over all of them at once, with workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bad_input_fixtures import FIXTURES, clean_shard, expected_keys, write_all, write_fixture

from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.decode import SKIP_KINDS

COUNTS = {"image": (1, 0, 0), "text": (0, 1, 0), "pair": (0, 0, 1)}


def cfg(**kw) -> PretrainDataConfig:
    base = dict(
        img_size=32, patch_size=8, tokenizer_img_size=16, min_num_patches=2, text_max_len=16,
        pair_text_max_len=12, max_image_pixels=64 * 64, num_workers=0, shuffle_buffer=0, open_shards=1,
        return_keys=True,
    )  # fmt: skip
    return PretrainDataConfig(**{**base, **kw})


def test_the_catalogue_has_at_least_30_kinds_of_damage_across_images_texts_pairs_and_tar():
    damaged = [fx for fx in FIXTURES if fx.kind is not None]
    assert len(damaged) >= 30
    assert {fx.stream for fx in damaged} == {"image", "text", "pair"}
    assert sum(fx.kind == "tar_read" for fx in damaged) >= 8


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_each_bad_input_is_counted_under_its_kind_and_the_good_samples_around_it_are_read(fx, tmp_path, tok):
    shards = [str(write_fixture(tmp_path, fx))]
    keys = expected_keys(fx)
    if not keys:  # nothing readable in the shard: a clean one keeps the stream alive
        shards.append(str(clean_shard(tmp_path / "clean" / "c.tar", fx.stream, ("c0",))))
    loader = build_pretrain_loader(cfg(**{f"{fx.stream}_shards": shards}), tok, *COUNTS[fx.stream])
    it = iter(loader)
    batches, counted_after = [], []  # each batch, and the loader's counters right after it
    for _ in range(max(len(keys), 3)):
        batches.append(next(it))
        counted_after.append(loader.counters())
    loader.close()
    read = [b[fx.stream]["keys"][0] for b in batches]
    if keys:
        assert tuple(read[: len(keys)]) == keys
    else:
        assert set(read) == {"c0"}
    stats = counted_after[-1 if not keys else len(keys) - 1]
    counted = {k.split("/", 1)[1] for k, v in stats.items() if k.startswith("skipped/") and v}
    assert counted == ({fx.kind, *fx.also} - {None}), stats


def test_one_loader_over_every_fixture_with_workers_counts_every_kind(tmp_path, tok):
    shards = write_all(tmp_path)
    c = cfg(image_shards=shards["image"], text_shards=shards["text"], pair_shards=shards["pair"],
            num_workers=2, open_shards=2, shuffle_buffer=4)  # fmt: skip
    loader = build_pretrain_loader(c, tok, 4, 2, 2)
    wanted = {f"skipped/{fx.kind}" for fx in FIXTURES if fx.kind}
    it = iter(loader)
    for _ in range(200):
        next(it)
        stats = loader.counters()
        if all(stats[k] for k in wanted):
            break
    loader.close()
    assert all(stats[k] for k in wanted), {k: stats[k] for k in wanted if not stats[k]}
    streams = {"samples/image", "samples/text", "samples/pair"}
    assert set(stats) == {f"skipped/{k}" for k in SKIP_KINDS} | streams  # stable names, all always present


@pytest.mark.slow
def test_beit3_pretrain_over_every_fixture_exits_0_and_counts_every_kind_in_tensorboard(tmp_path, tok):
    """One real `beit3-pretrain` run (tiny model, one process, 2 loader workers) whose three streams hold
    every fixture: it finishes, and TensorBoard's `data/skipped/<kind>` shows each kind of damage."""
    from engine_helpers import tensorboard_scalars as scalars
    from test_pretrain_e2e import REPO

    shards = write_all(tmp_path / "fx")
    steps = 30
    cmd = [
        sys.executable, "-m", "beit3.pretrain.train",
        "--config", str(REPO / "pretrain/recipes/demo.toml"),
        "--ds-config", str(REPO / "ds_configs/zero0_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=12",  # 4 images, 4 texts, 4 pairs
        "--output-dir", str(tmp_path / "run"),
        "--set", f"tokenizers.text={tok.model_file}",
        "--set", "tokenizers.visual_checkpoint=",
        "--set", "model.name=beit3_tiny_patch16_64",
        "--set", "model.overrides={vocab_size = 64, visual_vocab_size = 1024}",
        *[a for s, urls in shards.items() for a in ("--set", f"data.{s}_shards={json.dumps(urls)}")],
        "--set", "data.num_workers=2",
        "--set", "data.shuffle_buffer=0",  # every sample of a shard in turn: every fixture is reached
        "--set", "data.open_shards=1",
        "--set", "data.max_image_pixels=4096",
        "--set", f"train.total_steps={steps}",
        "--set", "train.warmup_steps=2",
        "--set", "train.log_every=10",
        "--set", "train.save_every=1000",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = {fx.kind: scalars(tmp_path / "run", f"data/skipped/{fx.kind}").get(steps, 0.0) for fx in FIXTURES}
    assert all(last[k] >= 1 for k in last if k), last
    assert scalars(tmp_path / "run", "data/samples/image")[steps] == 4 * steps
    assert "damaged shard" in proc.stderr and "killed by signal" not in proc.stderr
