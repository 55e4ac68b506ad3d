"""Bad input never stops training, is never silent: each kind is skipped and counted; odd modes converted."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_data import encode_image, noise_image

from beit3.pretrain.data import DataStreamError, PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.decode import SkipSample, decode_image, decode_text
from beit3.pretrain.data.tario import ShardWriter


def uniform(color, size=32):
    return np.full((size, size, 3), color, dtype=np.uint8)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def transparent_palette() -> bytes:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0] * 256)
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=0)
    return buf.getvalue()


def gray16(value: int) -> bytes:
    return png(Image.fromarray(np.full((32, 32), value, dtype=np.uint16)))


@pytest.mark.parametrize(
    "data, expected",
    [
        (lambda: png(Image.new("RGBA", (32, 32), (255, 0, 0, 0))), (255, 255, 255)),  # transparent: white
        (lambda: png(Image.new("RGBA", (32, 32), (255, 0, 0, 255))), (255, 0, 0)),
        (lambda: png(Image.new("LA", (32, 32), (100, 255))), (100, 100, 100)),
        (transparent_palette, (255, 255, 255)),
        (lambda: gray16(128 * 257), (128, 128, 128)),  # 16-bit scaled, not clipped to white
        (lambda: gray16(0), (0, 0, 0)),
        (lambda: encode_image(uniform((200, 30, 30)), "JPEG", mode="CMYK"), (200, 30, 30)),
        (lambda: png(Image.new("1", (32, 32), 1)), (255, 255, 255)),
    ],
    ids=[
        "rgba-transparent",
        "rgba-opaque",
        "la",
        "palette-transparency",
        "i16-mid",
        "i16-zero",
        "cmyk",
        "1bit",
    ],
)
def test_odd_image_modes_become_rgb(data, expected):
    img = decode_image(data())
    assert img.mode == "RGB"
    mean = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    assert np.allclose(mean, expected, atol=4), mean


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "image_empty"),
        (b"definitely not an image", "image_decode"),
        (noise_image(np.random.default_rng(0), 64, 64)[:300], "image_decode"),  # truncated JPEG
        (noise_image(np.random.default_rng(0), 64, 64, fmt="PNG")[:200], "image_decode"),  # truncated PNG
    ],
    ids=["empty", "garbage", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_images_are_skipped_with_their_kind(data, kind):
    with pytest.raises(SkipSample) as err:
        decode_image(data)
    assert err.value.kind == kind


def test_exif_orientation_is_applied():
    img = Image.fromarray(uniform((10, 20, 30), size=8).repeat(3, axis=1))  # 24 wide, 8 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode_image(buf.getvalue()).size == (8, 24)


def test_large_jpeg_is_decoded_at_reduced_scale_and_large_png_is_skipped():
    big = uniform((10, 200, 10), size=256)
    img = decode_image(encode_image(big, "JPEG"), max_pixels=64 * 64)
    assert img.size == (64, 64)  # DCT scaling by 1/4 during decode, never the full 256x256
    with pytest.raises(SkipSample) as err:
        decode_image(encode_image(big, "PNG"), max_pixels=64 * 64)
    assert err.value.kind == "image_too_large"


@pytest.mark.parametrize(
    "data, kind", [(b"", "text_empty"), (b" \n\t ", "text_empty"), (b"\xff\xfe caf\xe9", "text_decode")]
)
def test_bad_texts_are_skipped_with_their_kind(data, kind):
    with pytest.raises(SkipSample) as err:
        decode_text(data)
    assert err.value.kind == kind


def test_text_keeps_utf8_and_drops_bom_and_whitespace():
    assert decode_text("\ufeff  café ☕ \n".encode()) == "café ☕"


def single_pass_cfg(tmp_path, **kw) -> PretrainDataConfig:
    # One shard, one open unit, no shuffling, one slot: samples come out in shard order.
    base = dict(
        img_size=32,
        patch_size=8,
        tokenizer_img_size=16,
        min_num_patches=2,
        num_workers=0,
        shuffle_buffer=0,
        open_shards=1,
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        color_jitter=0.0,
        hflip=0.0,
        max_image_pixels=64 * 64,
        text_max_len=16,
        pair_text_max_len=12,
    )
    base.update(kw)
    return PretrainDataConfig(**base)


def write(path, samples):
    w = ShardWriter(str(path), "bad")
    for i, fields in enumerate(samples):
        w.write(f"s{i:03d}", fields)
    w.close()
    return str(path)


def test_loader_skips_and_counts_every_kind_of_bad_sample(tmp_path, tok):
    good = {"jpg": encode_image(uniform((0, 0, 255)))}
    images = [
        good,
        {"jpg": b"garbage"},
        {"png": png(Image.new("RGBA", (32, 32), (255, 0, 0, 0)))},
        {"jpg": good["jpg"][:100]},
        {"png": gray16(128 * 257)},
        {"jpg": b""},
        {"png": transparent_palette()},
        {"png": encode_image(uniform(9, size=200), "PNG")},  # too large, cannot be drafted
        {"jpg": encode_image(uniform((0, 255, 0), size=200), "JPEG")},  # too large, drafted
        {"json": b"{}"},
        {"jpg": encode_image(uniform((255, 255, 0)), "JPEG", mode="CMYK")},
    ]
    texts = [{"txt": b"the cat"}, {"txt": b""}, {"txt": b"\xff\xfe"}, {"txt": b"a dog runs"}]
    pairs = [
        {"jpg": good["jpg"], "txt": b"blue"},
        {"jpg": good["jpg"]},
        {"jpg": b"", "txt": b"x"},
        images[4] | {"txt": b"gray"},
    ]
    cfg = single_pass_cfg(
        tmp_path,
        image_shards=[write(tmp_path / "i", images)],
        text_shards=[write(tmp_path / "t", texts)],
        pair_shards=[write(tmp_path / "p", pairs)],
    )
    loader = build_pretrain_loader(cfg, tok, 6, 2, 2)
    it = iter(loader)
    batch = next(it)
    stats = loader.counters()
    assert stats["skipped/image_decode"] == 2
    assert stats["skipped/image_empty"] == 2  # one image, one pair image
    assert stats["skipped/image_too_large"] == 1
    assert stats["skipped/missing_field"] == 2  # image without image field, pair without text
    assert stats["skipped/text_empty"] == 1 and stats["skipped/text_decode"] == 1
    assert stats["samples/image"] == 6 and stats["samples/text"] == 2 and stats["samples/pair"] == 2
    # Survivors in shard order: blue, white (alpha), gray (16-bit), white (palette), green, yellow (CMYK).
    means = batch["image"]["tokenizer_image"].mean(dim=(2, 3)).numpy() * 255
    expected = [(0, 0, 255), (255,) * 3, (128,) * 3, (255,) * 3, (0, 255, 0), (255, 255, 0)]
    assert np.allclose(means, expected, atol=6), means
    # Counts are cumulative: the next pass over the same shards adds the same skips again.
    next(it)
    assert loader.counters()["skipped/image_decode"] == 4


def _truncate_inside_member(path: str, member_index: int) -> None:
    with tarfile.open(path) as tf:
        member = tf.getmembers()[member_index]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def test_truncated_tar_moves_on_to_the_next_shard(tmp_path, tok):
    w = ShardWriter(str(tmp_path / "shards"), "img", max_samples=6)
    rng = np.random.default_rng(0)
    for i in range(12):
        w.write(f"k{i:02d}", {"jpg": noise_image(rng, 32, 32)})
    w.close()
    first, second = (str(tmp_path / "shards" / s["name"]) for s in w.shards)
    _truncate_inside_member(first, 4)  # k04's image is cut in half
    cfg = single_pass_cfg(tmp_path, image_shards=[first, second], return_keys=True, open_shards=2)
    loader = build_pretrain_loader(cfg, tok, 4, 0, 0)
    it = iter(loader)
    batches = [next(it) for _ in range(12)]
    keys = {k for b in batches for k in b["image"]["keys"]}
    assert keys == {f"k{i:02d}" for i in (0, 1, 2, 3, *range(6, 12))}
    assert loader.counters()["skipped/tar_read"] >= 1


def test_a_stream_with_nothing_readable_fails_loudly_instead_of_hanging(tmp_path, tok):
    (tmp_path / "z").mkdir()
    empty = tmp_path / "z" / "empty.tar"
    empty.write_bytes(b"")
    cfg = single_pass_cfg(tmp_path, image_shards=[str(empty)])
    with pytest.raises(DataStreamError, match="gave no sample"):
        next(iter(build_pretrain_loader(cfg, tok, 1, 0, 0)))
    bad = write(tmp_path / "b", [{"jpg": b"x"}] * 3)
    cfg = single_pass_cfg(tmp_path, image_shards=[bad], max_consecutive_skips=5)
    with pytest.raises(DataStreamError, match="bad samples in a row"):
        next(iter(build_pretrain_loader(cfg, tok, 1, 0, 0)))


def test_no_exception_from_decoding_one_sample_escapes_it(tmp_path, tok, caplog):
    """Defect 7: a deeply nested json member raised RecursionError through the decoder and ended the job."""
    good = encode_image(uniform((0, 0, 255)))
    pairs = [
        {"jpg": good, "txt": b"blue"},
        {"jpg": good, "json": b"[" * 100_000 + b"]" * 100_000},  # RecursionError in json.loads
        {"jpg": good, "json": b'{"caption": ' + b"7" * 5000 + b"}"},  # int above Python's digit limit
        {"jpg": good, "json": b'{"caption": "caf\xe9"}'},  # not UTF-8
        {"jpg": good, "json": b'{"caption": "\\ud800"}'},  # a lone surrogate: no UTF-8 form
        {"jpg": good, "json": b'["a caption, but in a list"]'},
        {"jpg": good, "json": b'{"caption": 42}'},
        {"jpg": good, "txt": b"red"},
    ]
    cfg = single_pass_cfg(tmp_path, pair_shards=[write(tmp_path / "p", pairs)], return_keys=True)
    with caplog.at_level("DEBUG", logger="beit3.pretrain.data.loader"):
        loader = build_pretrain_loader(cfg, tok, 0, 0, 2)
        batch = next(iter(loader))
    stats = loader.counters()
    assert batch["pair"]["keys"] == ["s000", "s007"]
    assert stats["skipped/json_decode"] == 3 and stats["skipped/text_decode"] == 1
    assert stats["skipped/missing_field"] == 2
    assert any("s001" in r.getMessage() and "bad-000000.tar" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_on_one_sample_is_counted_as_sample_error(tmp_path, tok, monkeypatch):
    from beit3.pretrain.data.samples import SampleProcessor

    original = SampleProcessor.text

    def flaky(self, raw, rng):
        if raw.key == "s001":
            raise ZeroDivisionError("a library bug on odd bytes")
        return original(self, raw, rng)

    monkeypatch.setattr(SampleProcessor, "text", flaky)
    texts = [{"txt": b"the cat"}, {"txt": b"a dog"}, {"txt": b"a bird"}]
    cfg = single_pass_cfg(tmp_path, text_shards=[write(tmp_path / "t", texts)], return_keys=True)
    loader = build_pretrain_loader(cfg, tok, 0, 2, 0)
    batch = next(iter(loader))
    assert batch["text"]["keys"] == ["s000", "s002"]
    assert loader.counters()["skipped/sample_error"] == 1


def float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_float_image_with_nonfinite_pixels_is_skipped_not_black(bad):
    """Defect 9: NaN/inf made the min-max scaling NaN everywhere, and NaN became a black image."""
    values = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    assert np.asarray(decode_image(float_tiff(values))).std() > 10  # a finite float image keeps its ramp
    values[3, 5] = bad
    with pytest.raises(SkipSample) as err:
        decode_image(float_tiff(values))
    assert err.value.kind == "image_nonfinite"


def encode_as(ext: str) -> bytes:
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "jfif": "JPEG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, ext.upper())
    return encode_image(uniform((200, 100, 50)), fmt)


def test_every_image_extension_beit3_shards_reads_is_an_image_member_for_the_loader(tmp_path, tok):
    """Defect 9: `.gif` (and `.jfif`) members were counted as missing_field though beit3-shards takes them."""
    from beit3.pretrain.shards import IMAGE_EXTENSIONS

    exts = [e.lstrip(".") for e in IMAGE_EXTENSIONS]
    assert "gif" in exts and "jfif" in exts
    cfg = single_pass_cfg(tmp_path, image_shards=[write(tmp_path / "i", [{e: encode_as(e)} for e in exts])])
    loader = build_pretrain_loader(cfg, tok, len(exts), 0, 0)
    batch = next(iter(loader))
    assert sum(v for k, v in loader.counters().items() if k.startswith("skipped/")) == 0
    means = batch["image"]["tokenizer_image"].mean(dim=(2, 3)).numpy() * 255
    assert np.allclose(means, (200, 100, 50), atol=8), dict(zip(exts, means.tolist()))


def test_texts_that_tokenize_to_nothing_are_skipped_not_used_as_empty_rows(tmp_path, tok):
    """Defect 9: a text of zero-width characters became the row `<s> </s>`."""
    assert tok.encode("\u200b\u200c") == []
    texts = [{"txt": b"the cat"}, {"txt": "\u200b\u200c".encode()}, {"txt": b"a dog"}]
    pairs = [{"jpg": encode_image(uniform(9)), "txt": t} for t in (b"red", "\u200b".encode(), b"blue")]
    cfg = single_pass_cfg(
        tmp_path,
        text_shards=[write(tmp_path / "t", texts)],
        pair_shards=[write(tmp_path / "p", pairs)],
        return_keys=True,
    )
    loader = build_pretrain_loader(cfg, tok, 0, 2, 2)
    batch = next(iter(loader))
    assert batch["text"]["keys"] == ["s000", "s002"] and batch["pair"]["keys"] == ["s000", "s002"]
    assert loader.counters()["skipped/text_no_tokens"] == 2
    lengths = (~batch["text"]["text_padding_mask"]).sum(1)
    assert (lengths > 2).all()  # every row holds a piece between <s> and </s>


def test_two_samples_with_the_same_key_in_a_row_are_not_merged(tmp_path, tok):
    """Defect 9: a repeated field (two `X.jpg` in a row) overwrote the first sample's bytes: one sample
    of two, and a pair could take its image from one sample and its caption from the other."""
    blue, red, green = (encode_image(uniform(c)) for c in ((0, 0, 255), (255, 0, 0), (0, 255, 0)))
    w = ShardWriter(str(tmp_path / "p"), "dup")
    w.write("x", {"jpg": blue, "txt": b"blue"})
    w.write("x", {"jpg": red, "txt": b"red"})
    w.write("y", {"jpg": green, "txt": b"green"})
    w.close()
    cfg = single_pass_cfg(tmp_path, pair_shards=[str(tmp_path / "p")], return_keys=True)
    loader = build_pretrain_loader(cfg, tok, 0, 0, 3)
    batch = next(iter(loader))
    assert batch["pair"]["keys"] == ["x", "x", "y"]
    assert loader.counters()["skipped/duplicate_member"] == 1
    means = batch["pair"]["tokenizer_image"].mean(dim=(2, 3)).numpy() * 255
    assert np.allclose(means, [(0, 0, 255), (255, 0, 0), (0, 255, 0)], atol=6), means
    pair = batch["pair"]
    original = torch.where(pair["text_labels"] != -100, pair["text_labels"], pair["text"])
    captions = [tok.decode([int(i) for i, pad in zip(row, m) if not pad][1:-1]) for row, m in
                zip(original, pair["text_padding_mask"])]  # fmt: skip
    assert captions == ["blue", "red", "green"]
