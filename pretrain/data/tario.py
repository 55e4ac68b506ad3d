"""Reading and writing webdataset-style tar shards: one sample = consecutive members sharing a key.

A member ``dir/abc.seg.jpg`` belongs to sample ``dir/abc`` under field ``seg.jpg`` (the key ends at the first
dot of the file name, as in webdataset and img2dataset). Reading works from any member-header byte offset, so
a reader's position in a shard is one integer, and every sample keeps the offsets of its members so that it
can be read again later (the shuffle buffer is restored that way on resume).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

# Errors a damaged or truncated tar file raises while it is being read.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)


@dataclass
class RawSample:
    """The undecoded fields of one sample plus where they live on disk."""

    key: str
    url: str
    fields: dict[str, bytes]
    members: tuple[tuple[str, int, int], ...]  # (field, data offset, size) for re-reading

    def ref(self) -> tuple:
        """A small picklable reference from which :func:`read_ref` restores this sample."""
        return (self.key, self.url, self.members)


def read_ref(ref: tuple) -> RawSample:
    """Read a sample back from its reference (file offsets recorded when it was first read)."""
    key, url, members = ref
    fields = {}
    with open(url, "rb") as f:
        for name, offset, size in members:
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise EOFError(f"{url}: member {key}.{name} is truncated")
            fields[name] = data
    return RawSample(key, url, fields, tuple(tuple(m) for m in members))


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/abc.seg.jpg"`` -> ``("dir/abc", "seg.jpg")``; None for names without an extension."""
    head, base = os.path.split(name)
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _no_report(kind: str, url: str, detail: str) -> None:
    pass


def iter_shard(
    url: str, offset: int = 0, index: int = 0, part: int = 0, parts: int = 1, report=_no_report
) -> Iterator[tuple[RawSample | None, int, int]]:
    """Samples of a tar shard from a member-header byte ``offset``, as ``(sample, next_offset, next_index)``.

    ``index`` counts samples from the start of the shard; only samples with ``index % parts == part`` are
    read (the others are skipped by seeking and yielded as None so positions still advance). Damaged data
    raises one of :data:`TAR_ERRORS`; the samples before it have already been yielded.

    A member whose field the current sample already has (two ``X.jpg`` in a row) starts a new sample with
    the same key instead of replacing the first one's bytes: ``report("duplicate_member", url, detail)`` is
    called once for it, by the reader that owns the new sample.
    """
    with open(url, "rb") as f:
        f.seek(offset)
        tf = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (closed with f; a generator holds it)
        key, fields, members, exts = None, {}, [], set()
        for info in tf:
            parsed = split_member_name(info.name) if info.isfile() else None
            if parsed is None:
                continue
            mkey, ext = parsed
            if mkey != key or ext in exts:
                if key is not None:
                    yield _finish(key, url, fields, members, index, part, parts), info.offset, index + 1
                    index += 1
                    if mkey == key and index % parts == part:
                        report("duplicate_member", url, f"{info.name} at byte {info.offset} repeats a field")
                key, fields, members, exts = mkey, {}, [], set()
            exts.add(ext)
            if index % parts == part:
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise EOFError(f"{url}: member {info.name} is truncated")
                fields[ext] = data
                members.append((ext, info.offset_data, info.size))
            tf.members.clear()  # a long shard would otherwise keep every header in memory
        if key is not None:
            yield _finish(key, url, fields, members, index, part, parts), os.path.getsize(url), index + 1


def _finish(key, url, fields, members, index, part, parts) -> RawSample | None:
    if index % parts != part:
        return None
    return RawSample(key, url, fields, tuple(members))


class ShardWriter:
    """Writes samples into numbered tar shards, starting a new one past ``max_samples`` or ``max_bytes``.

    Member metadata is fixed (mtime 0, uid 0) so the same input gives byte-identical shards.
    """

    def __init__(self, out_dir: str, prefix: str, max_samples: int = 10000, max_bytes: int = 1 << 30) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        os.makedirs(out_dir, exist_ok=True)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample (``{"jpg": ..., "txt": ...}``) to the current shard."""
        size = sum(len(v) + 1024 for v in fields.values())
        cur = self.shards[-1] if self.shards else None
        if (
            cur is None
            or cur["samples"] >= self.max_samples
            or (cur["samples"] and cur["bytes"] + size > self.max_bytes)
        ):
            self._next_shard()
            cur = self.shards[-1]
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        cur["samples"] += 1
        cur["bytes"] += size

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        # Held open across write() calls and closed in close(): no context manager fits.
        self._tar = tarfile.open(os.path.join(self.out_dir, name), "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.shards.append({"name": name, "samples": 0, "bytes": 0})

    def close(self) -> None:
        """Finish the current shard and record its real size on disk."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            cur = self.shards[-1]
            cur["bytes"] = os.path.getsize(os.path.join(self.out_dir, cur["name"]))


def write_manifest(out_dir: str, kind: str, shards: list[dict], skipped: dict[str, int], extra: dict) -> str:
    """Write ``manifest.json`` (shards with sample counts and bytes, totals, skipped counts per kind)."""
    manifest = {
        "kind": kind,
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
        "skipped": dict(sorted(skipped.items())),
        **extra,
    }
    path = os.path.join(out_dir, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path
