"""The pretraining loader: batch contract, exact composition, disjoint ranks/workers, exact resume."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import psutil
import pytest
import torch
from tiny_data import tiny_tokenizer, write_tiny_shards

from beit3.pretrain.data import DataConfigError, PretrainDataConfig, build_pretrain_loader

IMAGES, TEXTS, PAIRS = 3, 2, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_tiny_shards(str(root / "images"), "images", 24, 6)
    write_tiny_shards(str(root / "texts"), "texts", 30, 10)
    write_tiny_shards(str(root / "pairs"), "pairs", 16, 4)
    return root, tiny_tokenizer(str(root / "spm"))


def make_cfg(root, **kw) -> PretrainDataConfig:
    base = dict(
        image_shards=[str(root / "images")],
        text_shards=[str(root / "texts")],
        pair_shards=[str(root / "pairs")],
        img_size=32,
        patch_size=8,
        tokenizer_img_size=16,
        text_max_len=16,
        pair_text_max_len=12,
        min_num_patches=2,
        num_workers=0,
        shuffle_buffer=4,
        open_shards=2,
    )
    base.update(kw)
    return PretrainDataConfig(**base)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    loader.close()
    return out


def test_batch_contract_shapes_dtypes_and_specials(data):
    root, tok = data
    cfg = make_cfg(root)
    loader = build_pretrain_loader(cfg, tok, IMAGES, TEXTS, PAIRS)
    (batch,) = take(loader, 1)
    assert set(batch) == {"image", "text", "pair"}  # counters are the loader's, not the batch's
    img = batch["image"]
    assert img["image"].shape == (IMAGES, 3, 32, 32) and img["image"].dtype == torch.float32
    assert img["tokenizer_image"].shape == (IMAGES, 3, 16, 16)
    assert img["tokenizer_image"].min() >= 0 and img["tokenizer_image"].max() <= 1
    assert img["image"].min() >= -1 and img["image"].max() <= 1  # mean/std 0.5 maps [0, 1] to [-1, 1]
    assert img["image_mask"].shape == (IMAGES, 16) and img["image_mask"].dtype == torch.bool
    for key, n, length in (("text", TEXTS, 16), ("pair", PAIRS, 12)):
        sub = batch[key]
        assert sub["text"].shape == (n, length) and sub["text"].dtype == torch.long
        assert sub["text_padding_mask"].dtype == torch.bool and sub["text_labels"].dtype == torch.long
        lengths = (~sub["text_padding_mask"]).sum(1)
        original = torch.where(sub["text_labels"] != -100, sub["text_labels"], sub["text"])
        for row, n_real in zip(original, lengths.tolist()):
            assert row[0] == tok.bos_id and row[n_real - 1] == tok.eos_id
            assert (row[n_real:] == tok.pad_id).all()
        # Masked positions are never <s>, </s> or padding.
        labelled = sub["text_labels"] != -100
        assert not labelled[:, 0].any()
        assert not (labelled & sub["text_padding_mask"]).any()
        assert not (labelled & (original == tok.eos_id)).any()
    assert set(batch["pair"]) == {
        "image",
        "tokenizer_image",
        "image_mask",
        "text",
        "text_padding_mask",
        "text_labels",
    }
    counts = loader.counters()
    assert counts["samples/image"] == IMAGES and counts["samples/pair"] == PAIRS
    assert tuple(counts) == loader.counter_names


def test_every_batch_holds_exactly_the_configured_counts(data):
    root, tok = data
    # Shard sizes (6, 10, 4) do not divide the counts: batches straddle shard ends and resampling.
    for batch in take(build_pretrain_loader(make_cfg(root), tok, IMAGES, TEXTS, PAIRS), 12):
        assert batch["image"]["image"].shape[0] == IMAGES
        assert batch["text"]["text"].shape[0] == TEXTS
        assert batch["pair"]["image"].shape[0] == batch["pair"]["text"].shape[0] == PAIRS


def test_zero_count_leaves_the_sub_batch_out(data):
    root, tok = data
    (batch,) = take(build_pretrain_loader(make_cfg(root, pair_shards=[]), tok, 2, 2, 0), 1)
    assert set(batch) == {"image", "text"}


def _keys(batches, stream):
    return [k for b in batches for k in b[stream]["keys"]]


def test_ranks_and_workers_read_disjoint_samples(data):
    root, tok = data
    cfg = make_cfg(root, num_workers=2, return_keys=True)
    seen = {}
    for rank in range(2):
        batches = take(build_pretrain_loader(cfg, tok, 2, 2, 2, rank=rank, world_size=2), 8)
        for stream in ("image", "text", "pair"):
            seen[(rank, stream)] = set(_keys(batches, stream))
    for stream, total in (("image", 24), ("text", 30), ("pair", 16)):
        a, b = seen[(0, stream)], seen[(1, stream)]
        assert a and b and not a & b, stream
        assert len(a | b) <= total
    # Within a rank, the two workers' batches (even and odd) come from disjoint samples too.
    batches = take(build_pretrain_loader(cfg, tok, 2, 2, 2, rank=0, world_size=2), 8)
    even, odd = set(_keys(batches[0::2], "pair")), set(_keys(batches[1::2], "pair"))
    assert even and odd and not even & odd


def test_stream_is_endless_and_resamples_its_shards(data):
    root, tok = data
    cfg = make_cfg(root, return_keys=True)
    batches = take(build_pretrain_loader(cfg, tok, 1, 1, 4), 12)  # 48 pairs from 16 stored
    keys = _keys(batches, "pair")
    assert len(keys) == 48 and len(set(keys)) == 16


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for stream in a:
        for k, v in a[stream].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[stream][k]), (stream, k)
            else:
                assert v == b[stream][k], (stream, k)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(data, num_workers):
    root, tok = data
    cfg = make_cfg(root, num_workers=num_workers, return_keys=True)
    reference = take(build_pretrain_loader(cfg, tok, IMAGES, TEXTS, PAIRS), 7)
    first = build_pretrain_loader(cfg, tok, IMAGES, TEXTS, PAIRS)
    take(first, 3)  # an odd count: the next batch belongs to the second worker
    state = first.state_dict()
    resumed = build_pretrain_loader(cfg, tok, IMAGES, TEXTS, PAIRS)
    resumed.load_state_dict(state)
    for expected, got in zip(reference[3:], take(resumed, 4)):
        _assert_same(expected, got)


def test_iterating_again_continues_instead_of_restarting(data):
    root, tok = data
    cfg = make_cfg(root, return_keys=True)
    reference = take(build_pretrain_loader(cfg, tok, 1, 1, 1), 4)
    loader = build_pretrain_loader(cfg, tok, 1, 1, 1)
    got = take(loader, 2) + take(loader, 2)
    assert [b["pair"]["keys"] for b in got] == [b["pair"]["keys"] for b in reference]


def test_resume_on_another_world_size_reseeds_and_keeps_counts(data):
    root, tok = data
    cfg = make_cfg(root, return_keys=True)
    old = build_pretrain_loader(cfg, tok, 1, 1, 2)
    take(old, 5)
    state = old.state_dict()
    fresh = take(build_pretrain_loader(cfg, tok, 1, 1, 2, rank=0, world_size=2), 3)
    moved = build_pretrain_loader(cfg, tok, 1, 1, 2, rank=0, world_size=2)
    moved.load_state_dict(state)
    it = iter(moved)
    got = [next(it)]
    after_first = moved.counters()
    got += [next(it) for _ in range(2)]
    moved.close()
    # Not the new layout's stream from its start, and the counters go on from the old run.
    assert _keys(got, "pair") != _keys(fresh, "pair")
    assert after_first["samples/pair"] == 5 * 2 + 2
    assert moved.state_dict()["batches"] == 8


def test_config_errors_name_the_fix(tmp_path, data):
    root, tok = data
    with pytest.raises(DataConfigError, match="beit3-shards"):
        PretrainDataConfig().validate()
    with pytest.raises(DataConfigError, match="no shard file matches"):
        make_cfg(root, image_shards=[str(tmp_path / "missing-{000..003}.tar")]).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataConfigError, match="holds no"):
        make_cfg(root, text_shards=[str(tmp_path / "empty")]).validate()
    with pytest.raises(DataConfigError, match="pair_masking"):
        make_cfg(root, pair_masking="both").validate()
    with pytest.raises(DataConfigError, match="is not a multiple of"):
        make_cfg(root, img_size=30).validate()
    with pytest.raises(DataConfigError, match="text_mask_ratio=1.5 is out of range"):
        make_cfg(root, text_mask_ratio=1.5).validate()
    with pytest.raises(DataConfigError, match="min_num_patches"):
        make_cfg(root, min_num_patches=16).validate()
    with pytest.raises(DataConfigError, match="pair_shards is empty"):
        build_pretrain_loader(make_cfg(root, pair_shards=[]), tok, 1, 1, 1)


def test_config_fields_are_plain_toml_values():
    # The recipe loader fills PretrainDataConfig from a TOML table by field name.
    for f in dataclasses.fields(PretrainDataConfig):
        assert f.type.split("[")[0] in {"int", "float", "str", "bool", "list", "tuple"}, f.name


def test_start_at_reseeds_deterministically_when_the_state_is_lost(data):
    root, tok = data
    cfg = make_cfg(root, return_keys=True)
    fresh = take(build_pretrain_loader(cfg, tok, 1, 1, 2), 2)
    runs = []
    for _ in range(2):
        loader = build_pretrain_loader(cfg, tok, 1, 1, 2, rank=1, world_size=2)
        loader.start_at(100)
        runs.append(_keys(take(loader, 2), "pair"))
    assert runs[0] == runs[1] and runs[0] != _keys(fresh, "pair")
    assert loader.state_dict()["batches"] == 102


def test_state_of_another_shard_list_is_not_applied_position_for_position(data, tmp_path):
    root, tok = data
    cfg = make_cfg(root, return_keys=True)
    old = build_pretrain_loader(cfg, tok, 1, 1, 2)
    take(old, 3)
    fewer = make_cfg(root, return_keys=True, pair_shards=[str(root / "pairs" / "pairs-000000.tar")])
    loader = build_pretrain_loader(fewer, tok, 1, 1, 2)
    loader.load_state_dict(old.state_dict())
    keys = _keys(take(loader, 4), "pair")
    assert set(keys) <= {f"pair{i:05d}" for i in range(4)}  # only the one remaining shard's samples


def test_each_round_of_draws_reads_every_shard_once(data):
    root, tok = data
    cfg = make_cfg(root, return_keys=True, open_shards=1, shuffle_buffer=0)
    keys = _keys(take(build_pretrain_loader(cfg, tok, 1, 1, 4), 8), "pair")  # 2 rounds of 4 shards x 4
    assert sorted(keys[:16]) == sorted(keys[16:]) == [f"pair{i:05d}" for i in range(16)]
    assert keys[:16] != keys[16:]  # each round in a new order


def test_a_single_shard_is_not_read_twice_at_once(tmp_path, data):
    _, tok = data
    write_tiny_shards(str(tmp_path / "one"), "pairs", 8, 8)
    one = [str(tmp_path / "one")]
    cfg = make_cfg(
        tmp_path, image_shards=[], text_shards=[], pair_shards=one, return_keys=True, shuffle_buffer=0
    )
    keys = _keys(take(build_pretrain_loader(cfg, tok, 0, 0, 8), 1), "pair")
    assert keys == [f"pair{i:05d}" for i in range(8)]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_workers_survive_stop_signals(data, sig):
    # Slurm sends SIGUSR1 to every process of a step, torchrun/scancel/preemption SIGTERM to the process
    # group, a terminal SIGINT; only the trainer acts on them.
    root, tok = data
    loader = build_pretrain_loader(make_cfg(root, num_workers=2), tok, 1, 1, 1)
    it = iter(loader)
    next(it), next(it)  # one batch from each worker: both have run their init
    workers = psutil.Process().children()
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, sig)
    time.sleep(0.3)
    for _ in range(4):
        next(it)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    loader.close()
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


GROUP_CHILD = """
import signal, sys, time
import psutil
from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.tokenizers.text import TextTokenizer

root, spm = sys.argv[1:3]
received = []
signal.signal(signal.SIGTERM, lambda s, f: received.append(s))  # the trainer's part: note it, carry on
cfg = PretrainDataConfig(
    image_shards=[root + "/images"], text_shards=[root + "/texts"], pair_shards=[root + "/pairs"],
    img_size=32, patch_size=8, tokenizer_img_size=16, text_max_len=16, pair_text_max_len=12,
    min_num_patches=2, num_workers=2, shuffle_buffer=4, open_shards=2,
)
it = iter(build_pretrain_loader(cfg, TextTokenizer(spm), 1, 1, 1))
next(it), next(it)
print("ready", *[c.pid for c in psutil.Process().children()], flush=True)
deadline = time.time() + 30
while not received and time.time() < deadline:
    time.sleep(0.05)
for _ in range(6):
    next(it)
print("survived", len(received), flush=True)
# No loader.close(): the loader's exit hook must stop the workers, or the exit would wait for them forever.
"""


def test_a_sigterm_to_the_whole_process_group_leaves_the_loader_running_and_the_exit_clean(data):
    from engine_helpers import signal_loader_group

    root, tok = data
    out, _, workers = signal_loader_group(GROUP_CHILD, [str(root), tok.model_file], (signal.SIGTERM,))
    assert "survived 1" in out and len(workers) == 2
