"""``beit3-shards demo``: a real dataset from pip-installed packages that the loader and tokenizer accept."""

from __future__ import annotations

import json
import tarfile

import pytest

from beit3.pretrain.data import PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.demo_data import build_demo, emoji_caption
from beit3.pretrain.shards import main
from beit3.tokenizers.text import TextTokenizer, train_sentencepiece


def test_emoji_names_become_short_sentences():
    assert emoji_caption(":grinning_face:", 0) == "An emoji of grinning face."
    assert emoji_caption(":red_heart:", 3) == "Red heart, drawn as an emoji."
    assert emoji_caption("\U0001f9ff", 0) is None  # demojize left it unnamed


def _tar_counts(folder):
    counts = {}
    for name in json.loads((folder / "manifest.json").read_text())["shards"]:
        with tarfile.open(folder / name["name"]) as tf:
            counts[name["name"]] = len({m.name.split(".")[0] for m in tf})
    return counts


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = build_demo(str(out), quiet=True, max_samples=100, max_emoji=200)
    return out, summary


def test_demo_writes_three_shard_folders_whose_manifests_match_the_shards(demo):
    out, summary = demo
    for kind in ("images", "texts", "pairs"):
        manifest = json.loads((out / kind / "manifest.json").read_text())
        assert manifest["kind"] == kind and manifest["samples"] == summary[kind]["samples"] > 100
        assert _tar_counts(out / kind) == {s["name"]: s["samples"] for s in manifest["shards"]}
    # skimage photos are in both image kinds, with their docstring captions in the pairs.
    assert summary["images"]["samples"] >= 200 + 15
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == summary["texts"]["samples"]
    assert "Chelsea the cat." in corpus and any("emoji" in line for line in corpus)
    assert any("statement" in line for line in corpus)  # from the Python language reference


def test_the_loader_and_tokenizer_accept_the_demo(demo, tmp_path):
    out, _ = demo
    model = train_sentencepiece([str(out / "corpus.txt")], str(tmp_path / "spm"), 500)
    tok = TextTokenizer(model)
    cfg = PretrainDataConfig(
        image_shards=[str(out / "images")],
        text_shards=[str(out / "texts")],
        pair_shards=[str(out / "pairs")],
        img_size=64,
        patch_size=16,
        tokenizer_img_size=64,
        min_num_patches=2,
        num_workers=0,
        text_max_len=64,
        pair_text_max_len=32,
    )
    loader = build_pretrain_loader(cfg, tok, 4, 4, 4)
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
    counts = loader.counters()
    assert all(v == 0 for k, v in counts.items() if k.startswith("skipped/"))
    assert counts["samples/pair"] == 12
    assert (batch["text"]["text_padding_mask"].sum(1) < 64).all()


@pytest.mark.slow
def test_full_demo_from_the_command_line(tmp_path):
    assert main(["demo", str(tmp_path / "demo"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert summary["images"]["samples"] > 4000 and summary["pairs"]["samples"] > 3900
    assert summary["texts"]["samples"] > 5000 and summary["images"]["shards"] > 1
