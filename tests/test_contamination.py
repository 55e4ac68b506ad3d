"""beit3-contamination (pretrain/contamination.py): planted duplicates of evaluation images and captions in
generated pretraining shards are all found, distinct generated images never match, the drop list filters the
shards, and bad input ends with one clear error line."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tiny_data import sentence as tiny_sentence

from beit3.pretrain import contamination as C
from beit3.pretrain.data.tario import ShardWriter, iter_shard, write_manifest

WORDS = tuple(
    " ".join(
        [
            "dog cat man woman child bird horse table chair river street car bus train kite plate pizza red",
            "blue green small large old young two three sitting standing riding holding eating near under",
            "over beside next front grass water snow field park road kitchen window wall bench tree sky",
            "beach wave board ball frisbee umbrella",
        ]
    ).split()
)


def drawn(seed: int, w: int = 192, h: int = 144) -> Image.Image:
    """A distinct picture: random shapes, lines and colours on a random background, plus pixel noise."""
    r = random.Random(seed)
    img = Image.new("RGB", (w, h), tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(r.randint(4, 9)):
        c = tuple(r.randrange(256) for _ in range(3))
        x0, y0 = r.randrange(-w // 4, w), r.randrange(-h // 4, h)
        x1, y1 = x0 + r.randint(w // 8, w), y0 + r.randint(h // 8, h)
        kind = r.randrange(4)
        if kind == 0:
            d.rectangle([x0, y0, x1, y1], fill=c)
        elif kind == 1:
            d.ellipse([x0, y0, x1, y1], fill=c)
        elif kind == 2:
            d.polygon([(r.randrange(w), r.randrange(h)) for _ in range(3)], fill=c)
        else:
            d.line([(r.randrange(w), r.randrange(h)) for _ in range(4)], fill=c, width=r.randint(3, 12))
    noise = np.random.default_rng(seed).integers(-10, 11, (h, w, 3))
    return Image.fromarray((np.asarray(img).astype(np.int16) + noise).clip(0, 255).astype(np.uint8))


def encode(img: Image.Image, quality: int = 90, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def flip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# What each planted pretraining sample is: a copy of evaluation image i by some transformation.
PLANTED_IMAGES = {
    "exact": (0, lambda im: None),  # the evaluation file's own bytes
    "half_jpeg30": (1, lambda im: encode(im.resize((96, 72), Image.Resampling.BILINEAR), 30)),
    "jpeg15": (2, lambda im: encode(im, 15)),
    "up_png": (3, lambda im: encode(im.resize((400, 300), Image.Resampling.BICUBIC), fmt="PNG")),
    "flipped": (4, lambda im: encode(flip(im), 85)),
    "flipped_small_jpeg25": (5, lambda im: encode(flip(im).resize((150, 112)), 25)),
}
FLIPPED = {"dup_flipped", "dup_flipped_small_jpeg25"}
# Slightly cropped copies (found with --crops): 6% off the right and bottom, 4% off every side.
PLANTED_CROPS = {
    "crop_corner": (6, lambda im: encode(im.crop((0, 0, 180, 135)), 80)),
    "crop_centre": (7, lambda im: encode(im.crop((8, 6, 184, 138)), 80)),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """40 evaluation images with captions (a finetune index), and image/pair/text shards holding 320 other
    generated images, random captions from the same vocabulary, and the planted copies and overlaps."""
    root = tmp_path_factory.mktemp("contam")
    r = random.Random(0)
    ev_dir = root / "coco" / "val2014"
    ev_dir.mkdir(parents=True)
    eval_images, captions, rows = [], [], []
    for i in range(40):
        img = drawn(10_000 + i)
        eval_images.append(img)
        name = f"val2014/COCO_val2014_{i:012d}.jpg"
        (root / "coco" / name).write_bytes(encode(img, 92))
        for j in range(2):
            cap = f"A {sentence(r, 9)} {j}." if i != 39 else "A dog."  # 39: too short to check
            captions.append(cap)
            rows.append({"image_path": name, "text": cap, "image_id": 500 + i})
    index = root / "coco" / "coco_captioning.test.jsonl"
    index.write_text("".join(json.dumps(row) + "\n" for row in rows))

    planted_img: dict[str, int] = {}  # pretraining key -> evaluation image number
    images = ShardWriter(str(root / "images"), "images", max_samples=60)
    seeds = iter(range(320))
    for k in range(200):
        images.write(f"img{k:05d}", {"jpg": encode(drawn(next(seeds)), 85)})
    for label, (i, fn) in {**PLANTED_IMAGES, **PLANTED_CROPS}.items():
        data = fn(eval_images[i])
        if data is None:
            data = (root / "coco" / rows[2 * i]["image_path"]).read_bytes()
        ext = "png" if label == "up_png" else "jpg"
        images.write(f"dup_{label}", {ext: data})
        planted_img[f"dup_{label}"] = i
    images.close()
    write_manifest(str(root / "images"), "images", images.shards, {}, {})

    planted_text: dict[str, int] = {}  # pretraining key -> evaluation caption number
    pairs = ShardWriter(str(root / "pairs"), "pairs", max_samples=50)
    for k in range(120):
        pairs.write(f"pair{k:05d}", {"jpg": encode(drawn(next(seeds)), 85), "txt": sentence(r, 12).encode()})
    # a caption inside a longer text, upper-cased and re-punctuated; an 8-word piece of a caption
    pairs.write(
        "cap_inside", {"jpg": encode(drawn(900), 85), "txt": f"Look: {captions[10].upper()}!! wow".encode()}
    )
    planted_text["cap_inside"] = 10
    piece = " ".join(C.normalize_words(captions[21])[2:10])
    pairs.write("cap_piece", {"jpg": encode(drawn(901), 85), "txt": f"so {piece}, then".encode()})
    planted_text["cap_piece"] = 21
    # a pair that is both: eval image 8 flipped, captioned with eval caption 17 (image 8's second caption)
    pairs.write("both", {"jpg": encode(flip(eval_images[8]), 70), "txt": captions[17].encode()})
    planted_img["both"], planted_text["both"] = 8, 17
    # near misses that must not match: 7 consecutive words of a caption; the too-short caption
    pairs.write(
        "near7",
        {"jpg": encode(drawn(902), 85), "txt": " ".join(C.normalize_words(captions[30])[:7]).encode()},
    )
    pairs.write("short", {"jpg": encode(drawn(903), 85), "txt": b"A dog."})
    pairs.close()
    texts = ShardWriter(str(root / "texts"), "texts", max_samples=40)
    for k in range(60):
        texts.write(f"txt{k:05d}", {"txt": sentence(r, 60).encode()})
    texts.write("doc_with_caption", {"txt": f"{sentence(r, 30)} {captions[44]} {sentence(r, 30)}".encode()})
    planted_text["doc_with_caption"] = 44
    texts.close()
    return {
        "root": root,
        "index": index,
        "captions": captions,
        "rows": rows,
        "planted_img": planted_img,
        "planted_text": planted_text,
    }


def run_check(world, out, *extra: str) -> tuple[list[dict], dict, list[str]]:
    root = world["root"]
    argv = ["check", "--eval", str(world["index"]), "--images", str(root / "images"),
            "--pairs", str(root / "pairs" / "*.tar"), "--texts", str(root / "texts"), "--out-dir", str(out),
            "--quiet", *extra]  # fmt: skip
    assert C.main(argv) == 0
    matches = [json.loads(line) for line in (out / "matches.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    keys = (out / "drop_keys.tsv").read_text().splitlines()
    return matches, summary, keys


def test_check_finds_every_planted_copy_and_nothing_else(world, tmp_path):
    matches, summary, keys = run_check(world, tmp_path / "out", "--workers", "2")
    img = {m["key"]: m for m in matches if m["kind"] == "image"}
    planted = {k: i for k, i in world["planted_img"].items() if not k.startswith("dup_crop")}
    for key in [k for k in img if k.startswith("dup_crop")]:  # found without --crops or not: not asserted
        img.pop(key)
    assert sorted(img) == sorted(planted)  # every copy, and none of the 320 other generated images
    assert len([m for m in matches if m["kind"] == "image" and not m["key"].startswith("dup_crop")]) == len(
        img
    )
    for key, i in planted.items():
        m = img[key]
        assert m["image_path"] == world["rows"][2 * i]["image_path"] and m["image_id"] == 500 + i
        assert m["eval"] == "coco_captioning.test.jsonl" and m["view"] == "original"
        assert m["flipped"] == (key in FLIPPED or key == "both"), key
        assert m["distance"] <= 8 and m["dhash_distance"] <= 16
    assert img["dup_exact"]["distance"] == 0 and img["dup_exact"]["dhash_distance"] == 0
    assert img["dup_exact"]["stream"] == "image" and img["both"]["stream"] == "pair"

    txt = [m for m in matches if m["kind"] == "text"]
    assert sorted({m["key"] for m in txt}) == sorted(world["planted_text"])
    for key, c in world["planted_text"].items():
        found = [m for m in txt if m["key"] == key]
        assert world["captions"][c] in {m["eval_text"] for m in found}, key
    inside = next(m for m in txt if m["key"] == "cap_inside" and m["eval_text"] == world["captions"][10])
    assert inside["overlap"] == 1.0 and inside["ngrams"] == 4  # 11 words: 4 distinct 8-grams, all found
    piece = next(m for m in txt if m["key"] == "cap_piece" and m["eval_text"] == world["captions"][21])
    assert piece["ngrams"] == 1 and piece["overlap"] == 0.25
    assert next(m for m in txt if m["key"] == "doc_with_caption")["stream"] == "text"

    shards = {line.split("\t")[0] for line in keys}
    dropped = {tuple(line.split("\t")[1:]) for line in keys}
    assert all(s.endswith(".tar") and s.startswith(str(world["root"])) for s in shards)
    expect = {k: set() for k in {*world["planted_img"], *world["planted_text"]}}
    for k in world["planted_img"]:
        expect[k].add("image")
    for k in world["planted_text"]:
        expect[k].add("text")
    got = {key: set(kinds.split(",")) for key, kinds in dropped}
    assert {k: v for k, v in got.items() if not k.startswith("dup_crop")} == {
        k: v for k, v in expect.items() if not k.startswith("dup_crop")
    }
    pre = summary["pretraining"]
    assert pre["image"]["samples"] == 200 + len(PLANTED_IMAGES) + len(PLANTED_CROPS)
    assert pre["pair"]["samples"] == 125 and pre["pair"]["texts"] == 125 and pre["text"]["texts"] == 61
    ev = summary["eval"]["coco_captioning.test.jsonl"]
    assert ev["images"] == 40 and ev["captions"] == 80 and ev["images_found"] >= len(planted) + 1
    assert summary["samples_to_drop"] == len(keys)


def test_crops_find_cropped_copies_without_false_matches(world, tmp_path):
    matches, _, _ = run_check(world, tmp_path / "out", "--crops", "--no-texts", "--workers", "1")
    img = {m["key"]: m for m in matches}
    assert sorted(img) == sorted(world["planted_img"])  # the cropped ones too, still nothing else
    assert {m["kind"] for m in matches} == {"image"}
    assert img["dup_crop_corner"]["image_id"] == 506 and img["dup_crop_centre"]["image_id"] == 507


def test_filter_drops_the_listed_samples(world, tmp_path):
    out = tmp_path / "out"
    run_check(world, out, "--no-images", "--workers", "1")
    run_check(world, tmp_path / "two", "--no-images", "--workers", "2")
    for name in ("matches.jsonl", "drop_keys.tsv"):  # the same report, line for line, from 1 or 2 workers
        assert (out / name).read_text() == (tmp_path / "two" / name).read_text()
    clean = tmp_path / "clean"
    assert C.main(["filter", str(world["root"] / "pairs"), "--drop", str(out / "drop_keys.tsv"),
                   "--output-dir", str(clean), "--quiet"]) == 0  # fmt: skip
    before = [
        s.key for t in sorted((world["root"] / "pairs").glob("*.tar")) for s, _, _ in iter_shard(str(t))
    ]
    after = {}
    for t in sorted(clean.glob("*.tar")):
        for s, _, _ in iter_shard(str(t)):
            after[s.key] = s.fields
    assert sorted(after) == sorted(k for k in before if k not in {"cap_inside", "cap_piece", "both"})
    assert set(after["pair00003"]) == {"jpg", "txt"}
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["samples"] == len(after) and manifest["dropped"] == 3 and manifest["kind"] == "unknown"
    again = tmp_path / "again"
    assert C.main(["check", "--eval", str(world["index"]), "--pairs", str(clean), "--out-dir", str(again),
                   "--workers", "1", "--quiet"]) == 0  # fmt: skip
    assert (again / "matches.jsonl").read_text() == "" and (again / "drop_keys.tsv").read_text() == ""
    # --only image keeps the text-only matches
    assert C.main(["filter", str(world["root"] / "pairs"), "--drop", str(out / "drop_keys.tsv"),
                   "--output-dir", str(tmp_path / "none"), "--only", "image", "--quiet"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "none" / "manifest.json").read_text())["dropped"] == 0


def test_bounded_search_is_exact_both_ways():
    """The band search (multi-index hashing) and brute force in small slices find the same, exact set."""
    rng = np.random.default_rng(0)
    n = 3000
    table = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    dtab = rng.integers(0, 2**63, n, dtype=np.uint64)
    views = [
        (i // 2, 0, int(p), int(d), bool(i % 2)) for i, (p, d) in enumerate(zip(table, dtab, strict=True))
    ]
    items = [{"eval": "e", "image_path": f"{i}.jpg", "image_id": i} for i in range(n // 2)]
    picks = np.arange(0, n, 7)
    q = table[picks].copy()
    dist = rng.integers(0, 13, len(q))
    for j, k in enumerate(dist):  # k bits flipped, spread over the bands at random
        for bit in rng.choice(64, k, replace=False):
            q[j] ^= np.uint64(1) << np.uint64(int(bit))
    qd = dtab[picks]
    index = C.ImageIndex(items, views, block_cells=5000)
    for max_p in (0, 3, 8, 12):
        by_bands = index.match(q, qd, max_p, 0, bands=True)
        brute = index.match(q, qd, max_p, 0, bands=False)
        assert by_bands == brute
        want = [[int(picks[j]) // 2] if dist[j] <= max_p else [] for j in range(len(q))]
        assert [[m["image_id"] for m in row] for row in brute] == want  # random others are 20+ bits away
        for j, row in enumerate(brute):
            assert all(m["distance"] == dist[j] and m["flipped"] == bool(picks[j] % 2) for m in row)
    assert index.match(q, qd ^ np.uint64(1), 12, 0) == [[] for _ in q]  # confirmed by dHash: 1 bit off


def test_text_normalisation_and_short_captions():
    assert C.normalize_words("A Dog's  ball!—ＦＵＬＬ width_x") == [
        "a",
        "dog",
        "s",
        "ball",
        "full",
        "width",
        "x",
    ]
    items = [{"text": t} for t in ("one two three four five six", "a b", "x y z w v u t s r q")]
    idx = C.TextIndex(items, n=8, min_words=5)
    assert idx.total == [1, 0, 3]
    assert idx.match("zero ONE two three four five six seven") == {0: 1}  # whole short caption
    assert idx.match("one two three four five") == {}
    assert idx.match("a b") == {}
    assert idx.match("x y z w v u t s q r") == {2: 1}


def test_bad_input_is_one_error_line(world, tmp_path, capsys):
    root = world["root"]

    def err(*argv: str) -> str:
        assert C.main(["check", *argv, "--out-dir", str(tmp_path / "o"), "--quiet", "--workers", "1"]) == 2
        return capsys.readouterr().err.strip()

    images = ["--images", str(root / "images")]
    assert "missing.jsonl" in err("--eval", str(tmp_path / "missing.jsonl"), *images)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_path": "val2014/COCO_val2014_000000000000.jpg"}\nnot json\n')
    assert f"{bad}:2: not JSON" in err("--eval", str(bad), str(root / "coco"), *images)
    bad.write_text('{"text": "no image"}\n')
    assert f"{bad}:1: no image_path" in err("--eval", str(bad), *images)
    bad.write_text('{"image_path": "val2014/nope.jpg"}\n')
    msg = err("--eval", str(bad), str(root / "coco"), *images)
    assert "1 of 1 evaluation images are missing" in msg and "nope.jpg" in msg
    (root / "coco" / "broken.jpg").write_bytes(b"not an image")
    bad.write_text('{"image_path": "broken.jpg"}\n')
    assert "cannot be decoded" in err("--eval", str(bad), str(root / "coco"), *images)
    assert C.main(["check", "--eval", str(bad), str(root / "coco"), *images, "--out-dir", str(tmp_path / "s"),
                   "--skip-bad-eval-images", "--quiet", "--workers", "1"]) == 0  # fmt: skip
    assert "no shard file matches" in err("--eval", str(world["index"]), "--pairs", str(tmp_path / "x-*.tar"))
    assert "no pretraining shards" in err("--eval", str(world["index"]))
    assert "INDEX [ROOT]" in err("--eval", str(world["index"]), "a", "b", *images)
    assert all(line.startswith("beit3-contamination: error:") for line in [err("--eval", str(bad), *images)])


def test_text_segment_rows_need_the_tokenizer_and_texts_need_no_images(tok, tmp_path):
    """A released-style row holds only ``text_segment`` ids: its caption is checked with --tokenizer. A
    text-only check (--no-images) does not need the evaluation images on disk."""
    caption = tiny_sentence(8)  # 12 words of the tiny tokenizer's corpus
    index = tmp_path / "coco_retrieval.test.jsonl"
    index.write_text(
        json.dumps({"image_path": "absent.jpg", "text_segment": tok.encode(caption), "image_id": 3})
    )
    pairs = ShardWriter(str(tmp_path / "pairs"), "pairs")
    pairs.write("hit", {"jpg": encode(drawn(1), 85), "txt": f"{caption} and more".encode()})
    pairs.write("miss", {"jpg": encode(drawn(2), 85), "txt": tiny_sentence(9).encode()})
    pairs.close()
    base = ["check", "--eval", str(index), "--pairs", str(tmp_path / "pairs"), "--no-images", "--quiet"]
    assert C.main([*base, "--out-dir", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["eval_rows_without_text"] == 1
    assert (tmp_path / "a" / "matches.jsonl").read_text() == ""
    argv = [*base, "--out-dir", str(tmp_path / "b"), "--workers", "1", "--tokenizer", tok.model_file]
    assert C.main(argv) == 0
    (m,) = [json.loads(line) for line in (tmp_path / "b" / "matches.jsonl").read_text().splitlines()]
    assert m["key"] == "hit" and m["image_id"] == 3 and m["overlap"] == 1.0
    assert C.normalize_words(m["eval_text"]) == C.normalize_words(caption)
    assert C.main([*base, "--out-dir", str(tmp_path / "c"), "--tokenizer", str(tmp_path / "none.model")]) == 2
