"""Damaged shards for the data tests, written with Python's ``tarfile`` (never with the project's writer, so
that the reader is tested against tar files it did not make), and byte-level damage applied afterwards."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BLOCK = 512


def jpeg(color=(0, 0, 255), size: int = 32) -> bytes:
    """A small uniform JPEG."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def tar_shard(path: Path, members: list, fmt: int = tarfile.USTAR_FORMAT) -> Path:
    """Write ``members`` into a tar at ``path``: each is ``(name, bytes)`` for a file, or a ``TarInfo``
    (directories, links) to add as it is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
                continue
            name, data = m
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


def header_offsets(path: Path) -> dict[str, int]:
    """Member name -> offset of its header block."""
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf.getmembers()}


def data_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, size)."""
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def corrupt_header(path: Path, name: str) -> int:
    """Change one byte of member ``name``'s header without fixing its checksum; returns the header offset."""
    at = header_offsets(path)[name]
    with open(path, "r+b") as f:
        f.seek(at)
        first = f.read(1)
        f.seek(at)
        f.write(b"#" if first != b"#" else b"%")
    return at


def set_member_size(path: Path, name: str, size: int) -> int:
    """Rewrite member ``name``'s size field (with a valid checksum): a header that lies about its size."""
    at = header_offsets(path)[name]
    with open(path, "r+b") as f:
        f.seek(at)
        block = bytearray(f.read(BLOCK))
        block[124:136] = b"%011o\0" % size
        block[148:156] = b" " * 8
        block[148:156] = b"%06o\0 " % sum(block)
        f.seek(at)
        f.write(block)
    return at


def cut(path: Path, size: int) -> None:
    """Truncate the file to ``size`` bytes."""
    with open(path, "r+b") as f:
        f.truncate(size)


def end_of_members(path: Path) -> int:
    """The offset right after the last member's (padded) data: where the end-of-archive blocks start."""
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // BLOCK) * BLOCK


# ---- the catalogue: one shard per kind of damaged (or merely odd) input -----------------------------------
def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid PNG claiming ``width`` x ``height`` pixels with almost no data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def png_bad_crc() -> bytes:
    data = bytearray(png(Image.new("RGB", (16, 16), (1, 2, 3))))
    data[29] ^= 0xFF  # the IHDR chunk's CRC (8 signature + 8 length/type + 13 data bytes)
    return bytes(data)


def float_tiff(bad: float) -> bytes:
    values = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    values[4, 4] = bad
    return _encoded(Image.fromarray(values, "F"), "TIFF")


def npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values)
    return buf.getvalue()


def gif() -> bytes:
    frames = [Image.new("P", (16, 16), i) for i in (1, 2)]
    for f in frames:
        f.putpalette([200, 100, 50] * 256)
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def palette_png() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 128, 255] * 256)
    return png(img)


def special_member(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o755
    return info


@dataclass
class Fixture:
    """One kind of bad input: the stream that reads it, the skip kind it must be counted under (None: odd
    but valid, so it is converted and used), and the shard: good samples around the bad members."""

    name: str
    stream: str
    kind: str | None
    bad: list = field(default_factory=list)  # members of key "bad" (name suffixes, bytes) or TarInfo
    damage: object = None  # path -> None: byte-level damage to a shard of good samples g0..g3
    keys: tuple | None = None  # the keys read from the shard (default: g0, g1, plus "bad" when valid)
    also: tuple = ()  # other kinds the damage causes (e.g. a pair cut from its caption: missing_field)


def _good(stream: str, key: str) -> list:
    captions = {"g0": b"the cat sat", "g1": b"a red bird", "g2": b"the dog runs", "g3": b"a big tree"}
    caption = captions.get(key, b"a small green mat")
    if stream == "image":
        return [(f"{key}.jpg", jpeg((40, 80, 160)))]
    if stream == "text":
        return [(f"{key}.txt", caption)]
    return [(f"{key}.jpg", jpeg((40, 80, 160))), (f"{key}.txt", caption)]


def _cut_inside_member(key: str):
    def damage(path: Path) -> None:
        offset, size = data_offsets(path)[f"{key}.jpg"]
        assert size > BLOCK
        cut(path, offset + BLOCK)

    return damage


def _zero_header(key: str):
    def damage(path: Path) -> None:
        overwrite(path, header_offsets(path)[key], bytes(BLOCK))

    return damage


def _replace(data: bytes):
    def damage(path: Path) -> None:
        path.write_bytes(data)

    return damage


def _gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(path.read_bytes()))


DEEP_JSON = b'{"caption": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
RGB = Image.new("RGB", (16, 16), (200, 100, 50))
JPG = jpeg((200, 100, 50), 16)
BAD_IMAGE_FIXTURES = [
    Fixture("truncated_jpeg", "image", "image_decode", [("jpg", jpeg(size=64)[:300])]),
    Fixture("zero_byte_image", "image", "image_empty", [("jpg", b"")]),
    Fixture("png_bad_crc", "image", "image_decode", [("png", png_bad_crc())]),
    Fixture("truncated_png", "image", "image_decode", [("png", png(RGB)[:60])]),
    Fixture("not_an_image", "image", "image_decode", [("png", b"these bytes are no picture")]),
    Fixture("bmp_bad_header", "image", "image_decode", [("bmp", b"BM" + bytes(40))]),
    Fixture("huge_dimensions", "image", "image_too_large", [("png", huge_png())]),
    Fixture("over_max_pixels_png", "image", "image_too_large", [("png", png(Image.new("RGB", (200, 200))))]),
    Fixture("float_nan", "image", "image_nonfinite", [("tiff", float_tiff(float("nan")))]),
    Fixture("float_inf", "image", "image_nonfinite", [("tif", float_tiff(float("inf")))]),
    Fixture("nan_npy_array", "image", "missing_field", [("npy", npy(np.full((8, 8, 3), np.nan)))]),
    Fixture("unknown_extension", "image", "missing_field", [("xyz", JPG)]),
    Fixture("no_extension", "image", "tar_member", [special_member("bad", tarfile.REGTYPE)]),
    Fixture("directory_member", "image", "tar_member", [special_member("bad.jpg", tarfile.DIRTYPE)]),
    Fixture("symlink_member", "image", "tar_member", [special_member("bad.jpg", tarfile.SYMTYPE, "g0.jpg")]),
    Fixture("hardlink_member", "image", "tar_member", [special_member("bad.jpg", tarfile.LNKTYPE, "g0.jpg")]),
    Fixture("fifo_member", "image", "tar_member", [special_member("bad.jpg", tarfile.FIFOTYPE)]),
    Fixture(
        "duplicate_key",
        "image",
        "duplicate_member",
        [("jpg", JPG), ("jpg", JPG)],
        keys=("g0", "bad", "bad", "g1"),
    ),  # fmt: skip
    # Odd but valid: converted to RGB and used.
    Fixture("cmyk_jpeg", "image", None, [("jpg", _encoded(RGB.convert("CMYK"), "JPEG"))]),
    Fixture(
        "gray16_png", "image", None, [("png", png(Image.fromarray(np.full((16, 16), 40000, np.uint16))))]
    ),
    Fixture("palette_png", "image", None, [("png", palette_png())]),
    Fixture("rgba_png", "image", None, [("png", png(Image.new("RGBA", (16, 16), (255, 0, 0, 128))))]),
    Fixture("animated_gif", "image", None, [("gif", gif())]),
    Fixture("jfif_extension", "image", None, [("jfif", JPG)]),
    Fixture("uppercase_extension", "image", None, [("JPEG", JPG)]),
]
BAD_TEXT_FIXTURES = [
    Fixture("invalid_utf8", "text", "text_decode", [("txt", b"caf\xe9 \xff\xfe")]),
    Fixture("empty_text", "text", "text_empty", [("txt", b"")]),
    Fixture("whitespace_text", "text", "text_empty", [("txt", b" \t\r\n ")]),
    Fixture("bom_only_text", "text", "text_empty", [("txt", "\ufeff".encode())]),
    Fixture("zero_width_text", "text", "text_no_tokens", [("txt", "\u200b\u200c\u200b".encode())]),
    Fixture("deeply_nested_json", "text", "json_decode", [("json", DEEP_JSON)]),
    Fixture("invalid_json", "text", "json_decode", [("json", b'{"caption": "unterminated')]),
    Fixture("json_not_utf8", "text", "json_decode", [("json", b'{"caption": "caf\xe9"}')]),
    Fixture("json_huge_int", "text", "json_decode", [("json", b'{"caption": ' + b"9" * 5000 + b"}")]),
    Fixture("json_wrong_type", "text", "missing_field", [("json", b'["the cat sat"]')]),
    Fixture("json_caption_not_string", "text", "missing_field", [("json", b'{"caption": {"en": "cat"}}')]),
    Fixture("json_lone_surrogate", "text", "text_decode", [("json", b'{"caption": "\\udc80"}')]),
    Fixture("text_missing", "text", "missing_field", [("jpg", JPG)]),
]
BAD_PAIR_FIXTURES = [
    Fixture("pair_missing_caption", "pair", "missing_field", [("jpg", JPG)]),
    Fixture("pair_missing_image", "pair", "missing_field", [("txt", b"a lonely caption")]),
    Fixture("pair_caption_not_string", "pair", "missing_field", [("jpg", JPG), ("json", b'{"caption": 3}')]),
    Fixture("pair_deeply_nested_json", "pair", "json_decode", [("jpg", JPG), ("json", DEEP_JSON)]),
    Fixture("pair_truncated_image", "pair", "image_decode", [("jpg", jpeg(size=64)[:200]), ("txt", b"cat")]),
    Fixture("pair_empty_caption", "pair", "text_empty", [("jpg", JPG), ("txt", b"   ")]),
    Fixture("pair_duplicate_key", "pair", "duplicate_member",
            [("jpg", JPG), ("txt", b"one"), ("jpg", JPG), ("txt", b"two")], keys=("g0", "bad", "bad", "g1")),
    Fixture("pair_img2dataset_json_caption", "pair", None, [("jpg", JPG), ("json", b'{"caption": "a cat"}')]),
]  # fmt: skip
TAR_FIXTURES = [
    Fixture("corrupt_header_mid_shard", "image", "tar_read", damage=lambda p: corrupt_header(p, "g1.jpg"),
            keys=("g0", "g2", "g3")),
    Fixture("size_field_past_end_of_file", "image", "tar_read",
            damage=lambda p: set_member_size(p, "g1.jpg", 1 << 30), keys=("g0", "g2", "g3")),
    Fixture("zeroed_header_block", "image", "tar_read", damage=_zero_header("g2.jpg"),
            keys=("g0", "g1", "g3")),
    Fixture("cut_at_member_boundary", "image", "tar_read",
            damage=lambda p: cut(p, header_offsets(p)["g2.jpg"]), keys=("g0", "g1")),
    Fixture("cut_at_512_inside_member", "image", "tar_read", damage=_cut_inside_member("g2"),
            keys=("g0", "g1")),
    Fixture("cut_inside_header", "image", "tar_read",
            damage=lambda p: cut(p, header_offsets(p)["g2.jpg"] + 77), keys=("g0", "g1")),
    Fixture("gzip_compressed_shard", "image", "tar_read", damage=_gzip, keys=()),
    Fixture("empty_file", "image", "tar_read", damage=_replace(b""), keys=()),
    Fixture("not_a_tar", "image", "tar_read", damage=_replace(b"\x89PNG not a tar at all" * 100), keys=()),
    Fixture("text_shard_cut", "text", "tar_read", damage=lambda p: cut(p, header_offsets(p)["g3.txt"]),
            keys=("g0", "g1", "g2")),
    Fixture("pair_shard_corrupt_header", "pair", "tar_read", damage=lambda p: corrupt_header(p, "g1.txt"),
            keys=("g0", "g2", "g3"), also=("missing_field",)),  # g1 keeps its image only: no caption
]  # fmt: skip
FIXTURES = BAD_IMAGE_FIXTURES + BAD_TEXT_FIXTURES + BAD_PAIR_FIXTURES + TAR_FIXTURES


def write_fixture(root: Path, fx: Fixture) -> Path:
    """Write ``fx``'s shard under ``root/<stream>/<name>.tar`` with Python's tarfile; returns its path."""
    path = root / fx.stream / f"{fx.name}.tar"
    if fx.damage is not None:
        members = [m for k in ("g0", "g1", "g2", "g3") for m in _good(fx.stream, k)]
        tar_shard(path, members)
        fx.damage(path)
        return path
    bad = [m if isinstance(m, tarfile.TarInfo) else (f"bad.{m[0]}", m[1]) for m in fx.bad]
    tar_shard(path, _good(fx.stream, "g0") + bad + _good(fx.stream, "g1"))
    return path


def expected_keys(fx: Fixture) -> tuple:
    """The sample keys the loader reads from ``fx``'s shard (in order)."""
    if fx.keys is not None:
        return fx.keys
    return ("g0", "bad", "g1") if fx.kind is None else ("g0", "g1")


def write_all(root: Path) -> dict[str, list[str]]:
    """Every fixture's shard plus one clean shard per stream; stream -> shard paths."""
    shards: dict[str, list[str]] = {"image": [], "text": [], "pair": []}
    for fx in FIXTURES:
        shards[fx.stream].append(str(write_fixture(root, fx)))
    for stream in shards:
        shards[stream].append(str(clean_shard(root / stream / "clean.tar", stream)))
    return shards


def clean_shard(path: Path, stream: str, keys: tuple = ("c0", "c1")) -> Path:
    """A shard of good samples of ``stream``."""
    return tar_shard(path, [m for k in keys for m in _good(stream, k)])
