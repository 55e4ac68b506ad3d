"""Reading and writing webdataset-style tar shards: one sample = consecutive members sharing a key.

A member ``dir/abc.seg.jpg`` belongs to sample ``dir/abc`` under field ``seg.jpg`` (the key ends at the first
dot of the file name, as in webdataset and img2dataset). Reading works from any member-header byte offset, so
a reader's position in a shard is one integer, and every sample keeps the offsets of its members so that it
can be read again later (the shuffle buffer is restored that way on resume).

The reader walks the member headers itself instead of through ``tarfile``'s iterator, which takes a bad
header after the first one for the end of the archive: damage (bad checksums, sizes beyond the file, cut
files) is reported, and reading resumes at the next valid header (docs/data.md, "Bad input").

Remote shards (webdataset's URL forms: ``pipe:COMMAND``, ``http(s)://``, ``s3://``, ``gs://``) are opened with
webdataset's ``gopen`` and read as one forward-only stream: positions are the same member-header offsets as
in a local file, but a reader resumes by re-reading the shard and skipping the recorded number of samples, a
failed transfer is retried with exponential backoff, and damage ends the shard (docs/data.md, "Remote
shards").
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from time import sleep

from beit3.pretrain.errors import PretrainError


class RemoteReadError(PretrainError, RuntimeError):
    """A remote shard that could not be read after all its tries (the reader skips it for this round)."""


class _TransportError(PretrainError, RuntimeError):
    """The transfer failed (the command exited non-zero, a read failed): worth another try."""


# Errors a shard that cannot be opened or read at all raises (damage inside a shard is reported instead): they
# cost the shard (or a sample), never the run.
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, RemoteReadError)

log = logging.getLogger(__name__)


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
    """Read a sample back from its reference (file offsets recorded when it was first read); a remote
    shard's sample is read from a new stream of the shard (:func:`read_refs` reads many in one pass)."""
    key, url, members = ref
    if is_remote(url):
        (sample,) = read_refs([ref], tries=1)
        if isinstance(sample, Exception):
            raise sample
        return sample
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


# ---- members: our own header walk, so that damage is seen instead of looking like the end of the shard ----
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENDED = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
             tarfile.GNUTYPE_LONGLINK)  # fmt: skip
_warned: set[tuple[str, int]] = set()  # (shard, offset) pairs already logged by this process


@dataclass
class _Member:
    name: str
    regular: bool  # a regular file (not a directory, link, device, fifo)
    size: int
    header: int  # offset of its first header block (an extended header's, if any): where reading resumes
    data: int  # offset of its data


@dataclass
class _Damage:
    offset: int
    detail: str


def _header(block: bytes) -> tarfile.TarInfo | None:
    """The member header in a 512-byte block, or None when the checksum or a number field is invalid."""
    try:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def _resync(f, pos: int, file_size: int) -> int | None:
    """The offset of the next block at or after ``pos`` holding a valid ustar header (magic and checksum)."""
    chunk = 1 << 20
    while pos + BLOCK <= file_size:
        f.seek(pos)
        data = f.read(min(chunk, file_size - pos))
        i = data.find(b"ustar")
        while i >= 0:
            start = i - 257  # the magic field's place in a header block
            aligned = start >= 0 and start % BLOCK == 0 and start + BLOCK <= len(data)
            if aligned and _header(data[start : start + BLOCK]) is not None:
                return pos + start
            i = data.find(b"ustar", i + 1)
        step = len(data) // BLOCK * BLOCK - BLOCK  # overlap one block: a header cut by the chunk edge
        if step <= 0:
            return None
        pos += step
    return None


def _check_header(block: bytes, pax: dict, remaining: int) -> tuple[tarfile.TarInfo | None, int, str | None]:
    """A header block -> (header, member size, None), or what is wrong with it as the third item.

    An all-zero block is the end-of-archive marker; it is reported here as damage and the caller decides
    (it is damage only when valid members follow). ``remaining``: the bytes after the block.
    """
    if block == _ZERO_BLOCK:
        return None, -1, "a block of zeros inside the shard"
    info = _header(block)
    if info is None:
        return None, -1, "a member header with a bad checksum or number field"
    size = info.size
    if "size" in pax:  # a pax size overrides the octal field (members over 8 GiB)
        size = int(pax["size"]) if pax["size"].isdigit() else -1
    if size < 0 or size > remaining:
        return info, size, f"member {info.name!r} claims {size} bytes, {max(remaining, 0)} remain"
    return info, size, None


def _parse_pax(raw: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records of a pax extended header."""
    out, i = {}, 0
    while i < len(raw) and raw[i : i + 1] != b"\0":
        sp = raw.index(b" ", i)
        n = int(raw[i:sp])
        if n <= sp - i or i + n > len(raw) or raw[i + n - 1 : i + n] != b"\n":
            raise ValueError(f"bad pax record at {i}")
        k, _, v = raw[sp + 1 : i + n - 1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        i += n
    return out


def _members(f, file_size: int, pos: int):
    """The members from header offset ``pos`` on, as :class:`_Member`, with :class:`_Damage` in between.

    After damage (a header with a bad checksum, a size beyond the end of the file, a file cut inside a
    header or without its end-of-archive blocks) the walk resumes at the next valid header found on a
    512-byte boundary, so one bad block does not lose the rest of the shard.
    """
    start, header, pax, long_name = pos, None, {}, None
    while True:
        if pos >= file_size:
            if pos != start or start == 0:  # (a reader resumed exactly at the end has nothing to say)
                what = "is empty" if file_size == 0 else "ends without its end-of-archive blocks (cut short?)"
                yield _Damage(pos, f"the file {what}")
            return
        f.seek(pos)
        block = f.read(BLOCK)
        if pos == 0 and block[:2] == b"\x1f\x8b":
            yield _Damage(0, "gzip-compressed: shards are read uncompressed (gunzip them)")
            return
        if len(block) < BLOCK:
            yield _Damage(pos, f"the file ends inside a member header ({len(block)} of {BLOCK} bytes)")
            return
        info, size, damage = _check_header(block, pax, file_size - pos - BLOCK)
        if damage is not None:
            nxt = _resync(f, pos + BLOCK, file_size)
            if block == _ZERO_BLOCK and nxt is None:
                return  # the end, followed only by padding
            yield _Damage(pos, damage)
            if nxt is None:
                return
            pos, header, pax, long_name = nxt, None, {}, None
            continue
        header = pos if header is None else header
        data_at, pos = pos + BLOCK, pos + BLOCK + -(-size // BLOCK) * BLOCK
        if info.type in _EXTENDED:
            f.seek(data_at)
            raw = f.read(size)
            try:
                if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    pax = _parse_pax(raw)
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            except ValueError as e:
                yield _Damage(header, f"a bad extended header ({e})")
                nxt = _resync(f, pos, file_size)
                if nxt is None:
                    return
                pos, header, pax, long_name = nxt, None, {}, None
            continue
        name = pax.get("path") or long_name or info.name
        yield _Member(name, info.type in _REGULAR, size, header, data_at)
        header, pax, long_name = None, {}, None


def _log_damage_once(url: str, damage: _Damage) -> None:
    if (url, damage.offset) not in _warned:
        _warned.add((url, damage.offset))
        log.warning("damaged shard %s at byte %d: %s (counted as tar_read; valid members after it are still "
                    "read)", url, damage.offset, damage.detail)  # fmt: skip


def iter_shard(
    url: str,
    offset: int = 0,
    index: int = 0,
    part: int = 0,
    parts: int = 1,
    report=_no_report,
    tries: int = 3,
    backoff: float = 1.0,
) -> Iterator[tuple[RawSample | None, int, int]]:
    """Samples of a tar shard from a member-header byte ``offset``, as ``(sample, next_offset, next_index)``.

    ``index`` counts samples from the start of the shard; only samples with ``index % parts == part`` are
    read (the others are skipped by seeking and yielded as None so positions still advance).

    What is dropped or repaired is passed to ``report(kind, url, detail)`` by the one reader that owns the
    sample in progress (so readers of other parts of the shard do not count it again):

    - ``tar_read``: damage (bad header checksum, a member larger than the rest of the file, a file cut inside
      a header or without end-of-archive blocks, gzip). Logged once per shard and offset; reading resumes at
      the next valid header, and the sample in progress ends there (no sample spans damage).
    - ``tar_member``: a member that cannot be a field (a directory, link or device, a name without extension).
    - ``duplicate_member``: a member whose field the current sample already has (two ``X.jpg`` in a row)
      starts a new sample with the same key instead of replacing the first one's bytes.

    A missing or unreadable file raises one of :data:`TAR_ERRORS`.

    A remote shard (:func:`is_remote`) is read as a stream from its start, the first ``index`` samples
    skipped (``offset`` checks where they end); a transfer that fails is retried ``tries - 1`` times (the
    first after ``backoff`` seconds, then twice as long each time, each reported as ``remote/retries``),
    then :class:`RemoteReadError` is raised; damage ends the shard (:func:`_iter_stream`).
    """
    if is_remote(url):
        return _iter_stream(url, offset, index, part, parts, report, tries, backoff)
    return _iter_file(url, offset, index, part, parts, report)


def _iter_file(url, offset, index, part, parts, report):
    """:func:`iter_shard` for a local file: seeks to ``offset`` and resumes at the next valid header."""
    with open(url, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        key, fields, members, exts, broken = None, {}, [], set(), False
        for m in _members(f, file_size, offset):
            mine = index % parts == part
            if isinstance(m, _Damage):
                broken = True
                if mine:
                    _log_damage_once(url, m)
                    report("tar_read", url, f"byte {m.offset}: {m.detail}")
                continue
            parsed = split_member_name(m.name) if m.regular else None
            if parsed is None:
                if mine:
                    report("tar_member", url, f"{m.name!r} at byte {m.header} is no sample field")
                continue
            mkey, ext = parsed
            if key is not None and (mkey != key or ext in exts or broken):
                yield _finish(key, url, fields, members, index, part, parts), m.header, index + 1
                index += 1
                if mkey == key and ext in exts and not broken and index % parts == part:
                    report("duplicate_member", url, f"{m.name} at byte {m.header} repeats a field")
                key = None
            if key is None:
                key, fields, members, exts, broken = mkey, {}, [], set(), False
            exts.add(ext)
            if index % parts == part:
                f.seek(m.data)
                data = f.read(m.size)
                if len(data) != m.size:  # the file shrank while being read
                    raise EOFError(f"{url}: member {m.name} is truncated")
                fields[ext] = data
                members.append((ext, m.data, m.size))
        if key is not None:
            yield _finish(key, url, fields, members, index, part, parts), file_size, index + 1


def _finish(key, url, fields, members, index, part, parts) -> RawSample | None:
    if index % parts != part:
        return None
    return RawSample(key, url, fields, tuple(members))


# ---- remote shards: webdataset's URL forms, opened with its gopen and read forward only ----
# The schemes a shard spec may name, and the command-line client each needs on PATH (None: the command is the
# spec). http(s) is read by curl and s3 by the AWS CLI through a ``pipe:`` URL; gs by webdataset's own handler
# (``gsutil cat``); ``file://`` is a local path.
REMOTE_SCHEMES = {"pipe": None, "http": "curl", "https": "curl", "s3": "aws", "gs": "gsutil"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# curl without retries of its own (the loader's backoff is the one retry loop, its counter sees every
# failure), failing on HTTP errors, following redirects, giving up on a connection that stalls for a minute.
CURL = "curl --fail --silent --show-error --location --connect-timeout 30 --speed-limit 1 --speed-time 60"


def url_scheme(spec: str) -> str | None:
    """``"pipe"``, ``"https"``, ``"s3"``, ``"file"``, ... for a URL-like shard spec; None for a plain path."""
    m = _SCHEME.match(spec)
    if m is None:
        return None
    scheme = m.group(1).lower()
    return scheme if scheme == "pipe" or spec[m.end() :].startswith("//") else None


def is_remote(url: str) -> bool:
    """Whether ``url`` is read as a stream (any URL but ``file://``) rather than as a local file."""
    return url_scheme(url) not in (None, "file")


def gopen_url(url: str) -> str:
    """What webdataset's ``gopen`` opens for the remote shard spec ``url`` (after its ``GOPEN_REWRITE``)."""
    from webdataset.gopen import rewrite_url

    url = rewrite_url(url)
    scheme = url_scheme(url)
    if scheme in ("http", "https"):
        return f"pipe:{CURL} {shlex.quote(url)}"
    if scheme == "s3":
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    return url


class _Stream:
    """A forward-only reader over a gopen stream that knows its byte position and tells a failed transfer
    (an exception, or a command that exits non-zero, checked when the stream ends) from data that ends."""

    def __init__(self, url: str) -> None:
        from webdataset.gopen import gopen

        self.url, self.pos, self.opened = url, 0, gopen_url(url)
        try:
            self.f = self.pipe = gopen(self.opened, "rb")
        except (OSError, ValueError) as e:
            raise _TransportError(f"cannot open it: {e}") from e

    def _failed(self, e: Exception) -> _TransportError:
        status = getattr(self.pipe, "status", None)  # webdataset's Pipe: the command's exit status
        if status:
            return _TransportError(f"`{self.opened.removeprefix('pipe:')}` exited with status {status}")
        return _TransportError(f"{type(e).__name__}: {e}")

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream."""
        chunks = []
        while n > 0:
            try:
                data = self.f.read(min(n, 1 << 20))
            except (OSError, ValueError) as e:
                raise self._failed(e) from e
            if not data:
                break
            chunks.append(data)
            n -= len(data)
            self.pos += len(data)
        return b"".join(chunks)

    def skip_to(self, pos: int) -> bool:
        """Read and drop the bytes up to ``pos``; False if the stream ends first."""
        while self.pos < pos:
            if not self.read(min(pos - self.pos, 1 << 20)):
                return False
        return True

    def drain(self) -> bool:
        """After the end-of-archive marker: whether only zero bytes follow (tar padding), read to the end
        and the transfer checked; False (the stream abandoned) at the first other byte."""
        while data := self.read(1 << 20):
            if data.strip(b"\0"):
                self.close()
                return False
        self.close(check=True)
        return True

    def close(self, check: bool = False) -> None:
        """``check``: wait for the command and raise :class:`_TransportError` if it failed. Otherwise the
        stream is abandoned: our end closed and the command killed."""
        f, self.f = self.f, None
        if f is None:
            return
        proc = getattr(f, "proc", None)  # webdataset's Pipe
        if not check and proc is not None:
            f.stream.close()
            proc.kill()
            proc.wait()
            return
        try:
            f.close()
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            if check:
                raise self._failed(e) from e


def _stream_end(s: _Stream, offset: int, detail: str) -> _Damage:
    """The stream ended early: a failed transfer (raised, to be retried) or a shard that is cut (damage)."""
    s.close(check=True)
    return _Damage(offset, detail)


def _stream_members(s: _Stream):
    """:func:`_members` for a stream from its start, forward only: the first damage ends it (finding the
    next header would mean reading the rest of the shard blindly)."""
    header, pax, long_name = None, {}, None
    while True:
        pos = s.pos
        block = s.read(BLOCK)
        if pos == 0 and block[:2] == b"\x1f\x8b":
            yield _Damage(0, "gzip-compressed: shards are read uncompressed (`pipe:... | gzip -dc`)")
            return
        if len(block) < BLOCK:
            what = "inside a member header" if block else "without its end-of-archive blocks (cut short?)"
            yield _stream_end(s, pos, "the stream is empty" if pos == 0 else f"the stream ends {what}")
            return
        if block == _ZERO_BLOCK:
            if not s.drain():
                yield _Damage(pos, "a block of zeros inside the shard (the rest of the stream is not read)")
            return
        info, size, damage = _check_header(block, pax, 1 << 62)
        if damage is not None:
            yield _Damage(pos, f"{damage} (the rest of the stream is not read)")
            return
        header = pos if header is None else header
        data_at, end = pos + BLOCK, pos + BLOCK + -(-size // BLOCK) * BLOCK
        if info.type in _EXTENDED:
            raw = s.read(size)
            if len(raw) < size or not s.skip_to(end):
                yield _stream_end(s, header, "the stream ends inside an extended header")
                return
            try:
                if info.type in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                    pax = _parse_pax(raw)
                elif info.type == tarfile.GNUTYPE_LONGNAME:
                    long_name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            except ValueError as e:
                yield _Damage(header, f"a bad extended header ({e}; the rest of the stream is not read)")
                return
            continue
        name = pax.get("path") or long_name or info.name
        yield _Member(name, info.type in _REGULAR, size, header, data_at)  # its reader may read its data
        header, pax, long_name = None, {}, None
        if not s.skip_to(end):
            yield _stream_end(s, data_at, f"the stream ends inside member {name!r}")
            return


def _changed(url: str, skip: int, at: int, recorded: int) -> tarfile.ReadError:
    return tarfile.ReadError(
        f"{url}: sample {skip} starts at byte {at}, not at byte {recorded} as recorded: the shard changed"
    )


def _stream_pass(url, skip, expect, part, parts, report):
    """One pass over a remote shard from its start, yielding as :func:`_iter_file` does from sample ``skip``
    on; the samples before it are read (their bytes dropped) but neither yielded nor reported again, and
    sample ``skip`` must start at byte ``expect``. Raises :class:`_TransportError` for a failed transfer."""
    s = _Stream(url)
    try:
        key, fields, members, exts, index = None, {}, [], set(), 0
        for m in _stream_members(s):
            mine = index >= skip and index % parts == part  # this reader reports what happens now
            if isinstance(m, _Damage):
                if mine:
                    _log_damage_once(url, m)
                    report("tar_read", url, f"byte {m.offset}: {m.detail}")
                break
            parsed = split_member_name(m.name) if m.regular else None
            if parsed is None:
                if mine:
                    report("tar_member", url, f"{m.name!r} at byte {m.header} is no sample field")
                continue
            mkey, ext = parsed
            if key is not None and (mkey != key or ext in exts):
                if index >= skip:
                    yield _finish(key, url, fields, members, index, part, parts), m.header, index + 1
                index += 1
                if index == skip and m.header != expect:
                    raise _changed(url, skip, m.header, expect)
                if mkey == key and ext in exts and index >= skip and index % parts == part:
                    report("duplicate_member", url, f"{m.name} at byte {m.header} repeats a field")
                key = None
            if key is None:
                key, fields, members, exts = mkey, {}, [], set()
            exts.add(ext)
            if index >= skip and index % parts == part:
                data = s.read(m.size)
                if len(data) == m.size:
                    fields[ext] = data
                    members.append((ext, m.data, m.size))
                elif not fields:  # cut inside its first member: no sample (the walker reports the cut)
                    key = None
        if key is not None:
            if index >= skip:
                yield _finish(key, url, fields, members, index, part, parts), s.pos, index + 1
            index += 1
        if index < skip or (0 < skip == index and s.pos != expect):
            raise _changed(url, skip, s.pos, expect)
    finally:
        s.close()


def _iter_stream(url, offset, index, part, parts, report, tries, backoff):
    """:func:`iter_shard` for a remote shard: passes over the stream, each retry after a failed transfer
    resuming by sample count where the last one stopped, with exponential backoff between tries."""
    failures = 0
    while True:
        try:
            for item in _stream_pass(url, index, offset, part, parts, report):
                _, offset, index = item
                yield item
            return
        except _TransportError as e:
            failures += 1
            if failures >= tries:
                raise RemoteReadError(f"{url}: {e} (tried {failures} times)") from None
            delay = backoff * 2 ** (failures - 1)
            log.warning("reading %s failed at sample %d (%s): try %d of %d in %.3g s", url, index, e,
                        failures + 1, tries, delay)  # fmt: skip
            report("remote/retries", url, str(e))
            sleep(delay)


def read_refs(refs: list[tuple], report=_no_report, tries: int = 3, backoff: float = 1.0) -> list:
    """The samples of many references (:meth:`RawSample.ref`), in order; a sample that cannot be read is
    the exception instead. A remote shard is streamed once for all of its samples (up to the last one's
    bytes), with the retries of :func:`iter_shard`."""
    out: list = [None] * len(refs)
    remote: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        if is_remote(ref[1]):
            remote.setdefault(ref[1], []).append(i)
            continue
        try:
            out[i] = read_ref(ref)
        except TAR_ERRORS as e:
            out[i] = e
    for url, which in remote.items():
        spans = sorted({(offset, size) for i in which for _, offset, size in refs[i][2]})
        for failures in range(1, tries + 1):
            try:
                data = dict(zip(spans, _read_spans(url, spans)))
                break
            except _TransportError as e:
                if failures == tries:
                    data = RemoteReadError(f"{url}: {e} (tried {failures} times)")
                    break
                report("remote/retries", url, str(e))
                sleep(backoff * 2 ** (failures - 1))
            except EOFError as e:
                data = e
                break
        for i in which:
            key, _, members = refs[i]
            if isinstance(data, Exception):
                out[i] = data
            else:
                fields = {name: data[(offset, size)] for name, offset, size in members}
                out[i] = RawSample(key, url, fields, tuple(tuple(m) for m in members))
    return out


def _read_spans(url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of sorted, disjoint ``(offset, size)`` spans of a remote shard, from one stream."""
    s = _Stream(url)
    try:
        out = []
        for offset, size in spans:
            if not s.skip_to(offset) or len(data := s.read(size)) != size:
                s.close(check=True)
                raise EOFError(f"{url}: the stream ends before byte {offset + size}")
            out.append(data)
        return out
    finally:
        s.close()


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
