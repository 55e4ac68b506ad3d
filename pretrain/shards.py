"""``beit3-shards``: write webdataset tar shards for pretraining, each directory with a ``manifest.json``.

Subcommands::

    beit3-shards images OUT_DIR SRC...   # image folders (recursive) or list files -> {key}.jpg
    beit3-shards texts  OUT_DIR SRC...   # .txt (one document a line) or .jsonl -> {key}.txt segments
    beit3-shards pairs  OUT_DIR SRC...   # .jsonl / .tsv index of (local image path, caption) -> .jpg + .txt
    beit3-shards demo   OUT_DIR          # a small real dataset from pip-installed packages (docs/data.md)

Every image is decoded and converted to RGB before it is written (JPEGs already RGB or grey and not resized
are kept byte for byte; everything else is re-encoded as JPEG); inputs that fail are skipped and counted per
kind in the manifest. A new shard starts after ``--max-samples`` samples or ``--max-bytes`` bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool

from beit3.pretrain.data.decode import IMAGE_FIELDS
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.shard_writer import image_result, split_segments, text_results, write_shard_dir

IMAGE_EXTENSIONS = tuple(f".{ext}" for ext in IMAGE_FIELDS)  # the loader's list: what is written can be read


class ShardsError(PretrainError, ValueError):
    """Bad command-line input (missing sources, unknown columns); the message names the fix."""


# ---- images ----------------------------------------------------------------------------------------------
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


def _image_job(args: tuple) -> tuple[str, dict | None]:
    """Pool worker: (path, caption or None, options) -> ("ok", fields) or (skip kind, None)."""
    path, caption, max_pixels, shorter_side, quality = args
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "missing_file", None
    return image_result(data, caption, max_pixels, shorter_side, quality)


# ---- texts -----------------------------------------------------------------------------------------------
def iter_documents(sources: Iterable[str], field: str, skipped: Counter) -> Iterator[str]:
    """Documents from .txt (one a line) and .jsonl (``field``) files; bad lines are counted in ``skipped``."""
    for src in sources:
        if not os.path.isfile(src):
            raise ShardsError(f"text source {src} does not exist")
        is_jsonl = src.endswith((".jsonl", ".json"))
        with open(src, "rb") as f:
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    skipped["text_decode"] += 1
                    continue
                if is_jsonl and line.strip():
                    try:
                        record = json.loads(line)
                    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
                        skipped["bad_line"] += 1
                        continue
                    try:
                        line = record[field]
                    except (KeyError, TypeError, IndexError):
                        skipped["missing_field"] += 1
                        continue
                    if not isinstance(line, str):
                        skipped["missing_field"] += 1
                        continue
                if not line.strip():
                    skipped["text_empty"] += 1
                    continue
                yield line


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
def _progress(total: int | None, unit: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True)


def _write_jobs(args, kind: str, jobs: list[tuple], extra: dict, skipped: Counter | None = None) -> dict:
    """Run image jobs (in a pool when --workers > 1), write shards in input order, then the manifest.

    ``skipped`` holds counts from before the jobs (e.g. unusable index lines); the jobs' skips are added."""
    bar = _progress(len(jobs), "sample", args.quiet)
    pool = Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(_image_job, jobs, chunksize=8) if pool else map(_image_job, jobs)
    return _finish(args, kind, _counted(results, bar), extra, skipped, bar, pool)


def _counted(items: Iterable, bar) -> Iterator:
    for item in items:
        bar.update(1)
        yield item


def _finish(
    args, kind: str, results: Iterable, extra: dict, skipped: Counter | None, bar, pool: Pool | None = None
) -> dict:
    """Write ``results`` under ``args.out_dir`` (shards, manifest), close ``pool`` and ``bar``, then print
    the summary."""
    skipped = Counter() if skipped is None else skipped
    extra = {"created_by": f"beit3-shards {kind}", **extra}
    try:
        manifest = write_shard_dir(
            args.out_dir, kind, results, extra, args.prefix, args.max_samples, args.max_bytes, skipped
        )
    finally:
        if pool:
            pool.terminate()
        bar.close()
    if not args.quiet:
        shards = len(manifest["shards"])
        print(
            f"{kind}: {manifest['samples']} samples in {shards} shards under {args.out_dir}; "
            f"skipped {dict(skipped) or 0}",
            file=sys.stderr,
        )
    return manifest


def _maybe_shuffle(items: list, args) -> list:
    if args.shuffle_seed >= 0:
        random.Random(args.shuffle_seed).shuffle(items)
    return items


def cmd_images(args) -> dict:
    """Image folders / lists -> image shards."""
    paths = _maybe_shuffle(list_images(args.sources), args)
    jobs = [(p, None, args.max_image_pixels, args.shorter_side, args.quality) for p in paths]
    return _write_jobs(args, "images", jobs, {"sources": args.sources})


def cmd_pairs(args) -> dict:
    """Image-text index files -> pair shards."""
    skipped: Counter = Counter()  # unusable index lines, then the images and captions that fail
    rows = [
        r
        for src in args.sources
        for r in read_pair_index(src, args.image_field, args.text_field, args.image_root, skipped, args.quiet)
    ]
    rows = _maybe_shuffle(rows, args)
    jobs = [(p, c, args.max_image_pixels, args.shorter_side, args.quality) for p, c in rows]
    return _write_jobs(args, "pairs", jobs, {"sources": args.sources}, skipped)


def cmd_texts(args) -> dict:
    """Documents -> text segment shards (streamed: input order is kept)."""
    skipped: Counter = Counter()
    bar = _progress(None, "doc", args.quiet)
    docs = _counted(iter_documents(args.sources, args.field, skipped), bar)
    segments = (seg for doc in docs for seg in split_segments(doc, args.max_units, args.unit))
    extra = {"sources": args.sources, "unit": args.unit, "max_units": args.max_units}
    return _finish(args, "texts", text_results(segments), extra, skipped, bar)


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
    imgs = argparse.ArgumentParser(add_help=False)
    imgs.add_argument("--workers", type=int, default=1, help="processes decoding and re-encoding images")
    imgs.add_argument(
        "--shorter-side", type=int, default=0, help="downscale so the shorter side is at most N px"
    )
    imgs.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    imgs.add_argument("--max-image-pixels", type=int, default=25_000_000, help="larger inputs are skipped")
    imgs.add_argument("--shuffle-seed", type=int, default=0, help="shuffle the input order (-1 keeps it)")
    s = sub.add_parser("images", parents=[common, imgs], help="image folders or list files")
    s.add_argument("sources", nargs="+", help="directories (recursive) or files listing image paths")
    s = sub.add_parser("texts", parents=[common], help="text files (.txt one document a line, or .jsonl)")
    s.add_argument("sources", nargs="+")
    s.add_argument("--unit", choices=("words", "chars"), default="words", help="segment length unit (words)")
    s.add_argument("--max-units", type=int, default=96, help="segment length in --unit (96)")
    s.add_argument("--field", default="text", help="text field of .jsonl records")
    s = sub.add_parser("pairs", parents=[common, imgs], help="image-text index files (.jsonl or .tsv)")
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
