"""Index files in the released JSONL format, built from the public raw formats of each finetuning dataset.

Each builder reads one dataset's published files and returns an :class:`IndexFiles`: the JSONL indexes
(file name -> rows) that :func:`beit3.finetune.data.sources.load_jsonl_split` reads, plus side files (the
VQA answer vocabulary, ImageNet's class names). :func:`write_index_files` tokenises, optionally checks the
images and writes every file atomically. ``beit3-finetune-index`` (:mod:`beit3.finetune.index`) is the
command; docs/finetune.md, "Building the indexes", lists the raw files each builder expects.

Rows keep the released field names (reference beit3.md §6.1): ``image_path`` [``image2_path``] relative to
the data root, ``text_segment`` (SentencePiece ids without ``<s>``/``</s>``, written when a tokenizer is
given), ``label`` | ``labels`` + ``scores``, ``image_id``, ``qid``, ``identifier``; every row with a text
also carries it as ``text``, which the reader tokenises when there is no ``text_segment`` and keeps as
the reference of a caption. The VQA builder is :mod:`beit3.finetune.data.vqa_index`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from beit3.engine.checkpoint import atomic_write_bytes
from beit3.finetune.errors import FinetuneError

# torchvision's ImageFolder extensions (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGE_FIELDS = ("image_path", "image2_path")


class RawDataError(FinetuneError, RuntimeError):
    """A raw dataset file or folder that is missing or not in its public format; the message says which
    file, where in it, and what was expected."""


@dataclass
class IndexFiles:
    """What a builder produces: JSONL indexes (name -> rows), side files (name -> text), summary lines."""

    indexes: dict[str, list[dict]] = field(default_factory=dict)
    side_files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    root: str | None = None  # the data root the builder chose, when the command gave none


def progress(items: Iterable, desc: str, total: int | None = None) -> Iterable:
    """``items`` with a progress bar on stderr when it is a terminal (tqdm; silent in logs and tests)."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, disable=None, unit=" rows", leave=False)


# ----- reading raw files ---------------------------------------------------------------------------------
def read_json(path: str | Path, what: str, where_to_get: str) -> object:
    """The parsed JSON of ``path``; a missing or broken file is a :class:`RawDataError`."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{what} {path} does not exist ({where_to_get})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise RawDataError(f"{path} is not valid JSON: {e}") from e


def read_json_lines(path: str | Path, what: str, where_to_get: str) -> list[tuple[int, dict]]:
    """(line number, object) of each line of a JSON-lines file (one object a line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(f"{what} {path} does not exist ({where_to_get})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RawDataError(f"{path} line {number} is not a JSON object: {e}") from e
            if not isinstance(row, dict):
                raise RawDataError(f"{path} line {number} is a {type(row).__name__}, not a JSON object")
            rows.append((number, row))
    return rows


def need(obj: object, key: str, where: str, expected: str, kind: type | tuple[type, ...] = object):
    """``obj[key]``, or a :class:`RawDataError` naming ``where`` and the ``expected`` structure."""
    if not isinstance(obj, dict) or key not in obj:
        raise RawDataError(f"{where} has no {key!r}: expected {expected}")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and int in kinds):  # True is no number
        names = "/".join(k.__name__ for k in kinds)
        raise RawDataError(f"{where}: {key!r} is {value!r}, not a {names}: expected {expected}")
    return value


def need_text(obj: object, key: str, where: str, expected: str) -> str:
    """A non-empty string field (a question, a caption, a sentence)."""
    text = need(obj, key, where, expected, str)
    if not text.strip():
        raise RawDataError(f"{where}: {key!r} is empty")
    return text


# ----- writing -------------------------------------------------------------------------------------------
def missing_images(rows: Iterable[dict], root: str | Path) -> list[str]:
    """The image paths of ``rows`` (``image_path``, ``image2_path``) with no file under ``root``."""
    seen, missing = set(), []
    for row in rows:
        for key in IMAGE_FIELDS:
            path = row.get(key)
            if path is not None and path not in seen:
                seen.add(path)
                if not os.path.isfile(os.path.join(root, path)):
                    missing.append(path)
    return missing


def tokenize_rows(rows: list[dict], tokenizer, desc: str) -> None:
    """Add ``text_segment`` (ids without ``<s>``/``</s>``; ``None`` where there is no text) to every row."""
    for row in progress(rows, f"tokenizing {desc}", len(rows)):
        if "text_segment" in row:
            continue  # a row two indexes share (VQA's val and rest_val)
        text = row.get("text")
        row["text_segment"] = tokenizer.encode(text) if text is not None else None


def write_index_files(
    files: IndexFiles,
    out_dir: str | Path,
    tokenizer=None,
    root: str | Path | None = None,
    check_images: bool = False,
) -> list[Path]:
    """Tokenise (with ``tokenizer``), check images (under ``root``), then write every file into ``out_dir``.

    Each file is written to a temporary name and renamed into place, so an interrupted build leaves every
    index whole: the old one or the new one. Nothing is written when a check fails.
    """
    if check_images:
        for name, rows in files.indexes.items():
            missing = missing_images(progress(rows, f"checking images of {name}", len(rows)), root or ".")
            if missing:
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                raise RawDataError(
                    f"{len(missing)} image(s) of {name} are not under {root}: {shown} "
                    "(download the images into the data root, or fix --root / the image folder options)"
                )
    if tokenizer is not None:
        for name, rows in files.indexes.items():
            tokenize_rows(rows, tokenizer, name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in files.indexes.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))
        written.append(out_dir / name)
    for name, text in files.side_files.items():
        atomic_write_bytes(out_dir / name, text.encode("utf-8"))
        written.append(out_dir / name)
    return written


def relative_to_root(path: str | Path, root: str | Path) -> str:
    """``path`` relative to the data root, with forward slashes; a path outside the root is an error."""
    rel = os.path.relpath(path, root)
    if rel == ".." or rel.startswith(".." + os.sep):
        raise RawDataError(f"{path} is not under the data root {root}: set --root to a folder holding it")
    return Path(rel).as_posix()


# ----- ImageNet-style class folders ------------------------------------------------------------------------
def _class_folder_rows(split_dir: Path, classes: list[str], root: Path, split: str) -> list[dict]:
    rows = []
    for label, name in enumerate(progress(classes, f"listing {split} classes")):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        count = 0
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    rows.append(
                        {"image_path": relative_to_root(Path(dirpath) / filename, root), "label": label}
                    )
                    count += 1
        if count == 0 and split == "train":
            raise RawDataError(f"class folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return rows


def imagenet_index(train_dir: str | Path, val_dir: str | Path, root: str | Path | None = None) -> IndexFiles:
    """``imagenet.{train,val}.index.jsonl`` (``image_path``, ``label``) and ``imagenet.classes.txt``.

    Classes are the sorted sub-folder names of ``train_dir`` (label = position, as torchvision's
    ImageFolder and the release number them); ``val_dir`` uses the same numbering. Images are every file
    with an image extension under a class folder, sub-folders included, in sorted order.
    """
    train_dir, val_dir = Path(train_dir), Path(val_dir)
    for what, folder in (("train", train_dir), ("val", val_dir)):
        if not folder.is_dir():
            raise RawDataError(f"the {what} folder {folder} does not exist (a folder of class sub-folders)")
    root = (
        Path(root)
        if root is not None
        else Path(os.path.commonpath([os.path.abspath(train_dir), os.path.abspath(val_dir)]))
    )
    classes = sorted(d.name for d in os.scandir(train_dir) if d.is_dir())
    if not classes:
        raise RawDataError(f"{train_dir} has no class sub-folders (expected <train>/<class>/<image>)")
    val_classes = sorted(d.name for d in os.scandir(val_dir) if d.is_dir())
    if not val_classes:
        raise RawDataError(
            f"{val_dir} has no class sub-folders: sort the validation images into one folder per class "
            "(the ILSVRC devkit's ground truth gives each image's class)"
        )
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise RawDataError(f"{val_dir} has classes the train folder lacks: {', '.join(unknown[:5])}")
    root = Path(os.path.abspath(root))  # not resolve(): a train folder may be a link into a dataset store
    train = _class_folder_rows(Path(os.path.abspath(train_dir)), classes, root, "train")
    val = _class_folder_rows(Path(os.path.abspath(val_dir)), classes, root, "val")
    return IndexFiles(
        {"imagenet.train.index.jsonl": train, "imagenet.val.index.jsonl": val},
        {"imagenet.classes.txt": "".join(f"{c}\n" for c in classes)},
        [f"{len(classes)} classes; {len(train)} train and {len(val)} val images (paths relative to {root})"],
        str(root),
    )


# ----- NLVR2 ---------------------------------------------------------------------------------------------
NLVR2_FILES = {
    "train": "nlvr2.train.index.jsonl",
    "dev": "nlvr2.dev.index.jsonl",
    "test1": "nlvr2.test-P.index.jsonl",
}
NLVR2_EXPECTED = "JSON lines with identifier, sentence, label ('True'/'False') and, for train, directory"


def nlvr2_rows(path: Path, image_dir: str) -> list[dict]:
    """The index rows of one NLVR2 JSON-lines file; images ``<image_dir>[/<directory>]/<pair>-img{0,1}.png``
    where ``<pair>`` is the identifier without its last (sentence) part, as the official layout names them."""
    rows = []
    for number, item in read_json_lines(path, "NLVR2 file", "github.com/lil-lab/nlvr, nlvr2/data/"):
        where = f"{path} line {number}"
        identifier = need_text(item, "identifier", where, NLVR2_EXPECTED)
        parts = identifier.split("-")
        if len(parts) < 4:
            raise RawDataError(f"{where}: identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
        label = need(item, "label", where, NLVR2_EXPECTED, str)
        if label not in ("True", "False"):
            raise RawDataError(f"{where}: label {label!r} is neither 'True' nor 'False'")
        folder = f"{image_dir}/{item['directory']}" if "directory" in item else image_dir
        pair = f"{folder}/{'-'.join(parts[:-1])}"
        rows.append({"image_path": f"{pair}-img0.png", "image2_path": f"{pair}-img1.png",
                     "text": need_text(item, "sentence", where, NLVR2_EXPECTED),
                     "label": int(label == "True"), "identifier": identifier})  # fmt: skip
    return rows


def nlvr2_index(data_dir: str | Path, image_dirs: dict[str, str], splits: Iterable[str]) -> IndexFiles:
    """``nlvr2.{train,dev,test-P}.index.jsonl`` from ``train.json``/``dev.json``/``test1.json``."""
    files = IndexFiles()
    for split in splits:
        rows = nlvr2_rows(Path(data_dir) / f"{split}.json", image_dirs[split])
        files.indexes[NLVR2_FILES[split]] = rows
        files.notes.append(f"{split}: {len(rows)} examples ({sum(r['label'] for r in rows)} true)")
    return files


# ----- Karpathy splits: COCO and Flickr30k retrieval and captioning ---------------------------------------
KARPATHY_EXPECTED = '{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "cocoid"}]}'
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}  # restval -> train


def karpathy_images(path: str | Path) -> list[dict]:
    """The checked ``images`` of a Karpathy split file, each with ``split``, ``sentences`` and ``where``."""
    data = read_json(
        path, "Karpathy split file", "cs.stanford.edu/people/karpathy/deepimagesent, caption_datasets.zip"
    )
    images = need(data, "images", str(path), KARPATHY_EXPECTED, list)
    out = []
    for i, item in enumerate(images):
        where = f"{path}: images[{i}]"
        split = need(item, "split", where, KARPATHY_EXPECTED, str)
        if split not in KARPATHY_SPLITS:
            raise RawDataError(f"{where}: split {split!r} is not one of {', '.join(KARPATHY_SPLITS)}")
        need_text(item, "filename", where, KARPATHY_EXPECTED)
        sentences = need(item, "sentences", where, KARPATHY_EXPECTED, list)
        texts = [
            need_text(s, "raw", f"{where}.sentences[{j}]", KARPATHY_EXPECTED) for j, s in enumerate(sentences)
        ]
        out.append({**item, "texts": texts, "where": where})
    return out


def _karpathy_path(item: dict, image_dir: str | None) -> str:
    if image_dir is not None:
        return f"{image_dir}/{item['filename']}"
    return f"{need_text(item, 'filepath', item['where'], KARPATHY_EXPECTED)}/{item['filename']}"


def retrieval_index(karpathy_file: str | Path, prefix: str, image_dir: str | None = None) -> IndexFiles:
    """``<prefix>.{train,val,test}.jsonl``: one row per caption, ``image_id`` the image's running number in
    its split (the evaluation groups captions by it); restval images join train, as released.
    ``image_dir`` replaces each image's ``filepath`` (Flickr30k's file names need their folder)."""
    files = IndexFiles({f"{prefix}.{s}.jsonl": [] for s in ("train", "val", "test")})
    numbers: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for item in progress(karpathy_images(karpathy_file), "images"):
        split = KARPATHY_SPLITS[item["split"]]
        path = _karpathy_path(item, image_dir)
        image_id = numbers[split].setdefault(path, len(numbers[split]))
        files.indexes[f"{prefix}.{split}.jsonl"] += [
            {"image_path": path, "text": t, "image_id": image_id} for t in item["texts"]
        ]
    for split, seen in numbers.items():
        files.notes.append(
            f"{split}: {len(seen)} images, {len(files.indexes[f'{prefix}.{split}.jsonl'])} captions"
        )
    return files


def captioning_index(karpathy_file: str | Path) -> IndexFiles:
    """``coco_captioning.{train,val,test}.jsonl``: one row per caption, ``image_id`` the COCO id (cocoid).

    Train is Karpathy train + restval as released. The released val/test indexes hold one row per image
    with no text; here they hold one row per reference caption, which is what the package's captioning
    evaluation reads its references from (it groups rows by ``image_id``).
    """
    files = IndexFiles({f"coco_captioning.{s}.jsonl": [] for s in ("train", "val", "test")})
    images = {"train": set(), "val": set(), "test": set()}
    for item in progress(karpathy_images(karpathy_file), "images"):
        split = KARPATHY_SPLITS[item["split"]]
        cocoid = need(item, "cocoid", item["where"], KARPATHY_EXPECTED, int)
        images[split].add(cocoid)
        path = _karpathy_path(item, None)
        files.indexes[f"coco_captioning.{split}.jsonl"] += [
            {"image_path": path, "text": t, "image_id": cocoid} for t in item["texts"]
        ]
    for split, ids in images.items():
        n = len(files.indexes[f"coco_captioning.{split}.jsonl"])
        files.notes.append(f"{split}: {len(ids)} images, {n} captions")
    return files


# ----- NoCaps --------------------------------------------------------------------------------------------
NOCAPS_EXPECTED = '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]} (COCO format)'


def nocaps_index(captions_file: str | Path, split: str = "val", image_dir: str | None = None) -> IndexFiles:
    """``nocaps.<split>.jsonl``: a row per reference caption (``image_id`` = NoCaps image id), images
    ``<image_dir>/<file_name>`` (default: the split's name, as released). A file without ``annotations``
    (the test image info) gives one row per image with no text, for generating a submission."""
    data = read_json(captions_file, "NoCaps file", "nocaps.org/download: nocaps_val_4500_captions.json")
    images = need(data, "images", str(captions_file), NOCAPS_EXPECTED, list)
    folder = image_dir if image_dir is not None else split
    paths = {}
    for i, image in enumerate(images):
        where = f"{captions_file}: images[{i}]"
        image_id = need(image, "id", where, NOCAPS_EXPECTED, int)
        paths[image_id] = f"{folder}/{need_text(image, 'file_name', where, NOCAPS_EXPECTED)}"
    if "annotations" not in data:
        rows = [{"image_path": p, "image_id": i} for i, p in paths.items()]
        return IndexFiles({f"nocaps.{split}.jsonl": rows}, notes=[f"{len(rows)} images, no captions"])
    captions: dict[int, list[str]] = {i: [] for i in paths}
    for i, ann in enumerate(need(data, "annotations", str(captions_file), NOCAPS_EXPECTED, list)):
        where = f"{captions_file}: annotations[{i}]"
        image_id = need(ann, "image_id", where, NOCAPS_EXPECTED, int)
        if image_id not in captions:
            raise RawDataError(f"{where}: image_id {image_id} is not among the file's images")
        captions[image_id].append(need_text(ann, "caption", where, NOCAPS_EXPECTED))
    bare = [i for i, c in captions.items() if not c]
    if bare:
        raise RawDataError(f"{captions_file}: {len(bare)} image(s) have no caption (e.g. id {bare[0]})")
    rows = [{"image_path": paths[i], "text": c, "image_id": i} for i, cs in captions.items() for c in cs]
    return IndexFiles({f"nocaps.{split}.jsonl": rows}, notes=[f"{len(paths)} images, {len(rows)} captions"])
