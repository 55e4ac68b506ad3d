"""Finetuning examples: released-format JSONL indexes and webdataset shards (images left on disk), and small
offline benchmarks (decoded into memory).

Every source returns a :class:`TaskData`: a train and an eval :class:`Split` (examples plus a uint8 image
bank at the model's resolution) and the class / answer names. An example is a dict with some of
``image`` / ``image2`` (rows of the bank), ``text`` (a string or token ids without ``<s>``/``</s>``),
``label``, ``scores`` ({answer index: soft score}) and ``image_id``.

Offline sources (reference offline-data.md; none downloads anything):

* ``easy_vqa``: the easy-VQA benchmark (pip ``easy-vqa==1.0``): 64x64 shapes, 13 answers.
* ``tuxpaint``: Debian ``tuxpaint-stamps-default`` stamps with their English captions and 16 categories.
* ``digits``: scikit-learn's 8x8 handwritten digits, 10 classes.
* ``wordnet``: Debian ``wordnet-base`` glosses labelled by lexicographer file (the 10 largest).
* ``shapes``: generated coloured shapes with captions, questions and colour labels (tests; no install).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from beit3.finetune.errors import FinetuneError
from beit3.tokenizers.images import ImageInputError, to_rgb


class DataSourceError(FinetuneError, RuntimeError):
    """A data source that is missing or malformed; the message says what to install or fix."""


class LazyImages:
    """A split's images as file paths, decoded and resized when rows are read.

    ``images[rows]`` gives uint8 (len(rows), 3, S, S) as an in-memory bank does (``images[i]``: (3, S, S)),
    so every consumer reads both alike, while memory holds only the paths: a dataset of any size costs its
    index. The training loader reads the rows of each batch in DataLoader worker processes
    (``BatchLoader(num_workers=...)``); with augmentation it takes each image as decoded (:meth:`decode`,
    its own size) and crops it there. ``crop_pct``: the evaluation view (``load_image``).
    """

    def __init__(self, paths: list[str], size: int, crop_pct: float = 0.0) -> None:
        self.paths, self.size, self.crop_pct = list(paths), int(size), float(crop_pct)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> torch.Tensor:
        if self.crop_pct:
            return load_image(self.paths[index], self.size, self.crop_pct)
        return load_image(self.paths[index], self.size)

    def decode(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image at its own size (what training transforms crop)."""
        return decode_image(self.paths[index])

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, int) or (torch.is_tensor(rows) and rows.dim() == 0):
            return self._load(int(rows))
        if isinstance(rows, slice):
            indices = list(range(*rows.indices(len(self.paths))))
        else:
            indices = rows.tolist() if torch.is_tensor(rows) else [int(r) for r in rows]
        if not indices:
            return torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
        return torch.stack([self._load(i) for i in indices])

    def __iter__(self):
        return (self._load(i) for i in range(len(self.paths)))


# Paths a lazily read split checks for existence when it is loaded (the first and a seeded sample): a missing
# file is found before training starts, not hours into it, without a stat of every file of a large dataset.
CHECKED_PATHS = 64


def _check_paths(paths: list[str], index: Path, seed: int) -> None:
    sample = paths[:CHECKED_PATHS] + random.Random(seed).sample(paths, min(len(paths), CHECKED_PATHS))
    missing = [
        p for p in dict.fromkeys(sample) if not Path(p.shard if isinstance(p, TarMember) else p).is_file()
    ]
    if missing:
        raise DataSourceError(
            f"{index}: {len(missing)} of {len(set(sample))} sampled images do not exist, e.g. {missing[0]}: "
            "check data.root (image paths are relative to it)"
        )


@dataclass
class Split:
    """Examples of one split and the images they index: an in-memory uint8 bank (N, 3, S, S) for the small
    offline sources, :class:`LazyImages` (paths, decoded when read) for released-format indexes."""

    examples: list[dict]
    images: torch.Tensor | LazyImages | None = None


@dataclass
class TaskData:
    """Train and eval splits plus the names of the labels (classes or answers)."""

    train: Split
    eval: Split
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TarMember:
    """An image stored as one member of a local webdataset tar shard: where its bytes are (read by seeking,
    so a split of any size holds only these references)."""

    shard: str
    offset: int
    size: int

    def read(self) -> io.BytesIO:
        try:
            with open(self.shard, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as e:
            raise DataSourceError(f"cannot read {self}: {e}") from e
        if len(data) != self.size:
            raise DataSourceError(f"cannot read {self}: the shard ends before the member does (it changed?)")
        return io.BytesIO(data)

    def __str__(self) -> str:
        return f"{self.shard} (member at byte {self.offset})"


def decode_image(path: str | Path | TarMember) -> Image.Image:
    """An image file (or shard member) as RGB; transparent pixels composited onto white (Tux Paint stamps
    are cut-outs)."""
    try:
        img = Image.open(path.read() if isinstance(path, TarMember) else path)
        img.load()
    except OSError as e:
        raise DataSourceError(f"cannot read image {path}: {e}") from e
    try:
        return to_rgb(img)
    except ImageInputError as e:
        raise DataSourceError(f"cannot use image {path}: {e}") from e


def load_image(path: str | Path | TarMember, size: int, crop_pct: float = 0.0) -> torch.Tensor:
    """(3, size, size) uint8 (:func:`decode_image`): resized to the square, or with ``crop_pct`` > 0 the
    released ImageNet evaluation view (:func:`beit3.finetune.data.augment.eval_view`)."""
    from beit3.finetune.data.augment import eval_view, from_pil

    return from_pil(eval_view(decode_image(path), size, crop_pct))


def _bank(paths: list[str], size: int) -> torch.Tensor:
    return torch.stack([load_image(p, size) for p in paths]) if paths else torch.zeros(0, 3, size, size)


def _split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(n * eval_fraction)))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _cap(examples: list[dict], limit: int, seed: int) -> list[dict]:
    if not limit or len(examples) <= limit:
        return examples
    return random.Random(seed).sample(examples, limit)


# ----- released-format JSONL indexes ---------------------------------------------------------------
def load_jsonl_split(
    index: str | Path,
    root: str | Path,
    size: int,
    limit: int = 0,
    seed: int = 0,
    decode_images: bool = True,
    crop_pct: float = 0.0,
) -> Split:
    """A released-style index: ``image_path`` [+ ``image2_path``], ``text_segment`` (ids) or ``text``, and
    ``label`` | ``labels`` + ``scores`` | ``image_id``. Paths are relative to ``root``. The images stay on
    disk (:class:`LazyImages`: decoded when a batch reads them); a sample of the paths is checked to exist.
    ``decode_images=False``: the examples only (no images), e.g. for a train split's labels. ``crop_pct``:
    the images' evaluation view (:func:`load_image`)."""
    index = Path(index)
    if not index.is_file():
        raise DataSourceError(f"index file {index} does not exist; set data.train / data.eval")
    rows = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
    rows = _cap(rows, limit, seed)
    examples, paths = _examples(rows, lambda row, name: str(Path(root) / row[name]))
    if not decode_images:
        return Split(examples, None)
    _check_paths(paths, index, seed)
    return Split(examples, LazyImages(paths, size, crop_pct))


def _examples(rows: list[dict], image_of) -> tuple[list[dict], list]:
    """Examples from released-format rows (see :func:`load_jsonl_split`), and the distinct images they name
    in order: ``image_of(row, "image_path" | "image2_path")`` says where each is (a path, a shard member)."""
    images: dict = {}
    examples = []
    for row in rows:
        ex: dict = {}
        for key, field_name in (("image", "image_path"), ("image2", "image2_path")):
            if field_name in row:
                ex[key] = images.setdefault(image_of(row, field_name), len(images))
        if "text_segment" in row and row["text_segment"] is not None:
            ex["text"] = [int(i) for i in row["text_segment"]]
            if isinstance(row.get("text"), str):  # beit3-finetune-index writes both: references as written
                ex["raw_text"] = row["text"]
        elif "text" in row:
            ex["text"] = row["text"]
        if "labels" in row:
            ex["scores"] = {int(lab): float(s) for lab, s in zip(row["labels"], row["scores"])}
        elif "label" in row:
            ex["label"] = int(row["label"])
        ex["image_id"] = int(row.get("image_id", ex.get("image", len(examples))))
        if row.get("qid", row.get("question_id")) is not None:  # VQA: the submission file names questions
            ex["question_id"] = int(row.get("qid", row.get("question_id")))
        examples.append(ex)
    return examples, list(images)


# ----- webdataset shards ---------------------------------------------------------------------------
# A sample's members share a key (the member name up to the first dot of its base name, webdataset's
# rule); the rest of the name is the field. Images: these fields (the second image of a pair, NLVR2:
# ``image2.<ext>``); ``json``: the released row's other fields (label, labels + scores, text, text_segment,
# image_id, qid); ``cls``: the label; ``txt``: the text.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


def load_wds_split(
    spec: str, size: int, limit: int = 0, seed: int = 0, decode_images: bool = True, crop_pct: float = 0.0
) -> Split:
    """A split from local webdataset tar shards (``spec``: a glob or webdataset's brace form, e.g.
    ``train-{000000..000127}.tar``; several joined by ``::``). The shards' member headers are read once to
    index the samples; images stay in the shards (:class:`TarMember`: read by seeking when a batch needs
    them), so memory holds the index as for a JSONL index. Examples as :func:`load_jsonl_split` makes."""
    import glob
    import tarfile

    from webdataset.shardlists import expand_urls

    if not spec:
        raise DataSourceError("data.source = 'wds' needs data.train / data.eval: shard files, e.g. "
                              "'shards/train-{000000..000127}.tar'")  # fmt: skip
    shards: list[str] = []
    for url in expand_urls(spec):
        if "://" in url or url.startswith("pipe:"):
            raise DataSourceError(
                f"{url}: a finetuning split reads its shards by seeking, so they must be local files (copy "
                "them, or write a JSONL index with beit3-finetune-index)"
            )
        found = sorted(glob.glob(url)) if glob.has_magic(url) else [url]
        missing = [f for f in found if not Path(f).is_file()]
        if not found or missing:
            raise DataSourceError(
                f"no shard file {missing[0] if missing else url}: check data.train / data.eval"
            )
        shards += found
    rows: list[dict] = []
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:
                rows += _shard_rows(shard, tar)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataSourceError(f"cannot read shard {shard}: {e}") from e
    if not rows:
        raise DataSourceError(f"{spec}: no sample with an image ({', '.join(IMAGE_FIELDS)}) in the shards")
    rows = _cap(rows, limit, seed)
    examples, members = _examples(rows, lambda row, name: row[name])
    if not decode_images:
        return Split(examples, None)
    return Split(examples, LazyImages(members, size, crop_pct))


def _shard_rows(shard: str, tar) -> list[dict]:
    """The released-format rows of one shard's samples, ``image_path`` / ``image2_path`` as members."""
    samples: dict[str, dict] = {}
    for m in tar:
        if not m.isfile():
            continue
        folder, _, base = m.name.rpartition("/")
        stem, dot, field_name = base.partition(".")
        if not dot:
            continue
        sample = samples.setdefault(f"{folder}/{stem}", {})
        member = TarMember(shard, m.offset_data, m.size)
        if field_name in IMAGE_FIELDS:
            sample["image_path"] = member
        elif field_name.startswith("image2.") and field_name[7:] in IMAGE_FIELDS:
            sample["image2_path"] = member
        elif field_name in ("json", "cls", "txt"):
            sample[field_name] = member
    rows = []
    for key, fields in samples.items():
        if "image_path" not in fields:
            continue
        row = json.loads(fields["json"].read().getvalue()) if "json" in fields else {}
        if not isinstance(row, dict):
            raise DataSourceError(f"{shard}: {key}.json is not a JSON object")
        if "cls" in fields:
            row["label"] = int(fields["cls"].read().getvalue().decode().strip())
        if "txt" in fields:
            row["text"] = fields["txt"].read().getvalue().decode("utf-8").strip()
        row["image_path"] = fields["image_path"]
        if "image2_path" in fields:
            row["image2_path"] = fields["image2_path"]
        rows.append(row)
    return rows


# ----- offline benchmarks ---------------------------------------------------------------------------
def load_easy_vqa(size: int, max_train: int = 0, max_eval: int = 0, seed: int = 0) -> TaskData:
    """easy-VQA: train and test questions over their own image sets, one answer each (soft score 1)."""
    try:
        import easy_vqa
    except ImportError as e:
        raise DataSourceError("data.source 'easy_vqa' needs `pip install easy-vqa==1.0`") from e
    answers = easy_vqa.get_answers()
    index = {a: i for i, a in enumerate(answers)}

    def split(questions, image_paths, limit: int) -> Split:
        texts, answer_words, image_ids = questions
        rows = _cap(list(zip(texts, answer_words, image_ids)), limit, seed)
        used = sorted({i for _, _, i in rows})
        row_of = {img: r for r, img in enumerate(used)}
        examples = [
            {"image": row_of[i], "text": q, "scores": {index[a]: 1.0}, "label": index[a], "image_id": i}
            for q, a, i in rows
        ]
        return Split(examples, _bank([image_paths[i] for i in used], size))

    train = split(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), max_train)
    test = split(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), max_eval)
    return TaskData(train, test, list(answers))


TUXPAINT_DIR = Path("/usr/share/tuxpaint/stamps")


def load_tuxpaint(size: int, max_train: int = 0, max_eval: int = 0, seed: int = 0) -> TaskData:
    """Captioned PNG stamps: caption = first line of the ``.txt``; label = top-level category."""
    if not TUXPAINT_DIR.is_dir():
        raise DataSourceError(
            "data.source 'tuxpaint' needs "
            "`apt-get install -y --no-install-recommends tuxpaint-stamps-default`"
        )
    items = []
    for png in sorted(TUXPAINT_DIR.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        caption = txt.read_text(errors="replace").splitlines()[0].strip() if txt.stat().st_size else ""
        if caption:
            items.append((str(png), caption, png.relative_to(TUXPAINT_DIR).parts[0]))
    classes = sorted({c for _, _, c in items})
    train_idx, eval_idx = _split_indices(len(items), 0.2, seed)

    def split(idx: list[int], limit: int) -> Split:
        chosen = _cap([items[i] for i in idx], limit, seed)
        examples = [{"image": r, "text": cap, "label": classes.index(c), "image_id": r}
                    for r, (_, cap, c) in enumerate(chosen)]  # fmt: skip
        return Split(examples, _bank([p for p, _, _ in chosen], size))

    return TaskData(split(train_idx, max_train), split(eval_idx, max_eval), classes)


def load_digits_data(size: int, max_train: int = 0, max_eval: int = 0, seed: int = 0) -> TaskData:
    """scikit-learn digits upscaled to ``size``, grey to RGB; a seeded 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataSourceError("data.source 'digits' needs `pip install scikit-learn`") from e
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float() / 16.0 * 255.0  # (N, 8, 8)
    up = torch.nn.functional.interpolate(
        pixels[:, None], size=(size, size), mode="bilinear", align_corners=False
    )
    bank = up.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    train_idx, eval_idx = _split_indices(len(bank), 0.2, seed)

    def split(idx: list[int], limit: int) -> Split:
        idx = _cap(idx, limit, seed)
        return Split([{"image": r, "label": int(digits.target[i])} for r, i in enumerate(idx)], bank[idx])

    return TaskData(split(train_idx, max_train), split(eval_idx, max_eval), [str(d) for d in range(10)])


WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES = (  # WordNet lexicographer file names, by number
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)


def load_wordnet(max_train: int = 0, max_eval: int = 0, seed: int = 0, num_classes: int = 10) -> TaskData:
    """WordNet glosses (definition part, before the examples) labelled by their ``num_classes`` largest
    lexicographer files; a seeded 80/20 split."""
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise DataSourceError("data.source 'wordnet' needs `apt-get install -y wordnet-base`")
    items = []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            lex = int(line.split()[1])
            gloss = line.split("|", 1)[1].split(";")[0].strip()
            if gloss:
                items.append((gloss, lex))
    counts: dict[int, int] = {}
    for _, lex in items:
        counts[lex] = counts.get(lex, 0) + 1
    top = sorted(counts, key=lambda k: (-counts[k], k))[:num_classes]
    label = {lex: i for i, lex in enumerate(top)}
    items = [(g, label[lex]) for g, lex in items if lex in label]
    train_idx, eval_idx = _split_indices(len(items), 0.2, seed)

    def split(idx: list[int], limit: int) -> Split:
        idx = _cap(idx, limit, seed)
        return Split([{"text": items[i][0], "label": items[i][1]} for i in idx])

    return TaskData(split(train_idx, max_train), split(eval_idx, max_eval), [LEXNAMES[k] for k in top])
