"""``beit3-shards``: images, texts and pairs into shards with manifests; img2dataset shards read as pairs."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from tiny_data import noise_image, tiny_tokenizer

from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.tario import ShardWriter
from beit3.pretrain.shards import main, split_segments


def members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf}


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "in21k"
    for cls in ("n01", "n02"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.jpg").write_bytes(noise_image(rng, 40, 48))
    (root / "n02" / "alpha.png").write_bytes(noise_image(rng, 40, 40, fmt="PNG"))
    Image.new("RGBA", (30, 30), (0, 0, 0, 0)).save(root / "n02" / "clear.png")
    (root / "n01" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "n01" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_images_writes_shards_with_manifest_and_skips_bad_files(tmp_path, image_folder):
    out = tmp_path / "out"
    assert main(["images", str(out), str(image_folder), "--max-samples", "4", "--quiet"]) == 0
    m = manifest(out)
    assert m["kind"] == "images" and m["samples"] == 10
    assert [s["samples"] for s in m["shards"]] == [4, 4, 2]
    assert m["skipped"] == {"image_decode": 1}
    for shard in m["shards"]:
        files = members(out / shard["name"])
        assert len(files) == shard["samples"] and all(n.endswith(".jpg") for n in files)
        for data in files.values():
            assert Image.open(io.BytesIO(data)).format == "JPEG"
            assert Image.open(io.BytesIO(data)).mode in ("RGB", "L")


def test_images_keeps_valid_jpegs_byte_for_byte_and_downscales_on_request(tmp_path, image_folder):
    out = tmp_path / "out"
    main(["images", str(out), str(image_folder / "n01"), "--quiet", "--shuffle-seed", "-1"])
    stored = members(out / "images-000000.tar")
    assert next(iter(stored.values())) == (image_folder / "n01" / "0.jpg").read_bytes()
    small = tmp_path / "small"
    main(["images", str(small), str(image_folder / "n01"), "--quiet", "--shorter-side", "20"])
    sizes = {Image.open(io.BytesIO(d)).size for d in members(small / "images-000000.tar").values()}
    assert sizes == {(24, 20)}


def test_images_from_a_list_file_and_byte_limit(tmp_path, image_folder):
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(f"in21k/n01/{i}.jpg" for i in range(4)) + "\nin21k/n01/missing.jpg\n")
    out = tmp_path / "out"
    main(["images", str(out), str(listing), "--max-bytes", "3K", "--quiet"])
    m = manifest(out)
    assert m["samples"] == 4 and m["skipped"] == {"missing_file": 1}
    assert len(m["shards"]) >= 2  # each noise JPEG is ~2-3 KB


def test_segments_hold_at_most_n_words_or_characters():
    text = " ".join(f"w{i}" for i in range(25))
    assert [len(s.split()) for s in split_segments(text, 10)] == [10, 10, 5]
    chars = split_segments("alpha beta gamma delta", 11, unit="chars")
    assert chars == ["alpha beta", "gamma delta"]
    assert split_segments("abcdefghij", 4, unit="chars") == ["abcd", "efgh", "ij"]


def test_texts_from_txt_and_jsonl_split_documents_and_count_bad_lines(tmp_path):
    txt = tmp_path / "docs.txt"
    txt.write_bytes(b"one two three four five\n\n\xff\xfe bad bytes\nsix seven\n")
    jsonl = tmp_path / "docs.jsonl"
    nested = "[" * 100_000  # past the JSON parser's depth: RecursionError
    lines = [json.dumps({"text": "eight nine ten"}), json.dumps({"title": "no text"}), nested, "{not json"]
    jsonl.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["texts", str(out), str(txt), str(jsonl), "--max-units", "3", "--quiet"]) == 0
    m = manifest(out)
    assert m["unit"] == "words" and m["max_units"] == 3
    assert m["skipped"] == {"text_empty": 1, "text_decode": 1, "missing_field": 1, "bad_line": 2}
    texts = [v.decode() for v in members(out / m["shards"][0]["name"]).values()]
    assert texts == ["one two three", "four five", "six seven", "eight nine ten"]


def test_pairs_from_jsonl_and_tsv(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(noise_image(rng, 32, 32, fmt="PNG"))
    jsonl = tmp_path / "index.jsonl"
    rows = [{"image": f"img/{i}.png", "caption": f"picture {i}"} for i in range(3)]
    rows.append({"image": "img/none.png", "caption": "missing file"})
    rows.append({"image": "img/0.png", "caption": "   "})
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    tsv = tmp_path / "index.tsv"
    tsv.write_text("url\tcaption\nimg/1.png\tfrom a tsv\n")
    out = tmp_path / "out"
    assert main(["pairs", str(out), str(jsonl), str(tsv), "--quiet", "--shuffle-seed", "-1"]) == 0
    m = manifest(out)
    assert m["samples"] == 4 and m["skipped"] == {"missing_file": 1, "text_empty": 1}
    files = members(out / m["shards"][0]["name"])
    captions = [v.decode() for k, v in sorted(files.items()) if k.endswith(".txt")]
    assert captions == ["picture 0", "picture 1", "picture 2", "from a tsv"]
    assert sum(k.endswith(".jpg") for k in files) == 4


def test_bad_sources_fail_with_exit_code_2(tmp_path, capsys):
    assert main(["images", str(tmp_path / "o"), str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert "check the path" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": "x.jpg"}) + "\n")
    assert main(["pairs", str(tmp_path / "o"), str(bad), "--quiet"]) == 2
    assert "--image-field" in capsys.readouterr().err


def test_img2dataset_shards_are_read_as_pairs(tmp_path):
    # img2dataset writes {key}.jpg, {key}.txt and {key}.json per sample; some keep the caption in json only.
    rng = np.random.default_rng(2)
    w = ShardWriter(str(tmp_path / "laion"), "00000")
    for i in range(4):
        meta = {"url": f"http://example.com/{i}.jpg", "caption": "a red dog", "status": "success"}
        fields = {"jpg": noise_image(rng, 40, 40), "json": json.dumps(meta).encode()}
        if i % 2 == 0:
            fields["txt"] = b"the cat sat"
        w.write(f"0000{i:05d}", fields)
    w.close()
    cfg = PretrainDataConfig(
        pair_shards=[str(tmp_path / "laion" / "*.tar")],
        img_size=32,
        patch_size=8,
        tokenizer_img_size=16,
        min_num_patches=2,
        pair_text_max_len=16,
        num_workers=0,
        shuffle_buffer=0,
        open_shards=1,
        return_keys=True,
    )
    tok = tiny_tokenizer(str(tmp_path / "spm"))
    loader = build_pretrain_loader(cfg, tok, 0, 0, 4)
    batch = next(iter(loader))
    assert batch["pair"]["keys"] == [f"0000{i:05d}" for i in range(4)]
    assert loader.counters()["skipped/missing_field"] == 0
    original = np.where(
        batch["pair"]["text_labels"] != -100, batch["pair"]["text_labels"], batch["pair"]["text"]
    )
    assert [tok.decode(row.tolist()) for row in original] == ["the cat sat", "a red dog"] * 2


def test_parallel_writing_gives_byte_identical_shards(tmp_path, image_folder):
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        main(["images", str(out), str(image_folder), "--workers", workers, "--max-samples", "3", "--quiet"])
        outs.append(out)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir()) and len(names) == 5  # 4 shards + manifest
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_pairs_count_unusable_index_lines_and_keep_going(tmp_path, capsys):
    """Issue 11 defect 13: one line that is not JSON aborted the whole conversion; a tab inside a tsv caption
    silently cut the caption at the tab."""
    rng = np.random.default_rng(3)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(noise_image(rng, 32, 32, fmt="PNG"))
    lines = [
        json.dumps({"image": "img/a.png", "caption": "first"}),
        "{not json",
        json.dumps(["img/a.png", "a list"]),
        json.dumps({"image": "img/a.png", "caption": None}),
        json.dumps({"caption": "no image"}),
        json.dumps({"image": "img/a.png", "caption": 7}),
        json.dumps({"image": "img/a.png", "caption": "second"}),
    ]
    jsonl = tmp_path / "index.jsonl"
    jsonl.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe not utf-8\n")
    tsv = tmp_path / "index.tsv"
    tsv.write_text("image\tcaption\nimg/a.png\ta dog\tand a cat\nimg/a.png\ta whole caption\n")
    bare = tmp_path / "bare.tsv"
    bare.write_text("img/a.png\tno header\nimg/a.png\tcut\there\nimg/a.png\n")
    out = tmp_path / "out"
    assert main(["pairs", str(out), str(jsonl), str(tsv), str(bare), "--shuffle-seed", "-1"]) == 0
    m = manifest(out)
    assert m["samples"] == 4
    assert m["skipped"] == {"bad_line": 5, "missing_field": 3, "text_decode": 1}
    files = members(out / m["shards"][0]["name"])
    captions = [v.decode() for k, v in sorted(files.items()) if k.endswith(".txt")]
    assert captions == ["first", "second", "a whole caption", "no header"]
    err = capsys.readouterr().err
    assert f"{jsonl}:2: skipped (bad_line" in err  # the first bad lines, named
    assert "'bad_line': 5" in err and "4 samples" in err  # the summary at the end
