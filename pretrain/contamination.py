"""beit3-contamination: evaluation images and captions that also occur in the pretraining shards.

``check`` compares the images of evaluation indexes (the finetune JSONL format of ``beit3-finetune-index``:
COCO Karpathy test, Flickr30k test, NoCaps, ImageNet val) with the images of pretraining shards by
perceptual hash, and their captions with the shards' texts by word n-gram overlap, and writes what it
finds: ``matches.jsonl`` (one line per pretraining sample and evaluation item), ``drop_keys.tsv`` (the
pretraining samples to leave out) and ``summary.json``. ``filter`` copies shards without those samples.

  beit3-contamination check --eval data/coco/coco_captioning.test.jsonl \\
      --eval data/flickr30k/flickr30k.test.jsonl --images /data/shards/images \\
      --pairs '/data/shards/pairs/*.tar' --out-dir contamination/
  beit3-contamination filter --drop contamination/drop_keys.tsv --output-dir /data/clean/pairs \\
      /data/shards/pairs

Images: each image is decoded, converted to grey and reduced to 32x32 (LANCZOS); its 64-bit DCT hash (pHash,
``imagehash.phash``) finds candidates within ``--max-distance`` bits and its 64-bit gradient hash
(``imagehash.dhash``) confirms them within ``--max-dhash-distance``. Evaluation images are hashed as they are
and mirrored (flipped copies), and with ``--crops`` also as four corner crops and a centre crop (slightly
cropped copies). Only the evaluation hashes are held in memory; the shards are streamed, one job per shard, in
``--workers`` processes. The search is exact (no match within the thresholds is missed): multi-index hashing
over four 16-bit bands of the pHash for large evaluation sets, else numpy XOR and popcount against every
evaluation hash.

Texts: lower-cased, NFKC-normalised words (letters and digits; everything else separates words). An
evaluation caption is contaminated by a pretraining text that contains one of its word ``--ngram``-grams
(default 8; 13 is the LM-contamination literature's choice for long documents); a caption shorter than that
counts as one gram of its own length if it has at least ``--min-words`` words (shorter ones are not checked).
``overlap`` is the share of the caption's grams found in the text; ``--min-overlap`` raises the bar.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool

import imagehash
import numpy as np
from PIL import Image, ImageOps

from beit3.pretrain.data.config import DataConfigError, expand_shards
from beit3.pretrain.data.decode import IMAGE_FIELDS, SkipSample, decode_text, text_field
from beit3.pretrain.data.tario import TAR_ERRORS, iter_shard, write_manifest
from beit3.pretrain.errors import PretrainError
from beit3.tokenizers.images import to_rgb

HASH_SIDE = 32  # pHash's 32x32 grey picture (hash_size 8 x highfreq_factor 4)
CROP_KEEP = 0.92  # --crops: the kept side fraction of the corner and centre crops
STREAMS = ("image", "pair", "text")
REPORT_PER_SAMPLE = 5  # text matches written per pretraining sample (the best by overlap); the rest counted


class ContaminationError(PretrainError, ValueError):
    """A missing or malformed evaluation index, image or shard list; the message names the file and fix."""


# ---------------------------------------------------------------- images


def _gray(data: bytes) -> Image.Image:
    """Image bytes -> an upright grey picture (JPEGs decoded at reduced scale, at least 64 px a side)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("L", (2 * HASH_SIDE, 2 * HASH_SIDE))  # DCT scaling: pHash needs 32 px only
        img.load()
        img = ImageOps.exif_transpose(img)
    if min(img.size) < 1:
        raise ValueError(f"empty image {img.size}")
    return to_rgb(img).convert("L") if img.mode != "L" else img


def _bits(h) -> int:
    return int.from_bytes(np.packbits(h.hash.ravel()).tobytes(), "big")


def _hash_pair(small: Image.Image) -> tuple[int, int]:
    return _bits(imagehash.phash(small)), _bits(imagehash.dhash(small))


def _small(img: Image.Image) -> Image.Image:
    return img.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)


def image_hashes(data: bytes) -> tuple[int, int]:
    """(pHash, dHash) of image bytes, as 64-bit integers (the pretraining side: one view)."""
    return _hash_pair(_small(_gray(data)))


def _crops(img: Image.Image) -> list[Image.Image]:
    w, h = img.size
    cw, ch = max(1, round(w * CROP_KEEP)), max(1, round(h * CROP_KEEP))
    out = []
    for ax, ay in ((0, 0), (1, 0), (0, 1), (1, 1), (0.5, 0.5)):
        x, y = round((w - cw) * ax), round((h - ch) * ay)
        out.append(img.crop((x, y, x + cw, y + ch)))
    return out


VIEWS = (
    "original",
    "crop_top_left",
    "crop_top_right",
    "crop_bottom_left",
    "crop_bottom_right",
    "crop_centre",
)


def eval_image_hashes(data: bytes, crops: bool) -> list[tuple[int, int, int, bool]]:
    """(view, pHash, dHash, flipped) of every view of an evaluation image: it and its mirror, and with
    ``crops`` the same for its four corner crops and its centre crop (``CROP_KEEP`` of each side)."""
    img = _gray(data)
    views = [img, *_crops(img)] if crops else [img]
    out = []
    for v, view in enumerate(views):
        small = _small(view)
        out.append((v, *_hash_pair(small), False))
        out.append((v, *_hash_pair(small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), True))
    return out


def popcount_distances(queries: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Hamming distances (uint8) between every 64-bit query and every table entry, shape (Q, T)."""
    return np.bitwise_count(queries[:, None] ^ table[None, :])


BANDS = 4  # multi-index hashing: the 64 bits as four 16-bit bands
_BAND_VALUES = np.arange(1 << 16, dtype=np.uint16)


def _band(x: np.ndarray, b: int) -> np.ndarray:
    return ((x >> np.uint64(16 * b)) & np.uint64(0xFFFF)).astype(np.uint16)


class ImageIndex:
    """The evaluation images' hashes (every view), matched by exact bounded Hamming search.

    Two exact searches, chosen by cost. Multi-index hashing: two 64-bit hashes within ``d`` bits agree to
    within ``d // 4`` bits on at least one of the four 16-bit bands (pigeonhole), so the candidates of a query
    are the table entries whose band value lies within ``d // 4`` bits of the query's, for some band (found
    in per-band sorted copies of the table by binary search), and only those are compared on all 64 bits.
    Brute force (small tables, loose thresholds): XOR and popcount against the whole table, in slices of at
    most ``block_cells`` distances. pHash candidates are then confirmed by dHash. Memory: about 40 bytes a
    view plus one block.
    """

    def __init__(
        self, items: list[dict], views: list[tuple[int, int, int, int, bool]], block_cells: int = 1 << 22
    ) -> None:
        self.items = items  # per evaluation image: eval, image_path, image_id
        arr = np.array([(p, d) for _, _, p, d, _ in views], dtype=np.uint64).reshape(-1, 2)
        self.phash, self.dhash = np.ascontiguousarray(arr[:, 0]), np.ascontiguousarray(arr[:, 1])
        self.item = np.array([i for i, *_ in views], dtype=np.int64)
        self.view = np.array([v for _, v, *_ in views], dtype=np.int8)
        self.flipped = np.array([f for *_, f in views], dtype=bool)
        self.block_cells = block_cells
        self._bands: list[tuple[np.ndarray, np.ndarray]] | None = None  # (order, starts)

    def __len__(self) -> int:
        return len(self.phash)

    def use_bands(self, max_p: int) -> bool:
        """Whether the band search is the cheaper: a query probes ``P`` buckets of the ``2**16`` per band and
        compares about ``P * T / 2**16`` candidates, each some 48 times the cost of one brute-force distance
        (measured), against ``T`` distances by brute force; below 8192 views brute force always wins."""
        probes = BANDS * int((np.bitwise_count(_BAND_VALUES) <= max_p // BANDS).sum())
        return probes * 48 < (1 << 16) and len(self.phash) >= 8192

    def _band_candidates(self, qp: np.ndarray, max_p: int) -> tuple[np.ndarray, np.ndarray]:
        if self._bands is None:
            self._bands = []
            for b in range(BANDS):
                values = _band(self.phash, b)
                order = np.argsort(values, kind="stable")
                # starts[v]: where band value v begins in the sorted order (a bucket table, 65537 entries)
                starts = np.searchsorted(values[order], np.arange((1 << 16) + 1), "left")
                self._bands.append((order, starts))
        masks = _BAND_VALUES[np.bitwise_count(_BAND_VALUES) <= max_p // BANDS]
        size = np.int64(len(self.phash))
        found = []
        for b, (order, starts) in enumerate(self._bands):
            keys = (_band(qp, b)[:, None] ^ masks[None, :]).ravel().astype(np.int64)
            lo = starts[keys]
            count = starts[keys + 1] - lo
            total = int(count.sum())
            if not total:
                continue
            first = np.repeat(lo - (np.cumsum(count) - count), count) + np.arange(total)
            query = np.repeat(np.arange(len(keys)) // len(masks), count)
            found.append(query * size + order[first])
        if not found:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        pairs = np.concatenate(found)
        qi, ti = pairs // size, pairs % size
        pairs = np.sort(pairs[np.bitwise_count(qp[qi] ^ self.phash[ti]) <= max_p])  # few; some twice
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs
        return pairs // size, pairs % size

    def _candidates(self, qp: np.ndarray, max_p: int, bands: bool) -> tuple[np.ndarray, np.ndarray]:
        if bands:
            return self._band_candidates(qp, max_p)
        rows = max(1, self.block_cells // len(self.phash))
        qis, tis = [], []
        for q0 in range(0, len(qp), rows):
            qi, ti = np.nonzero(popcount_distances(qp[q0 : q0 + rows], self.phash) <= max_p)
            qis.append(qi + q0)
            tis.append(ti)
        return np.concatenate(qis), np.concatenate(tis)

    def match(
        self, phashes: np.ndarray, dhashes: np.ndarray, max_p: int, max_d: int, bands: bool | None = None
    ) -> list[list[dict]]:
        """Per query: the evaluation images within the thresholds, the closest view of each.

        ``bands``: force the band search (True) or brute force (False); None chooses by cost."""
        out: list[list[dict]] = [[] for _ in range(len(phashes))]
        if not len(self.phash) or not len(phashes):
            return out
        qi, ti = self._candidates(phashes, max_p, self.use_bands(max_p) if bands is None else bands)
        pd = np.bitwise_count(phashes[qi] ^ self.phash[ti])
        dd = np.bitwise_count(dhashes[qi] ^ self.dhash[ti])
        best: dict[tuple[int, int], tuple] = {}
        for q, t, p, d in zip(qi.tolist(), ti.tolist(), pd.tolist(), dd.tolist(), strict=True):
            if d > max_d:
                continue
            k = (q, int(self.item[t]))
            if k not in best or (p + d, t) < best[k][:2]:
                best[k] = (p + d, t, p, d)
        for (q, it), (_, t, p, d) in sorted(best.items()):
            out[q].append(
                {**self.items[it], "distance": p, "dhash_distance": d, "flipped": bool(self.flipped[t]),
                 "view": VIEWS[self.view[t]]}
            )  # fmt: skip
        return out


# ---------------------------------------------------------------- texts

_NON_WORD = re.compile(r"[\W_]+")


def normalize_words(text: str) -> list[str]:
    """NFKC, case-folded words of letters and digits: ``"A Dog's ball!"`` -> ``["a", "dog", "s", "ball"]``."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()


class TextIndex:
    """The evaluation captions' word n-grams: ``match(text)`` -> {caption number: grams found}."""

    def __init__(self, items: list[dict], n: int, min_words: int) -> None:
        self.items, self.n = items, n
        self.vocab: dict[str, int] = {}
        self.grams: dict[tuple[int, ...], list[int]] = {}
        self.total: list[int] = []  # distinct grams per caption (0: too short, not checked)
        for c, item in enumerate(items):
            ids = [self.vocab.setdefault(w, len(self.vocab)) for w in normalize_words(item["text"])]
            size = min(n, len(ids))
            grams = (
                {tuple(ids[i : i + size]) for i in range(len(ids) - size + 1)} if size >= min_words else set()
            )
            self.total.append(len(grams))
            for g in grams:
                self.grams.setdefault(g, []).append(c)
        self.lengths = sorted({len(g) for g in self.grams})

    def match(self, text: str) -> dict[int, int]:
        if not self.grams:
            return {}
        ids = [self.vocab.get(w, -1) for w in normalize_words(text)]
        found: dict[int, set] = {}
        run: list[int] = []
        for i in [*ids, -1]:  # runs of words that occur in some caption; a gram lies inside one run
            if i >= 0:
                run.append(i)
                continue
            for size in self.lengths:
                for s in range(len(run) - size + 1):
                    g = tuple(run[s : s + size])
                    for c in self.grams.get(g, ()):
                        found.setdefault(c, set()).add(g)
            run = []
        return {c: len(g) for c, g in found.items()}


# ---------------------------------------------------------------- evaluation indexes


def _rows(path: str) -> Iterator[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 (closed below; the generator keeps it open)
    except OSError as e:
        raise ContaminationError(f"evaluation index {path}: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise ContaminationError(
                        f"{path}:{lineno}: not JSON ({e}): is this a JSONL index?"
                    ) from None
                if not isinstance(row, dict):
                    raise ContaminationError(f"{path}:{lineno}: a JSON {type(row).__name__}, not an object")
                yield lineno, row
        except UnicodeDecodeError as e:
            raise ContaminationError(f"{path}: not UTF-8 ({e})") from None


def _texts(row: dict, tokenizer) -> list[str]:
    for name in ("text", "caption"):
        v = row.get(name)
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(t, str) for t in v):
            return v
    seg = row.get("text_segment")
    if tokenizer is not None and isinstance(seg, list) and seg:
        return [tokenizer.decode(seg)]
    return []


@dataclass
class EvalSet:
    images: list[dict] = field(default_factory=list)  # eval, image_path, image_id, path (absolute)
    captions: list[dict] = field(default_factory=list)  # eval, image_path, image_id, text
    segment_only: int = 0  # rows with text_segment ids but no text (decoded only with --tokenizer)
    per_eval: dict[str, dict] = field(default_factory=dict)


def read_eval_indexes(specs: list[list[str]], tokenizer=None, need_images: bool = True) -> EvalSet:
    """``[[INDEX, ROOT?], ...]`` -> the distinct images (image_path, image2_path) and the captions; with
    ``need_images`` every image file must exist."""
    out = EvalSet()
    for spec in specs:
        if not 1 <= len(spec) <= 2:
            raise ContaminationError(f"--eval takes INDEX [ROOT], got {len(spec)} values: {spec}")
        path = spec[0]
        root = spec[1] if len(spec) == 2 else os.path.dirname(os.path.abspath(path))
        if need_images and not os.path.isdir(root):
            raise ContaminationError(f"--eval {path}: image root {root} is not a directory")
        name = os.path.basename(path)
        if name in out.per_eval:
            raise ContaminationError(f"--eval {path}: an index named {name} is given twice")
        seen: set[str] = set()
        stats = {"rows": 0, "images": 0, "captions": 0}
        for lineno, row in _rows(path):
            stats["rows"] += 1
            paths = [row[k] for k in ("image_path", "image2_path") if k in row]
            if not paths or not all(isinstance(p, str) and p for p in paths):
                raise ContaminationError(
                    f"{path}:{lineno}: no image_path string: not a finetune index "
                    "(beit3-finetune-index writes them)"
                )
            image_id = row.get("image_id", row.get("identifier"))
            for p in paths:
                if p not in seen:
                    seen.add(p)
                    full = os.path.join(root, p)
                    out.images.append({"eval": name, "image_path": p, "image_id": image_id, "path": full})
                    stats["images"] += 1
            texts = _texts(row, tokenizer)
            if not texts and "text_segment" in row:
                out.segment_only += 1
            for t in texts:
                out.captions.append({"eval": name, "image_path": paths[0], "image_id": image_id, "text": t})
                stats["captions"] += 1
        if not stats["rows"]:
            raise ContaminationError(f"evaluation index {path} holds no rows")
        out.per_eval[name] = stats
    missing = [im["path"] for im in out.images if need_images and not os.path.isfile(im["path"])]
    if missing:
        raise ContaminationError(
            f"{len(missing)} of {len(out.images)} evaluation images are missing, e.g. {missing[0]}: give "
            "each index its image root (--eval INDEX ROOT; image paths are relative to it)"
        )
    return out


# ---------------------------------------------------------------- the pretraining side (worker processes)

_STATE: dict = {}


def _init_worker(state: dict) -> None:
    _STATE.clear()
    _STATE.update(state)


def _eval_hash_job(args: tuple[int, str, bool]) -> tuple[int, list | None, str]:
    i, path, crops = args
    try:
        with open(path, "rb") as f:
            return i, eval_image_hashes(f.read(), crops), ""
    except Exception as e:  # PIL raises many types on bad files
        return i, None, f"{type(e).__name__}: {e}"


def _image_bytes(fields: dict[str, bytes]) -> bytes | None:
    for name in IMAGE_FIELDS:
        if name in fields:
            return fields[name]
    return None


def _scan_shard(job: tuple[str, str]) -> dict:
    """One shard: hash its images and n-gram its texts; the matches and counts."""
    stream, shard = job
    images: ImageIndex | None = _STATE.get("images")
    texts: TextIndex | None = _STATE.get("texts")
    opts = _STATE["opts"]
    counts: Counter = Counter()
    matches: list[dict] = []
    pending: list[tuple[str, int, int]] = []

    def flush() -> None:
        if not pending:
            return
        p = np.array([x[1] for x in pending], dtype=np.uint64)
        d = np.array([x[2] for x in pending], dtype=np.uint64)
        for (key, _, _), found in zip(
            pending, images.match(p, d, opts["max_distance"], opts["max_dhash"]), strict=True
        ):
            for m in found:
                matches.append({"kind": "image", "stream": stream, "shard": shard, "key": key, **m})
        pending.clear()

    def report(kind: str, url: str, detail: str) -> None:
        counts[f"skipped/{kind}"] += 1

    try:
        for sample, _, _ in iter_shard(shard, report=report):
            if sample is None:
                continue
            counts["samples"] += 1
            if stream in ("image", "pair") and images is not None:
                data = _image_bytes(sample.fields)
                if data is None:
                    counts["skipped/missing_image"] += 1
                else:
                    try:
                        pending.append((sample.key, *image_hashes(data)))
                        counts["images"] += 1
                    except Exception:  # undecodable: counted, as the loader would skip it
                        counts["skipped/image_decode"] += 1
                    if len(pending) >= 512:
                        flush()
            if stream in ("text", "pair") and texts is not None:
                try:
                    text = decode_text(text_field(sample.fields))
                except SkipSample as e:
                    counts[f"skipped/{e.kind}"] += 1
                    continue
                counts["texts"] += 1
                found = texts.match(text)
                ranked = sorted(
                    ((g / texts.total[c], g, c) for c, g in found.items()), key=lambda x: (-x[0], x[2])
                )
                ranked = [r for r in ranked if r[0] >= opts["min_overlap"]]
                for overlap, g, c in ranked[:REPORT_PER_SAMPLE]:
                    item = texts.items[c]
                    matches.append(
                        {"kind": "text", "stream": stream, "shard": shard, "key": sample.key,
                         "eval": item["eval"], "image_path": item["image_path"], "image_id": item["image_id"],
                         "eval_text": item["text"], "ngrams": g, "overlap": round(overlap, 4),
                         "more": max(0, len(ranked) - REPORT_PER_SAMPLE)}
                    )  # fmt: skip
    except TAR_ERRORS as e:
        counts["skipped/shard_unreadable"] += 1
        counts[f"error:{type(e).__name__}: {e}"] += 1
    flush()
    return {"stream": stream, "shard": shard, "counts": dict(counts), "matches": matches}


# ---------------------------------------------------------------- check


def _shards(specs: list[str], stream: str) -> list[str]:
    try:
        return expand_shards(specs, f"--{stream}s")
    except DataConfigError as e:
        raise ContaminationError(str(e)) from None


def _pool(workers: int, state: dict):
    if workers <= 1:
        _init_worker(state)
        return None
    return Pool(workers, initializer=_init_worker, initargs=(state,))


def _imap(pool, fn, jobs):
    return map(fn, jobs) if pool is None else pool.imap(fn, jobs, chunksize=1)  # in order: same report


def _bar(total: int, unit: str, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=quiet, dynamic_ncols=True, file=sys.stderr)


def run_check(args) -> dict:
    """The ``check`` command; returns the summary (also written to ``OUT/summary.json``)."""
    start = time.time()
    jobs = [(s, shard) for s in STREAMS for shard in _shards(getattr(args, f"{s}s") or [], s)]
    if not jobs:
        raise ContaminationError("no pretraining shards: give --images, --pairs and/or --texts")
    tokenizer = None
    if args.tokenizer:
        from beit3.tokenizers.errors import TokenizersError
        from beit3.tokenizers.text import TextTokenizer

        try:
            tokenizer = TextTokenizer(args.tokenizer)
        except TokenizersError as e:
            raise ContaminationError(f"--tokenizer: {e}") from None
    check_images = not args.no_images and any(s in ("image", "pair") for s, _ in jobs)
    check_texts = not args.no_texts and any(s in ("text", "pair") for s, _ in jobs)
    if not check_images and not check_texts:
        raise ContaminationError("nothing to check: image/pair shards for images, text/pair shards for texts")
    ev = read_eval_indexes(args.eval, tokenizer, need_images=check_images)
    import scipy.fftpack  # noqa: F401  (imagehash.phash's, imported once here: forked workers inherit it)

    os.makedirs(args.out_dir, exist_ok=True)

    images = None
    eval_skipped: list[str] = []
    if check_images:
        views: list[tuple] = []
        pool = _pool(args.workers, {})
        try:
            bar = _bar(len(ev.images), "img", args.quiet, "evaluation images")
            jobs_e = [(i, im["path"], args.crops) for i, im in enumerate(ev.images)]
            for i, hashes, err in _imap(pool, _eval_hash_job, jobs_e):
                bar.update(1)
                if hashes is None:
                    eval_skipped.append(f"{ev.images[i]['path']}: {err}")
                    continue
                views.extend((i, *h) for h in hashes)
            bar.close()
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        if eval_skipped and not args.skip_bad_eval_images:
            raise ContaminationError(
                f"{len(eval_skipped)} evaluation images cannot be decoded, e.g. {eval_skipped[0]} "
                "(--skip-bad-eval-images to check the others)"
            )
        views.sort()
        items = [{k: im[k] for k in ("eval", "image_path", "image_id")} for im in ev.images]
        images = ImageIndex(items, views)
    texts = TextIndex(ev.captions, args.ngram, args.min_words) if check_texts else None

    state = {
        "images": images,
        "texts": texts,
        "opts": {
            "max_distance": args.max_distance,
            "max_dhash": args.max_dhash_distance,
            "min_overlap": args.min_overlap,
        },
    }
    counts: dict[str, Counter] = {s: Counter() for s in STREAMS}
    dropped: dict[tuple[str, str], set] = {}
    eval_hit: dict[str, set] = {"image": set(), "text": set()}
    errors: list[str] = []
    pool = _pool(args.workers, state)
    bar = _bar(len(jobs), "shard", args.quiet, "pretraining shards")
    n_matches = Counter()
    try:
        with open(os.path.join(args.out_dir, "matches.jsonl.tmp"), "w", encoding="utf-8") as out:
            for res in _imap(pool, _scan_shard, jobs):
                c = counts[res["stream"]]
                for k, v in res["counts"].items():
                    if k.startswith("error:"):
                        errors.append(f"{res['shard']}: {k[6:]}")
                    else:
                        c[k] += v
                c["shards"] += 1
                for m in res["matches"]:
                    out.write(json.dumps(m, ensure_ascii=False) + "\n")
                    n_matches[m["kind"]] += 1
                    dropped.setdefault((m["shard"], m["key"]), set()).add(m["kind"])
                    eval_hit[m["kind"]].add((m["eval"], m["image_path"], m.get("eval_text")))
                bar.update(1)
                bar.set_postfix(
                    images=sum(x["images"] for x in counts.values()), matches=sum(n_matches.values())
                )
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    os.replace(os.path.join(args.out_dir, "matches.jsonl.tmp"), os.path.join(args.out_dir, "matches.jsonl"))
    keys_tmp = os.path.join(args.out_dir, "drop_keys.tsv.tmp")
    with open(keys_tmp, "w", encoding="utf-8") as f:
        for (shard, key), kinds in sorted(dropped.items()):
            f.write(f"{shard}\t{key}\t{','.join(sorted(kinds))}\n")
    os.replace(keys_tmp, os.path.join(args.out_dir, "drop_keys.tsv"))

    per_eval = {}
    for name, stats in ev.per_eval.items():
        per_eval[name] = {
            **stats,
            "images_found": len({p for e, p, _ in eval_hit["image"] if e == name}),
            "captions_found": len({(p, t) for e, p, t in eval_hit["text"] if e == name}),
        }
    seconds = time.time() - start
    summary = {
        "created_by": "beit3-contamination check",
        "eval": per_eval,
        "eval_images_hashed": len(ev.images) - len(eval_skipped),
        "eval_images_skipped": eval_skipped[:20],
        "eval_rows_without_text": ev.segment_only,
        "checked": {"images": check_images, "texts": check_texts},
        "thresholds": {"max_distance": args.max_distance, "max_dhash_distance": args.max_dhash_distance,
                       "crops": args.crops, "ngram": args.ngram, "min_words": args.min_words,
                       "min_overlap": args.min_overlap},
        "pretraining": {s: dict(sorted(c.items())) for s, c in counts.items() if c},
        "matches": dict(n_matches),
        "samples_to_drop": len(dropped),
        "shard_errors": errors[:20],
        "seconds": round(seconds, 1),
    }  # fmt: skip
    with open(os.path.join(args.out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    if not args.quiet:
        scanned = sum(c["samples"] for c in counts.values())
        print(
            f"beit3-contamination: {scanned} pretraining samples in {len(jobs)} shards against "
            f"{len(ev.images)} evaluation images and {len(ev.captions)} captions: {n_matches['image']} image "
            f"and {n_matches['text']} text matches, {len(dropped)} samples to drop "
            f"({args.out_dir}/drop_keys.tsv); {seconds:.1f} s",
            file=sys.stderr,
        )
        if ev.segment_only and check_texts:
            print(f"beit3-contamination: {ev.segment_only} index rows hold only text_segment ids: give "
                  "--tokenizer to check their captions", file=sys.stderr)  # fmt: skip
    return summary


# ---------------------------------------------------------------- filter


def read_drop_keys(path: str, kinds: set[str] | None = None) -> dict[str, set[str]]:
    """``drop_keys.tsv`` -> {real shard path: keys}; with ``kinds``, only keys matched by one of them."""
    out: dict[str, set[str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.rstrip("\n").split("\t")
                if not line.strip():
                    continue
                if len(parts) < 2:
                    raise ContaminationError(f"{path}:{lineno}: expected SHARD<TAB>KEY[<TAB>KINDS]")
                if kinds and len(parts) > 2 and not kinds & set(parts[2].split(",")):
                    continue
                out.setdefault(os.path.realpath(parts[0]), set()).add(parts[1])
    except OSError as e:
        raise ContaminationError(f"--drop {path}: {e.strerror or e}") from None
    return out


def _copy_shard(src: str, dst: str, drop: set[str]) -> tuple[int, int]:
    kept = dropped = 0
    tmp = dst + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample, _, _ in iter_shard(src):
            if sample.key in drop:
                dropped += 1
                continue
            kept += 1
            for ext, data in sample.fields.items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, dst)
    return kept, dropped


def run_filter(args) -> dict:
    """The ``filter`` command: copies of the shards without the dropped samples, and a manifest."""
    kinds = set(args.only.split(",")) if args.only else None
    drop = read_drop_keys(args.drop, kinds)
    shards = _shards(args.shards, "shard")
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ContaminationError(f"two input shards are named {dup}: filter one directory at a time")
    out_dir = os.path.abspath(args.output_dir)
    if any(os.path.dirname(s) == out_dir for s in shards):
        raise ContaminationError("--output-dir must differ from the shards' directory")
    os.makedirs(out_dir, exist_ok=True)
    kind = "unknown"
    manifest = os.path.join(os.path.dirname(shards[0]), "manifest.json")
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                kind = json.load(f).get("kind", kind)
        except (OSError, ValueError):
            pass
    records, total_dropped = [], 0
    for src, name in zip(shards, names, strict=True):
        dst = os.path.join(out_dir, name)
        kept, dropped = _copy_shard(src, dst, drop.get(os.path.realpath(src), set()))
        total_dropped += dropped
        records.append({"name": name, "samples": kept, "bytes": os.path.getsize(dst)})
    extra = {"created_by": "beit3-contamination filter", "dropped": total_dropped, "drop_keys": args.drop}
    write_manifest(out_dir, kind, records, {}, extra)
    listed = sum(len(v) for v in drop.values())
    if not args.quiet:
        kept = sum(r["samples"] for r in records)
        print(
            f"beit3-contamination: {total_dropped} samples dropped ({listed} listed), {kept} kept in "
            f"{len(records)} shards under {out_dir}",
            file=sys.stderr,
        )
    return {"dropped": total_dropped, "listed": listed, "shards": len(records)}


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beit3-contamination",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="find evaluation images and captions in pretraining shards")
    c.add_argument("--eval", nargs="+", action="append", required=True, metavar=("INDEX", "ROOT"),
                   help="a finetune JSONL index and its image root (default: the index's folder); "
                   "repeat for more")  # fmt: skip
    for s in STREAMS:
        c.add_argument(f"--{s}s", nargs="+", action="extend", default=[], metavar="SHARDS",
                       help=f"{s} shards: directories, globs, brace ranges")  # fmt: skip
    c.add_argument("--out-dir", required=True, help="matches.jsonl, drop_keys.tsv, summary.json go here")
    c.add_argument("--max-distance", type=int, default=8, help="pHash bits that may differ (8 of 64)")
    c.add_argument("--max-dhash-distance", type=int, default=16, help="dHash bits that may differ (16 of 64)")
    c.add_argument("--crops", action="store_true", help="also hash corner and centre crops of eval images")
    c.add_argument("--ngram", type=int, default=8, help="words per n-gram (8)")
    c.add_argument("--min-words", type=int, default=5, help="shorter captions are not checked (5)")
    c.add_argument("--min-overlap", type=float, default=0.0, help="share of a caption's grams needed (any)")
    c.add_argument("--tokenizer", help="SentencePiece model to decode rows that hold only text_segment ids")
    c.add_argument("--no-images", action="store_true", help="captions only")
    c.add_argument("--no-texts", action="store_true", help="images only")
    c.add_argument("--skip-bad-eval-images", action="store_true", help="undecodable eval images: warn, go on")
    c.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPU count)")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    f = sub.add_parser("filter", help="copy shards without the samples of a drop_keys.tsv")
    f.add_argument("shards", nargs="+", help="shards: directories, globs, brace ranges")
    f.add_argument("--drop", required=True, help="drop_keys.tsv written by check")
    f.add_argument("--output-dir", required=True, help="the filtered shards (same names) and manifest.json")
    f.add_argument("--only", help="drop only samples matched by these kinds: image, text or image,text")
    f.add_argument("--quiet", action="store_true")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point; 0, or 2 with one ``beit3-contamination: error:`` line on bad input."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        if args.command == "check":
            if args.max_distance < 0 or args.max_dhash_distance < 0 or args.ngram < 1 or args.min_words < 1:
                raise ContaminationError(
                    "need --max-distance, --max-dhash-distance >= 0, --ngram, --min-words >= 1"
                )
            if args.workers < 1:
                raise ContaminationError("--workers must be at least 1")
            run_check(args)
        else:
            run_filter(args)
    except ContaminationError as e:
        print(f"beit3-contamination: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
