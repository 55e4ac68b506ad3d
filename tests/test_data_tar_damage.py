"""Damaged tar shards (issue 11 defect 8): damage is detected, counted as ``tar_read``, logged once with
shard and offset, and reading resumes at the next valid member instead of treating the damage as the end."""

from __future__ import annotations

import gzip
import logging
import tarfile

import pytest
from bad_input_fixtures import (
    BLOCK,
    corrupt_header,
    cut,
    data_offsets,
    end_of_members,
    header_offsets,
    jpeg,
    set_member_size,
    tar_shard,
)

from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.tario import iter_shard

KEYS = [f"k{i:02d}" for i in range(6)]


def shard(tmp_path, name="s.tar"):
    return tar_shard(
        tmp_path / "shards" / name, [(f"{k}.jpg", jpeg(size=24 + 8 * i)) for i, k in enumerate(KEYS)]
    )


def read_all(path, offset=0, part=0, parts=1):
    """Keys read and (kind, detail) reported over one pass of iter_shard."""
    reports, keys, positions = [], [], []
    for sample, nxt, index in iter_shard(str(path), offset, 0, part, parts, lambda *r: reports.append(r)):
        if sample is not None:
            keys.append(sample.key)
        positions.append((nxt, index))
    return keys, [(kind, detail) for kind, _, detail in reports], positions


def test_a_corrupt_header_mid_shard_is_counted_and_the_rest_of_the_shard_is_read(tmp_path):
    path = shard(tmp_path)
    at = corrupt_header(path, "k02.jpg")
    keys, reports, _ = read_all(path)
    assert keys == ["k00", "k01", "k03", "k04", "k05"]  # before: k00 k01 and a silent "end of shard"
    assert [k for k, _ in reports] == ["tar_read"] and f"byte {at}" in reports[0][1]


def test_a_header_whose_size_runs_past_the_end_of_the_file_is_damage_and_later_members_are_found(tmp_path):
    path = shard(tmp_path)
    set_member_size(path, "k01.jpg", 10**9)  # a valid checksum, a size that cannot be
    keys, reports, _ = read_all(path)
    assert keys == ["k00", "k02", "k03", "k04", "k05"]
    assert [k for k, _ in reports] == ["tar_read"] and "claims 1000000000 bytes" in reports[0][1]


@pytest.mark.parametrize("where", ["member boundary", "512-byte boundary inside a member", "inside a header"])
def test_a_cut_shard_is_damage_not_a_quiet_end(tmp_path, where):
    path = shard(tmp_path)
    if where == "member boundary":
        cut(path, header_offsets(path)["k04.jpg"])  # no end-of-archive blocks: k04 and k05 are lost
        expected = KEYS[:4]
    elif where == "inside a header":
        cut(path, header_offsets(path)["k04.jpg"] + 100)
        expected = KEYS[:4]
    else:
        offset, size = data_offsets(path)["k03.jpg"]
        assert size > BLOCK
        cut(path, offset + BLOCK)
        expected = KEYS[:3]
    keys, reports, _ = read_all(path)
    assert keys == expected and [k for k, _ in reports] == ["tar_read"]


def test_an_intact_shard_reports_nothing_and_ends_at_its_size(tmp_path):
    path = shard(tmp_path)
    keys, reports, positions = read_all(path)
    assert keys == KEYS and reports == []
    assert positions[-1] == (path.stat().st_size, len(KEYS))
    assert read_all(path, offset=path.stat().st_size) == ([], [], [])  # resumed at the end: nothing
    cut(path, end_of_members(path) + BLOCK)  # one end block of two: nothing is lost, nothing to count
    assert read_all(path)[:2] == (KEYS, [])


def test_zeroed_blocks_gzip_and_empty_files_are_counted(tmp_path):
    path = shard(tmp_path)
    at = header_offsets(path)["k02.jpg"]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes(BLOCK))  # a zeroed header looks like the end-of-archive marker
    keys, reports, _ = read_all(path)
    assert keys == ["k00", "k01", "k03", "k04", "k05"] and [k for k, _ in reports] == ["tar_read"]
    gz = tmp_path / "g.tar.gz"
    gz.write_bytes(gzip.compress(shard(tmp_path, "plain.tar").read_bytes()))
    keys, reports, _ = read_all(gz)
    assert keys == [] and "gzip" in reports[0][1]
    empty = tmp_path / "e.tar"
    empty.write_bytes(b"")
    assert read_all(empty)[1] == [("tar_read", "byte 0: the file is empty")]


def test_damage_is_counted_once_by_the_reader_that_owns_the_part(tmp_path):
    path = shard(tmp_path)
    corrupt_header(path, "k02.jpg")
    parts = [read_all(path, part=p, parts=3) for p in range(3)]
    assert sorted(k for keys, _, _ in parts for k in keys) == ["k00", "k01", "k03", "k04", "k05"]
    assert sum(len(reports) for _, reports, _ in parts) == 1


def cfg_for(path, **kw):
    base = dict(
        image_shards=[str(path)], img_size=32, patch_size=8, tokenizer_img_size=16, min_num_patches=2,
        num_workers=0, shuffle_buffer=2, open_shards=1, return_keys=True,
    )  # fmt: skip
    return PretrainDataConfig(**{**base, **kw})


def test_the_loader_counts_tar_read_logs_shard_and_offset_once_and_resumes_exactly(tmp_path, tok, caplog):
    path = shard(tmp_path)
    at = corrupt_header(path, "k02.jpg")
    loader = build_pretrain_loader(cfg_for(path), tok, 2, 0, 0)
    with caplog.at_level(logging.WARNING, logger="beit3.pretrain.data.tario"):
        it = iter(loader)
        batches = [next(it) for _ in range(5)]  # two passes over the shard's 5 good samples
        state, counted = loader.state_dict(), loader.counters()
        more = [(next(it), loader.counters()) for _ in range(5)]  # each batch, the counters after it
    loader.close()
    assert {k for b in batches for k in b["image"]["keys"]} == {"k00", "k01", "k03", "k04", "k05"}
    assert counted["skipped/tar_read"] == 2  # once per pass
    warnings = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warnings) == 1 and f"byte {at}" in warnings[0]
    resumed = build_pretrain_loader(cfg_for(path), tok, 2, 0, 0)
    resumed.load_state_dict(state)
    it = iter(resumed)
    again = [(next(it), resumed.counters()) for _ in range(5)]
    resumed.close()
    assert [b["image"]["keys"] for b, _ in again] == [b["image"]["keys"] for b, _ in more]
    assert [c for _, c in again] == [c for _, c in more]


def test_members_that_cannot_be_fields_are_counted_as_tar_member(tmp_path, tok):
    def special(name, kind, target=""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info

    path = tar_shard(
        tmp_path / "m" / "m.tar",
        [
            special("k00", tarfile.DIRTYPE),
            ("k00/a.jpg", jpeg()),
            special("k01.jpg", tarfile.SYMTYPE, "k00/a.jpg"),
            special("k02.jpg", tarfile.LNKTYPE, "k00/a.jpg"),
            ("README", b"no extension"),
            (".hidden", b"no stem"),
            ("k03.jpg", jpeg()),
        ],
    )
    keys, reports, _ = read_all(path)
    assert keys == ["k00/a", "k03"] and [k for k, _ in reports] == ["tar_member"] * 5
    loader = build_pretrain_loader(cfg_for(path, shuffle_buffer=0), tok, 2, 0, 0)
    batch = next(iter(loader))
    assert batch["image"]["keys"] == ["k00/a", "k03"] and loader.counters()["skipped/tar_member"] == 5
