"""Finetuning recipes, data sources and batches: strict configs, released JSONL indexes, sharded loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.engine.config_io import ConfigError
from beit3.finetune.data.batches import (
    BatchError,
    BatchLoader,
    Collator,
    images_to_float,
    pad_texts,
    tokenize_split,
)
from beit3.finetune.data.build import shapes_data
from beit3.finetune.data.sources import DataSourceError, Split, load_image, load_jsonl_split
from beit3.finetune.recipe import RECIPE_DIR, load_recipe

RECIPES = sorted(RECIPE_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_validates(path):
    recipe = load_recipe(path)
    assert recipe.train.warmup_steps <= recipe.train.total_steps


def test_released_vqa_recipe_carries_the_released_hyperparameters():
    r = load_recipe("vqav2_base")
    assert (r.train.lr, r.param_groups.head_lr_scale, r.train.weight_decay) == (3e-5, 20.0, 0.01)
    assert r.model.img_size == 480
    assert r.task.num_classes == 3129 and tuple(r.train.betas) == (0.9, 0.98)


def test_unknown_recipe_keys_are_rejected_with_the_known_ones(tmp_path):
    (tmp_path / "r.toml").write_text('[train]\nlearning_rate = 1e-3\n[data]\ntokenizer = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown key.*learning_rate.*known keys"):
        load_recipe(tmp_path / "r.toml")


def test_overrides_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="task.name must be one of"):
        load_recipe("digits_small", ["task.name=segmentation"])
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_recipe("digits_small", ["train.warmup_steps=1000"])
    assert load_recipe("digits_small", ["train.lr=0.01"]).train.lr == 0.01


def test_text_tasks_need_a_tokenizer(tmp_path):
    (tmp_path / "r.toml").write_text('[task]\nname = "vqa"\n[data]\nsource = "shapes"\n')
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_recipe(tmp_path / "r.toml")


def test_transparent_images_are_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2, :, :] = (255, 0, 0, 255)  # opaque red top half, transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "stamp.png")
    img = load_image(tmp_path / "stamp.png", 4)
    assert img.shape == (3, 4, 4) and img.dtype == torch.uint8
    assert img[:, 3, 0].tolist() == [255, 255, 255] and img[:, 0, 0].tolist() == [255, 0, 0]


def test_released_jsonl_index_reads_ids_scores_and_shared_images(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (10, 10), (0, 128, 255)).save(tmp_path / name)
    rows = [
        {"image_path": "a.jpg", "text_segment": [10, 11], "labels": [3, 5], "scores": [1.0, 0.3], "qid": 1},
        {"image_path": "a.jpg", "text_segment": [12], "labels": [], "scores": [], "qid": 2},
        {"image_path": "b.jpg", "text": "a question?", "label": 1},
    ]
    (tmp_path / "idx.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    split = load_jsonl_split(tmp_path / "idx.jsonl", tmp_path, 16)
    assert split.images.shape == (2, 3, 16, 16)  # one bank row per distinct image
    assert [ex["image"] for ex in split.examples] == [0, 0, 1]
    assert split.examples[0]["scores"] == {3: 1.0, 5: 0.3} and split.examples[0]["text"] == [10, 11]
    assert split.examples[2]["text"] == "a question?" and split.examples[2]["label"] == 1
    with pytest.raises(DataSourceError, match="does not exist"):
        load_jsonl_split(tmp_path / "missing.jsonl", tmp_path, 16)


def test_tokenize_split_wraps_ids_in_bos_eos_and_truncates():
    split = Split([{"text": [10, 11, 12, 13, 14]}, {"text": [7]}])
    tokenize_split(split, tokenizer=None, max_text_len=5)
    assert [ex["text"] for ex in split.examples] == [[0, 10, 11, 12, 2], [0, 7, 2]]


def test_images_are_scaled_to_minus_one_one_and_flipped_per_row():
    images = torch.tensor([[[[0, 255]]] * 3, [[[0, 255]]] * 3], dtype=torch.uint8)  # (2, 3, 1, 2)
    x = images_to_float(images, torch.tensor([True, False]))
    assert x[0, 0, 0].tolist() == [1.0, -1.0] and x[1, 0, 0].tolist() == [-1.0, 1.0]


def test_pad_texts_marks_padding():
    ids, pad = pad_texts([[0, 5, 2], [0, 2]])
    assert ids.tolist() == [[0, 5, 2], [0, 2, 1]] and pad.tolist() == [[False] * 3, [False, False, True]]


def test_vqa_collator_builds_dense_soft_scores():
    data = shapes_data(16, "vqa", num_train=3, num_eval=1)
    for ex in data.train.examples:
        ex["text"] = [0, 5, 2]
    batch = Collator("vqa", data.train.images, num_answers=len(data.classes))(data.train.examples[:2], None)
    assert batch["scores"].shape == (2, 6) and batch["scores"].sum(1).tolist() == [1.0, 1.0]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["text"].shape == (2, 3)


def _numbers_split(n: int) -> Split:
    return Split([{"label": i} for i in range(n)])


def _label_collate(examples, generator):
    return {"label": torch.tensor([ex["label"] for ex in examples])}


def test_loader_gives_every_rank_the_same_number_of_disjoint_batches():
    ranks = [BatchLoader(_numbers_split(23), _label_collate, 4, rank=r, world_size=2, seed=1) for r in (0, 1)]
    batches = [[b["label"].tolist() for b in loader] for loader in ranks]
    assert len(batches[0]) == len(batches[1]) == 2
    seen = [x for rank in batches for b in rank for x in b]
    assert len(seen) == len(set(seen)) == 16


def test_loader_resumes_mid_epoch_with_the_same_batches():
    full = [b["label"].tolist() for b in BatchLoader(_numbers_split(20), _label_collate, 4, seed=3)]
    loader = BatchLoader(_numbers_split(20), _label_collate, 4, seed=3)
    it = iter(loader)
    next(it), next(it)
    resumed = BatchLoader(_numbers_split(20), _label_collate, 4, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert [b["label"].tolist() for b in resumed] == full[2:]
    assert resumed.state_dict() == {"epoch": 1, "position": 0}


def test_loader_refuses_a_split_smaller_than_one_batch_per_rank():
    with pytest.raises(BatchError, match="train_micro_batch_size_per_gpu"):
        BatchLoader(_numbers_split(5), _label_collate, 4, world_size=2)
