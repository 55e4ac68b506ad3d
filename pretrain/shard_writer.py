"""Writing a shard directory: the sample fields and the shards-then-manifest step.

Shared by ``beit3-shards`` (pretrain/shards.py) and the demo dataset (pretrain/demo_data.py), which import
this module and not each other's. A sample to write is a result ``("ok", fields)``; any other status is the
kind of skip it is counted under in the manifest.

:func:`write_shards_parallel` is ``beit3-shards``' engine: work chunks processed in worker processes, results
written in input order (so the output does not depend on the number of workers), each shard under a
temporary name until complete, and a progress file from which an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool

from PIL import Image

from beit3.pretrain.data.decode import SkipSample, decode_image, decode_text
from beit3.pretrain.data.tario import ShardWriter, write_manifest


def prepare_image(data: bytes, max_pixels: int, shorter_side: int = 0, quality: int = 95) -> bytes:
    """Validated JPEG bytes of an image (decoded, converted to RGB, optionally downscaled), or SkipSample."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, mode, size = probe.format, probe.mode, probe.size
    except Exception:
        fmt = mode = size = None  # decode_image below names the problem
    img = decode_image(data, max_pixels)
    resize = shorter_side and min(img.size) > shorter_side
    # The size check catches large JPEGs that decode_image drafted to a smaller scale.
    if fmt == "JPEG" and mode in ("RGB", "L") and not resize and img.size == size:
        return data
    if resize:
        scale = shorter_side / min(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def image_result(
    data: bytes, caption: str | None, max_pixels: int, shorter_side: int = 0, quality: int = 95
) -> tuple[str, dict | None]:
    """``("ok", {"jpg": ...})`` with ``"txt"`` too when ``caption`` is not None, or ``(skip kind, None)``."""
    try:
        fields = {"jpg": prepare_image(data, max_pixels, shorter_side, quality)}
        if caption is not None:
            fields["txt"] = decode_text(caption.encode("utf-8")).encode("utf-8")
    except SkipSample as e:
        return e.kind, None
    return "ok", fields


def text_results(texts: Iterable[str]) -> Iterable[tuple[str, dict]]:
    """Each text as a result to write (``{"txt": utf-8 bytes}``)."""
    return (("ok", {"txt": text.encode("utf-8")}) for text in texts)


def split_segments(text: str, max_units: int, unit: str = "words") -> list[str]:
    """Cut a document into consecutive segments of at most ``max_units`` words (or characters).

    Words are whitespace-separated and re-joined with single spaces. In character mode a segment ends at the
    last whitespace before the limit when there is one, so words are only cut when longer than a segment.
    """
    if unit == "words":
        words = text.split()
        return [" ".join(words[i : i + max_units]) for i in range(0, len(words), max_units)]
    text = " ".join(text.split())
    out = []
    while text:
        if len(text) <= max_units:
            out.append(text)
            break
        cut = text.rfind(" ", 0, max_units + 1)
        cut = cut if cut > 0 else max_units
        out.append(text[:cut].strip())
        text = text[cut:].lstrip()
    return out


def write_shard_dir(
    out_dir: str,
    kind: str,
    results: Iterable[tuple[str, dict | None]],
    extra: dict,
    prefix: str = "",
    max_samples: int = 10000,
    max_bytes: int = 1 << 30,
    skipped: Counter | None = None,
) -> dict:
    """Write ``results`` in order into ``{prefix or kind}-NNNNNN.tar`` shards, then ``manifest.json``.

    Sample keys are the results' positions (``000000007``), skipped ones included, so a key names its input.
    Skips are added to ``skipped`` (counts from before, e.g. unusable index lines). Returns the manifest.
    """
    writer = ShardWriter(out_dir, prefix or kind, max_samples, max_bytes)
    skipped = Counter() if skipped is None else skipped
    try:
        for i, (status, fields) in enumerate(results):
            if status == "ok":
                writer.write(f"{i:09d}", fields)
            else:
                skipped[status] += 1
    finally:
        writer.close()
    path = write_manifest(out_dir, kind, writer.shards, dict(skipped), extra)
    with open(path) as f:
        return json.load(f)


def shard_dir_summary(manifest: dict) -> dict:
    """``{"samples": n, "shards": n}`` of a manifest."""
    return {"samples": manifest["samples"], "shards": len(manifest["shards"])}


# ---- parallel, resumable writing -------------------------------------------------------------------------
PROGRESS_FILE = ".beit3-shards-progress.json"
TMP_SUFFIX = ".tmp"


def plan_digest(plan) -> str:
    """A short digest of everything that decides the output (inputs in order, options): a progress file or
    manifest written under another plan is not resumed from."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResumableShardWriter:
    """Numbered tar shards as :class:`~beit3.pretrain.data.tario.ShardWriter` writes them (same cut rule, same
    fixed member metadata: the same bytes), except that a shard is written as ``NAME.tmp`` and renamed to
    ``NAME`` only once complete, and the writer can continue after ``shards`` finished by an earlier run."""

    def __init__(self, out_dir: str, prefix: str, max_samples: int, max_bytes: int, shards=()) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict] = [dict(s) for s in shards]  # finished
        self.written_bytes = 0  # bytes of the shards this writer finished
        self._cur: dict | None = None
        self._tar: tarfile.TarFile | None = None
        os.makedirs(out_dir, exist_ok=True)

    @staticmethod
    def sample_size(fields: dict[str, bytes]) -> int:
        return sum(len(v) + 1024 for v in fields.values())

    def full_for(self, fields: dict[str, bytes]) -> bool:
        """Whether writing ``fields`` needs a new shard (after the current one, if any, is finished)."""
        cur = self._cur
        return (
            cur is None
            or cur["samples"] >= self.max_samples
            or (cur["samples"] > 0 and cur["bytes"] + self.sample_size(fields) > self.max_bytes)
        )

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Append one sample; call :meth:`finish` first when :meth:`full_for` says so."""
        if self._cur is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            path = os.path.join(self.out_dir, name + TMP_SUFFIX)
            # Held open across write() calls and closed in finish(): no context manager fits.
            self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self._cur = {"name": name, "samples": 0, "bytes": 0}
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._tar.members.clear()  # (kept for reading back only: memory would grow with the shard)
        self._cur["samples"] += 1
        self._cur["bytes"] += self.sample_size(fields)

    def finish(self) -> bool:
        """Complete the current shard (closed, flushed to disk, renamed); False when none was open."""
        if self._tar is None:
            return False
        self._tar.fileobj.flush()
        os.fsync(self._tar.fileobj.fileno())
        self._tar.close()
        self._tar = None
        final = os.path.join(self.out_dir, self._cur["name"])
        os.replace(final + TMP_SUFFIX, final)
        self._cur["bytes"] = os.path.getsize(final)
        self.written_bytes += self._cur["bytes"]
        self.shards.append(self._cur)
        self._cur = None
        return True

    def abandon(self) -> None:
        """Close the unfinished shard without renaming it (it stays ``.tmp``; a resumed run rewrites it)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._cur = None


def ordered_map(work: Callable, chunks: Iterable[tuple], workers: int, window: int) -> Iterator[tuple]:
    """``(pos, size, work(payload))`` for each ``(pos, size, payload)`` chunk, in input order.

    With ``workers > 1`` the chunks run in a process pool, at most ``window`` of them submitted and not yet
    consumed (bounded memory however long the input and however slow the writer)."""
    if workers <= 1:
        for pos, size, payload in chunks:
            yield pos, size, work(payload)
        return
    with Pool(workers) as pool:  # terminated on exit, also when the consumer stops early
        pending: deque = deque()
        for pos, size, payload in chunks:
            pending.append((pos, size, pool.apply_async(work, (payload,))))
            if len(pending) >= window:
                p, n, res = pending.popleft()
                yield p, n, res.get()
        while pending:
            p, n, res = pending.popleft()
            yield p, n, res.get()


class Progress:
    """A tqdm bar on a terminal (when tqdm is installed), otherwise one log line every ``every`` seconds;
    nothing when ``quiet``."""

    def __init__(self, total: int | None, unit: str, quiet: bool, every: float = 30.0) -> None:
        self.total, self.unit, self.every = total, unit, every
        self.done = 0
        self.start = self._last = time.monotonic()
        self.bar = None
        self.log = not quiet
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                scale = unit == "B"
                self.bar = tqdm(total=total, unit=unit, unit_scale=scale, file=sys.stderr, dynamic_ncols=True)
                self.log = False

    def update(self, n: int, samples: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.log and now - self._last >= self.every:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            rate = samples / max(now - self.start, 1e-9)
            print(
                f"beit3-shards: {self.done}{of} {self.unit} read, {samples} samples written "
                f"({rate:.1f} samples/s)",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _save_json(path: str, record: dict) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_shards_parallel(
    out_dir: str,
    kind: str,
    chunks: Callable[[list | None], Iterable[tuple]],
    work: Callable[[object], list[tuple[str, dict | None]]],
    *,
    digest: str,
    extra: dict,
    prefix: str = "",
    max_samples: int = 10000,
    max_bytes: int = 1 << 30,
    workers: int = 1,
    skipped_before: Counter | None = None,
    skips_take_keys: bool = True,
    progress: Progress | None = None,
) -> tuple[dict, dict]:
    """Write the results of ``work`` over ``chunks`` into shards under ``out_dir``, resumably; returns the
    manifest and the run's figures (``resumed_shards``, ``written_bytes``, ``samples``, ``seconds``).

    ``chunks(start)`` yields ``(pos, size, payload)`` from resume position ``start`` (None: the beginning);
    ``pos`` is a JSON value naming where the chunk starts, ``size`` what it adds to ``progress``. ``work``
    turns a payload into results in input order (``("ok", fields)`` or ``(skip kind, None)``); it runs in
    ``workers`` processes. Results are written in order, so shards and keys do not depend on ``workers``:
    key ``i`` is the result's position (``skips_take_keys``: skipped results count too) and a shard is cut
    as :class:`~beit3.pretrain.data.tario.ShardWriter` cuts it.

    After each finished shard the progress file records the finished shards, the position of the next
    result (``[pos, index in the chunk]``), the next key and the skip counts. A run finding a progress file
    of the same ``digest`` keeps those shards untouched and continues from there; a directory whose
    manifest has the same ``digest`` is complete and is left as it is. ``skipped_before`` (counted before
    the chunks, e.g. unusable index lines) is added to the manifest's counts, not to the progress file.
    """
    os.makedirs(out_dir, exist_ok=True)
    prefix = prefix or kind
    progress_path = os.path.join(out_dir, PROGRESS_FILE)
    manifest_path = os.path.join(out_dir, "manifest.json")
    start_time = time.monotonic()
    done = _load_json(manifest_path)
    if (
        done is not None
        and done.get("plan_digest") == digest
        and all(os.path.isfile(os.path.join(out_dir, s["name"])) for s in done["shards"])
    ):
        stats = {"resumed_shards": len(done["shards"]), "written_bytes": 0, "samples": 0, "complete": True}
        return done, {**stats, "seconds": time.monotonic() - start_time}
    state = _load_json(progress_path)
    resumable = (
        state is not None
        and state.get("digest") == digest
        and all(os.path.isfile(os.path.join(out_dir, s["name"])) for s in state["shards"])
    )
    if not resumable:
        state = {"digest": digest, "shards": [], "resume": None, "next_key": 0, "skipped": {}}
    writer = ResumableShardWriter(out_dir, prefix, max_samples, max_bytes, state["shards"])
    skipped = Counter(state["skipped"])
    key = state["next_key"]
    resume = state["resume"]
    drop = resume[1] if resume else 0
    samples = 0

    def save(here) -> None:
        record = {"digest": digest, "shards": writer.shards, "resume": here, "next_key": key}
        _save_json(progress_path, {**record, "skipped": dict(sorted(skipped.items()))})

    results = ordered_map(work, chunks(resume[0] if resume else None), workers, 2 * max(1, workers))
    try:
        for pos, size, out in results:
            for j, (status, fields) in enumerate(out):
                if drop:
                    drop -= 1
                    continue
                if status == "ok":
                    if writer.full_for(fields) and writer.finish():
                        save([pos, j])
                    writer.write(f"{key:09d}", fields)
                    samples += 1
                else:
                    skipped[status] += 1
                if status == "ok" or skips_take_keys:
                    key += 1
            drop = 0
            if progress is not None:
                progress.update(size, samples)
        writer.finish()
    except BaseException:
        writer.abandon()
        raise
    finally:
        results.close()
        if progress is not None:
            progress.close()
    total = Counter(skipped_before or {}) + skipped
    path = write_manifest(out_dir, kind, writer.shards, dict(total), {**extra, "plan_digest": digest})
    for leftover in (progress_path, os.path.join(out_dir, f"{prefix}-{len(writer.shards):06d}.tar.tmp")):
        if os.path.exists(leftover):
            os.remove(leftover)
    with open(path) as f:
        manifest = json.load(f)
    stats = {
        "resumed_shards": len(state["shards"]),
        "written_bytes": writer.written_bytes,
        "samples": samples,
    }
    return manifest, {**stats, "complete": False, "seconds": time.monotonic() - start_time}
