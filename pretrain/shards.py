"""``beit3-shards``: write webdataset tar shards for pretraining, each directory with a ``manifest.json``.

Subcommands::

    beit3-shards images OUT_DIR SRC...   # image folders (recursive), list files, tar shards -> {key}.jpg
    beit3-shards texts  OUT_DIR SRC...   # .txt (a document a line), .jsonl, also .gz -> {key}.txt segments
    beit3-shards pairs  OUT_DIR SRC...   # .jsonl/.tsv index, img2dataset tars or folders -> .jpg + .txt
    beit3-shards demo   OUT_DIR          # a small real dataset from pip-installed packages (docs/data.md)

Every image is decoded and converted to RGB before it is written (JPEGs already RGB or grey and not resized
are kept byte for byte; everything else is re-encoded as JPEG); inputs that fail are skipped and counted per
kind in the manifest. A new shard starts after ``--max-samples`` samples or ``--max-bytes`` bytes.
``--workers N`` processes (default: the CPU count) decode and encode; results are written in input order,
so the shards are the same bytes for any N. An interrupted run resumes: run the same command again.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from beit3.pretrain.data.decode import IMAGE_FIELDS, SkipSample, decode_text, image_field, text_field
from beit3.pretrain.data.tario import TAR_ERRORS, iter_shard
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.shard_writer import (
    Progress,
    image_result,
    plan_digest,
    split_segments,
    write_shards_parallel,
)

IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in IMAGE_FIELDS)  # the loader's list: what is written can be read


class ShardsError(PretrainError, ValueError):
    """Bad command-line input (missing sources, unknown columns); the message names the fix."""


# ---- images ----------------------------------------------------------------------------------------------
def _tar_dir(path: str) -> list[str]:
    """The ``*.tar`` files at the top of a directory (an img2dataset webdataset output), sorted."""
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar"))


def split_sources(sources: Iterable[str]) -> tuple[list[str], list[str]]:
    """(other sources, tar shards): ``.tar`` files and the tars of directories holding ``*.tar`` files."""
    others, tars = [], []
    for src in sources:
        if os.path.isfile(src) and src.endswith(".tar"):
            tars.append(src)
        elif os.path.isdir(src) and _tar_dir(src):
            tars.extend(_tar_dir(src))
        else:
            others.append(src)
    return others, tars


def list_images(sources: Iterable[str]) -> list[str]:
    """Image files under directories (recursively, sorted) and in list files (one path a line)."""
    paths: list[str] = []
    for src in sources:
        if os.path.isdir(src):
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                paths.extend(
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if f.lower().endswith(IMAGE_EXTENSIONS)
                )
        elif os.path.isfile(src):
            base = os.path.dirname(os.path.abspath(src))
            with open(src, encoding="utf-8") as f:
                paths.extend(os.path.join(base, line.strip()) for line in f if line.strip())
        else:
            raise ShardsError(f"{src} is neither a directory of images nor a list file: check the path")
    return paths


SIDECAR = 1  # a job's caption mode: read it from the image's own .txt or .json (img2dataset "files" output)


def _sidecar_caption(path: str) -> tuple[str, str | None]:
    """("ok", caption) from ``stem.txt``, else the ``caption`` of ``stem.json``; else (skip kind, None)."""
    stem = os.path.splitext(path)[0]
    fields = {}
    for ext in ("txt", "json"):
        try:
            with open(f"{stem}.{ext}", "rb") as f:
                fields[ext] = f.read()
            break
        except OSError:
            continue
    try:
        return "ok", decode_text(text_field(fields))
    except SkipSample as e:
        return e.kind, None


def _image_job(job: tuple, options: tuple) -> tuple[str, dict | None]:
    """(path, caption or None or SIDECAR) -> ("ok", fields) or (skip kind, None)."""
    path, caption = job
    if caption == SIDECAR:
        status, caption = _sidecar_caption(path)
        if status != "ok":
            return status, None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "missing_file", None
    return image_result(data, caption, *options)


def _tar_sample_job(item, options: tuple, captions: bool) -> tuple[str, dict | None]:
    """A tar sample's fields (or the skip kind the reader reported) -> a result."""
    if isinstance(item, str):
        return item, None
    try:
        data = image_field(item)
        caption = decode_text(text_field(item)) if captions else None
    except SkipSample as e:
        return e.kind, None
    return image_result(data, caption, *options)


# ---- texts -----------------------------------------------------------------------------------------------
TEXT_CHUNK_BYTES = 1 << 20  # raw bytes of lines per work chunk
MAX_LINE_BYTES = 16 << 20  # a longer line is cut at a space into several documents (memory stays bounded)
READ_BYTES = 1 << 20


def _is_jsonl(path: str) -> bool:
    return path.removesuffix(".gz").endswith((".jsonl", ".json"))


def _document(raw: bytes, is_jsonl: bool, field: str) -> tuple[str, str]:
    """One line -> ("ok", document) or (skip kind, "")."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "text_decode", ""
    if is_jsonl and line.strip():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            return "bad_line", ""
        try:
            line = record[field]
        except (KeyError, TypeError, IndexError):
            return "missing_field", ""
        if not isinstance(line, str):
            return "missing_field", ""
    if not line.strip():
        return "text_empty", ""
    return "ok", line


def _open_text(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _cut_point(buf: bytes, max_line: int) -> int:
    """Where an overlong line's first piece ends: after its last space or tab within ``max_line`` bytes."""
    return max(buf.rfind(b" ", 0, max_line), buf.rfind(b"\t", 0, max_line)) + 1 or max_line


def read_lines(f, pos: int = 0, max_line: int | None = None) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` of a binary file from offset ``pos`` (where ``f`` stands), reading ``READ_BYTES``
    at a time: never more than one read and one line in memory.

    A line longer than ``max_line`` bytes (``MAX_LINE_BYTES``, the newline included) comes as pieces, each
    ending after the last space or tab within ``max_line`` bytes (or at the limit): cut from the start of
    the line, so the pieces do not depend on how the file is read or where reading resumed."""
    max_line = max_line or MAX_LINE_BYTES
    buf = b""
    while True:
        data = f.read(READ_BYTES)
        if data:
            buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start, start + max_line)
            if nl >= 0:  # a whole line within the limit
                yield pos + start, buf[start : nl + 1]
                start = nl + 1
            elif len(buf) - start > max_line:  # an overlong line: its next piece
                cut = _cut_point(buf[start : start + max_line], max_line)
                yield pos + start, buf[start : start + cut]
                start += cut
            else:
                break
        buf, pos = buf[start:], pos + start
        if not data:
            break
    if buf:
        yield pos, buf


def iter_documents(sources: Iterable[str], field: str, skipped: Counter) -> Iterator[str]:
    """Documents from .txt (one a line) and .jsonl (``field``) files, also gzipped; bad lines are counted in
    ``skipped``. Streamed: memory does not grow with the file."""
    for src in sources:
        if not os.path.isfile(src):
            raise ShardsError(f"text source {src} does not exist")
        with _open_text(src) as f:
            for _, raw in read_lines(f):
                status, doc = _document(raw, _is_jsonl(src), field)
                if status == "ok":
                    yield doc
                else:
                    skipped[status] += 1


def _text_chunks(sources: list[str], start) -> Iterator[tuple]:
    """``([source index, byte offset], raw bytes, ("lines", is_jsonl, lines))`` chunks of about
    ``TEXT_CHUNK_BYTES`` from ``start`` (offsets of gzipped files are uncompressed ones: resuming one
    decompresses up to there)."""
    first, offset = start or (0, 0)
    for i in range(first, len(sources)):
        src = sources[i]
        with _open_text(src) as f:
            pos = offset if i == first else 0
            if pos:
                f.seek(pos)
            lines, size, at = [], 0, pos
            for off, line in read_lines(f, pos):
                if not lines:
                    at = off
                lines.append(line)
                size += len(line)
                if size >= TEXT_CHUNK_BYTES:
                    yield [i, at], size, ("lines", _is_jsonl(src), lines)
                    lines, size = [], 0
            if lines:
                yield [i, at], size, ("lines", _is_jsonl(src), lines)


# ---- pairs -----------------------------------------------------------------------------------------------
def _index_lines(f, count) -> Iterator[tuple[int, str]]:
    """Non-blank lines of an index file as (line number, text); lines that are not UTF-8 are counted."""
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            count("text_decode", lineno, "not UTF-8")
            continue
        line = line.lstrip("\ufeff") if lineno == 1 else line
        if line.strip():
            yield lineno, line


def _tsv_rows(lines, image_field: str, text_field: str, count) -> Iterator[tuple[str, str]]:
    cols, ncols = (0, 1), 2
    for n, (lineno, line) in enumerate(lines):
        cells = line.split("\t")
        if n == 0 and (image_field in cells or text_field in cells):  # a header row: named columns
            cols = (
                cells.index(image_field) if image_field in cells else 0,
                cells.index(text_field) if text_field in cells else 1,
            )
            ncols = len(cells)
        elif len(cells) != ncols:
            count("bad_line", lineno, f"{len(cells)} columns where {ncols} are expected")
        else:
            yield cells[cols[0]], cells[cols[1]]


def _jsonl_rows(lines, image_field: str, text_field: str, count) -> Iterator[tuple[str, str]]:
    for lineno, line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            count("bad_line", lineno, f"not JSON: {line[:40]!r}")
            continue
        if not isinstance(rec, dict):
            count("bad_line", lineno, f"a JSON {type(rec).__name__}, not an object")
        elif not isinstance(rec.get(image_field), str) or not rec[image_field]:
            count("missing_field", lineno, f"no {image_field!r} path")
        elif not isinstance(rec.get(text_field), str):
            count("missing_field", lineno, f"no {text_field!r} string")
        else:
            yield rec[image_field], rec[text_field]


def read_pair_index(
    src: str,
    image_field: str,
    text_field: str,
    image_root: str | None,
    skipped: Counter | None = None,
    quiet: bool = True,
) -> list[tuple[str, str]]:
    """(absolute image path, caption) rows of a .jsonl or .tsv index; unusable lines are counted, not fatal.

    A tsv whose first row holds ``image_field`` or ``text_field`` has a header naming its columns; otherwise
    (and for a column the header does not name) column 0 is the image path and column 1 the caption. A tsv
    row with another number of columns than the header (two without one) is a ``bad_line``: a tab inside a
    caption would otherwise cut it short. Counted in ``skipped``: ``bad_line`` (not JSON, not an object,
    wrong column count), ``missing_field`` (no image path, or a caption that is missing or not a string),
    ``text_decode`` (a line that is not UTF-8); the first five are also printed unless ``quiet``. An index
    with lines but no usable row is a :class:`ShardsError` (most likely the wrong ``--image-field``).
    """
    base = image_root or os.path.dirname(os.path.abspath(src))
    if not os.path.isfile(src):
        raise ShardsError(f"pair index {src} does not exist")
    bad: Counter = Counter()
    first_bad: list[str] = []

    def count(kind: str, lineno: int, detail: str) -> None:
        bad[kind] += 1
        if not first_bad:
            first_bad.append(f"line {lineno}: {detail}")
        if not quiet and sum(bad.values()) <= 5:
            print(f"beit3-shards: {src}:{lineno}: skipped ({kind}: {detail})", file=sys.stderr)

    rows_of = _tsv_rows if src.endswith(".tsv") else _jsonl_rows
    with open(src, "rb") as f:
        rows = list(rows_of(_index_lines(f, count), image_field, text_field, count))
    if bad and not rows:
        raise ShardsError(
            f"{src}: no usable line ({dict(bad)}; {first_bad[0]}): check --image-field/--text-field "
            f"({image_field!r}/{text_field!r})"
        )
    if skipped is not None:
        skipped.update(bad)
    return [(os.path.join(base, p), c) for p, c in rows]


# ---- writing ---------------------------------------------------------------------------------------------
IMAGE_CHUNK = 16  # images per work chunk


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _work(payload: tuple) -> list[tuple[str, dict | None]]:
    """Pool worker: one chunk of inputs -> its results, in order."""
    what = payload[0]
    if what == "files":
        _, jobs, options = payload
        return [_image_job(job, options) for job in jobs]
    if what == "tar":
        _, items, options, captions = payload
        return [_tar_sample_job(item, options, captions) for item in items]
    _, is_jsonl, lines, field, max_units, unit = payload
    out: list[tuple[str, dict | None]] = []
    for raw in lines:
        status, doc = _document(raw, is_jsonl, field)
        if status != "ok":
            out.append((status, None))
            continue
        out.extend(("ok", {"txt": seg.encode("utf-8")}) for seg in split_segments(doc, max_units, unit))
    return out


def _list_chunks(jobs: list, start, options: tuple) -> Iterator[tuple]:
    for i in range(start or 0, len(jobs), IMAGE_CHUNK):
        chunk = jobs[i : i + IMAGE_CHUNK]
        yield i, len(chunk), ("files", chunk, options)


def _tar_chunks(path: str, start, options: tuple, captions: bool) -> Iterator[tuple]:
    """Chunks of ``IMAGE_CHUNK`` samples of a tar shard from ``start`` (``[member offset, sample index]``);
    what the reader reports (damage, members that are no field) is passed on as skip results in place."""
    offset, index = start or (0, 0)
    items: list = []
    here = [offset, index]

    def report(kind: str, url: str, detail: str) -> None:
        items.append(kind)

    try:
        for sample, next_offset, next_index in iter_shard(path, offset, index, report=report):
            items.append(dict(sample.fields))
            if len(items) >= IMAGE_CHUNK:
                yield here, len(items), ("tar", items, options, captions)
                items, here = [], [next_offset, next_index]
    except TAR_ERRORS:
        items.append("tar_read")
    if items:
        yield here, len(items), ("tar", items, options, captions)


def _segment_chunks(segments: list[Callable]) -> Callable:
    """Chunks of several inputs one after the other, positions ``[input index, position in it]``."""

    def chunks(start) -> Iterator[tuple]:
        first, local = start or (0, None)
        for i in range(first, len(segments)):
            for pos, size, payload in segments[i](local if i == first else None):
                yield [i, pos], size, payload

    return chunks


def _file_id(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _write(
    args, kind: str, segments: list, plan: dict, extra: dict, skipped=None, total=None, unit="input", chunks=1
):
    """Write the chunks of ``segments`` with ``--workers`` processes (resumably), print the summary.

    Without ``--workers``: the CPU count, or ``chunks`` (an estimate of the work chunks) when fewer."""
    workers = args.workers or max(1, min(default_workers(), chunks))
    plan = {
        **plan,
        "kind": kind,
        "prefix": args.prefix,
        "max_samples": args.max_samples,
        "max_bytes": args.max_bytes,
        "extra": extra,
    }
    digest = plan_digest(plan)
    progress = Progress(total, unit, args.quiet)
    manifest, run = write_shards_parallel(
        args.out_dir,
        kind,
        _segment_chunks(segments),
        _work,
        digest=digest,
        extra={"created_by": f"beit3-shards {kind}", **extra},
        prefix=args.prefix,
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        workers=workers,
        skipped_before=skipped,
        skips_take_keys=kind != "texts",
        progress=progress,
    )
    if not args.quiet:
        shards = len(manifest["shards"])
        print(
            f"{kind}: {manifest['samples']} samples in {shards} shards under {args.out_dir}; "
            f"skipped {manifest['skipped'] or 0}",
            file=sys.stderr,
        )
        if run["complete"]:
            print(f"{kind}: already complete (same inputs and options): nothing written", file=sys.stderr)
        else:
            secs = max(run["seconds"], 1e-9)
            mb = run["written_bytes"] / 1e6
            kept = run["resumed_shards"]
            resumed = f"; {kept} shards kept from an earlier run" if kept else ""
            print(
                f"{kind}: wrote {run['samples']} samples, {mb:.1f} MB in {secs:.1f} s with {workers} "
                f"workers: {run['samples'] / secs:.1f} samples/s, {mb / secs:.1f} MB/s{resumed}",
                file=sys.stderr,
            )
    return manifest


def _maybe_shuffle(items: list, args) -> list:
    if args.shuffle_seed >= 0:
        random.Random(args.shuffle_seed).shuffle(items)
    return items


def _image_segments(args, jobs: list, tars: list[str], captions: bool) -> tuple[list, dict]:
    """The work segments (the job list, then each tar shard) and the plan that identifies them."""
    options = (args.max_image_pixels, args.shorter_side, args.quality)
    segments = [lambda start: _list_chunks(jobs, start, options)] if jobs else []
    segments += [(lambda start, t=t: _tar_chunks(t, start, options, captions)) for t in tars]
    jobs_digest = hashlib.sha256()
    for job in jobs:  # one job at a time: a list of millions is not turned into one string
        jobs_digest.update(json.dumps(job).encode() + b"\n")
    plan = {
        "options": options,
        "jobs": jobs_digest.hexdigest(),
        "tars": [_file_id(t) for t in tars],
        "captions": captions,
    }
    return segments, plan


def _image_chunks(jobs: list, tars: list[str]) -> int:
    """About how many work chunks: those of the job list, and one per 1 MB of tar shards."""
    return -(-len(jobs) // IMAGE_CHUNK) + sum(os.path.getsize(t) // (1 << 20) + 1 for t in tars)


def cmd_images(args) -> dict:
    """Image folders / lists / tar shards -> image shards."""
    others, tars = split_sources(args.sources)
    paths = _maybe_shuffle(list_images(others), args)
    jobs = [(p, None) for p in paths]
    segments, plan = _image_segments(args, jobs, tars, captions=False)
    total = None if tars else len(jobs)
    extra = {"sources": args.sources}
    return _write(args, "images", segments, plan, extra, total=total, chunks=_image_chunks(jobs, tars))


def cmd_pairs(args) -> dict:
    """Image-text index files, img2dataset output (tar shards or "files" folders) -> pair shards."""
    skipped: Counter = Counter()  # unusable index lines, then the images and captions that fail
    others, tars = split_sources(args.sources)
    jobs: list[tuple] = []
    for src in others:
        if os.path.isdir(src):  # img2dataset "files": NNNNN/KEY.jpg beside KEY.txt / KEY.json
            jobs.extend((p, SIDECAR) for p in list_images([src]))
        else:
            rows = read_pair_index(
                src, args.image_field, args.text_field, args.image_root, skipped, args.quiet
            )
            jobs.extend(rows)
    jobs = _maybe_shuffle(jobs, args)
    segments, plan = _image_segments(args, jobs, tars, captions=True)
    total = None if tars else len(jobs)
    chunks = _image_chunks(jobs, tars)
    return _write(args, "pairs", segments, plan, {"sources": args.sources}, skipped, total, chunks=chunks)


def cmd_texts(args) -> dict:
    """Documents -> text segment shards (streamed in chunks: memory stays bounded; input order is kept)."""
    for src in args.sources:
        if not os.path.isfile(src):
            raise ShardsError(f"text source {src} does not exist")
    sources = list(args.sources)
    options = (args.field, args.max_units, args.unit)

    def segments(start):
        for pos, size, payload in _text_chunks(sources, start):
            yield pos, size, (*payload, *options)

    plan = {"options": options, "sources": [_file_id(s) for s in sources]}
    extra = {"sources": args.sources, "unit": args.unit, "max_units": args.max_units}
    total = None if any(s.endswith(".gz") for s in sources) else sum(os.path.getsize(s) for s in sources)
    chunks = sum(
        os.path.getsize(s) * (4 if s.endswith(".gz") else 1) // TEXT_CHUNK_BYTES + 1 for s in sources
    )
    # One segment of chunks whose positions already name the file: [[file, offset], index].
    return _write(args, "texts", [segments], plan, extra, total=total, unit="B", chunks=chunks)


def cmd_demo(args) -> dict:
    """The embedded demo dataset (pretrain/demo_data.py)."""
    from beit3.pretrain.demo_data import build_demo

    return build_demo(args.out_dir, quiet=args.quiet, max_samples=args.max_samples)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)


def build_parser() -> argparse.ArgumentParser:
    """The ``beit3-shards`` argument parser."""
    p = argparse.ArgumentParser(
        prog="beit3-shards",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("out_dir", help="output directory (shards + manifest.json)")
    common.add_argument(
        "--max-samples", type=int, default=None, help="samples per shard at most (10000; demo: 500)"
    )
    common.add_argument(
        "--max-bytes", type=_size, default=1 << 30, help="bytes per shard at most, e.g. 500M (1G)"
    )
    common.add_argument("--prefix", default="", help="shard file prefix (default: the subcommand name)")
    common.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    work = argparse.ArgumentParser(add_help=False)
    work.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the CPU count); the shards are the same for any number",
    )
    imgs = argparse.ArgumentParser(add_help=False)
    imgs.add_argument(
        "--shorter-side", type=int, default=0, help="downscale so the shorter side is at most N px"
    )
    imgs.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    imgs.add_argument("--max-image-pixels", type=int, default=25_000_000, help="larger inputs are skipped")
    imgs.add_argument("--shuffle-seed", type=int, default=0, help="shuffle the input order (-1 keeps it)")
    s = sub.add_parser("images", parents=[common, work, imgs], help="image folders, list files, tar shards")
    s.add_argument(
        "sources",
        nargs="+",
        help="directories (recursive), files listing image paths, .tar shards or their folders",
    )
    s = sub.add_parser(
        "texts", parents=[common, work], help="text files (.txt one document a line, or .jsonl; also .gz)"
    )
    s.add_argument("sources", nargs="+")
    s.add_argument("--unit", choices=("words", "chars"), default="words", help="segment length unit (words)")
    s.add_argument("--max-units", type=int, default=96, help="segment length in --unit (96)")
    s.add_argument("--field", default="text", help="text field of .jsonl records")
    s = sub.add_parser(
        "pairs", parents=[common, work, imgs], help="index files (.jsonl, .tsv), img2dataset tars or folders"
    )
    s.add_argument("sources", nargs="+")
    s.add_argument("--image-field", default="image", help="image path field / tsv column (image)")
    s.add_argument("--text-field", default="caption", help="caption field / tsv column (caption)")
    s.add_argument(
        "--image-root", default=None, help="base of relative image paths (default: the index's dir)"
    )
    sub.add_parser("demo", parents=[common], help="build the embedded demo dataset")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0, or 2 on bad input."""
    args = build_parser().parse_args(argv)
    if args.max_samples is None:
        args.max_samples = 500 if args.command == "demo" else 10000
    if args.max_samples < 1 or args.max_bytes < 1:
        print("beit3-shards: error: --max-samples and --max-bytes must be positive", file=sys.stderr)
        return 2
    if getattr(args, "workers", None) is not None and args.workers < 1:
        print("beit3-shards: error: --workers must be positive", file=sys.stderr)
        return 2
    commands: dict[str, Callable] = {
        "images": cmd_images,
        "texts": cmd_texts,
        "pairs": cmd_pairs,
        "demo": cmd_demo,
    }
    try:
        commands[args.command](args)
    except ShardsError as e:
        print(f"beit3-shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
