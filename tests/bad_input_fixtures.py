"""Damaged shards for the data tests, written with Python's ``tarfile`` (never with the project's writer, so
that the reader is tested against tar files it did not make), and byte-level damage applied afterwards."""

from __future__ import annotations

import io
import tarfile
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
