"""Semantic segmentation: mIoU and pixel accuracy checked by hand, ADE20K's label convention and layout, the
joint image + label-map views, sliding-window inference, the optimizer groups, and a tiny model finetuned
end to end on 2 CPU ranks through ``beit3-finetune`` (its evaluation equal to one process's)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_helpers import finetune_on_two_ranks, tensorboard_run
from PIL import Image

from beit3.finetune.data.sources import DataSourceError
from beit3.finetune.dense.seg_metrics import confusion_matrix, segmentation_scores

REPO = Path(__file__).resolve().parents[1]
# Classes 1..3 of the generated ADE20K-layout folder (0: "other", ignored), each a colour on white.
COLOURS = {1: (220, 30, 30), 2: (30, 170, 40), 3: (30, 60, 220)}


def write_ade20k(root: Path, train: int = 8, val: int = 3, seed: int = 0) -> Path:
    """An ``ADEChallengeData2016`` folder: 64x64 training and 48x80 validation images, each with one 16x16
    rectangle of every class on white (label 0), and their uint8 label PNGs."""
    g = np.random.default_rng(seed)
    for split, n, (h, w) in (("training", train, (64, 64)), ("validation", val, (48, 80))):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = np.full((h, w, 3), 255, np.uint8), np.zeros((h, w), np.uint8)
            for c, colour in COLOURS.items():
                y, x = g.integers(0, h - 16), g.integers(0, w - 16)
                image[y : y + 16, x : x + 16], label[y : y + 16, x : x + 16] = colour, c
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.png")  # lossless: exact colours
            Image.fromarray(label).save(root / "annotations" / split / f"{name}.png")
    return root


# ----- metrics, by hand ------------------------------------------------------------------------------------
def test_miou_and_pixel_accuracy_match_a_hand_computed_fixture():
    # 4 classes; class 3 appears in neither map (no IoU: left out of the mean); 255 ignored.
    target = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 2, 255]])
    prediction = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 3], [1, 2, 2, 0]])
    m = confusion_matrix(prediction, target, num_classes=4)
    # By hand over the 10 labelled pixels: class 0 TP 2 FN 1 (a 1) FP 1 (a 2 read as 0): IoU 2/4;
    # class 1 TP 3 FN 1 FP 1: 3/5; class 2 TP 2 FN 1 FP 1: 2/4; class 3: absent from both.
    assert m.tolist() == [[2, 1, 0, 0], [0, 3, 1, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(m)
    assert scores["miou"] == pytest.approx((2 / 4 + 3 / 5 + 2 / 4) / 3)
    assert scores["pixel_acc"] == pytest.approx(7 / 10)
    assert scores["macc"] == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)
    # A class predicted but never labelled counts with IoU 0 (its false positives are real errors).
    prediction[1, 3] = 3  # an ignored pixel: nothing changes
    assert confusion_matrix(prediction, target, 4).equal(m)
    prediction[0, 0] = 3  # class 0 now TP 1, FN 2, FP 1: 1/4; class 3 TP 0, FP 1: 0
    assert segmentation_scores(confusion_matrix(prediction, target, 4))["miou"] == pytest.approx(
        (1 / 4 + 3 / 5 + 2 / 4 + 0) / 4
    )


def test_confusion_matrices_of_parts_sum_to_the_whole_and_bad_labels_are_refused():
    g = torch.Generator().manual_seed(0)
    target, prediction = (torch.randint(0, 5, (2, 7, 9), generator=g) for _ in range(2))
    target[0, :2] = 255
    whole = confusion_matrix(prediction, target, 5)
    assert whole.sum() == target.ne(255).sum()
    parts = [confusion_matrix(prediction[i : i + 1], target[i : i + 1], 5) for i in range(2)]
    assert (parts[0] + parts[1]).equal(whole)
    with pytest.raises(ValueError, match=r"in \[0, 5\)"):
        confusion_matrix(prediction, torch.full_like(target, 7), 5)


def test_reduce_zero_label_ignores_other_and_shifts_the_classes(tmp_path):
    from beit3.finetune.dense.data import read_label_map

    path = tmp_path / "label.png"
    Image.fromarray(np.array([[0, 1, 150, 255]], np.uint8)).save(path)
    assert read_label_map(path, reduce_zero_label=True).tolist() == [[255, 0, 149, 255]]
    assert read_label_map(path, reduce_zero_label=False).tolist() == [[0, 1, 150, 255]]
    with pytest.raises(DataSourceError, match="class 149 beyond the 100 classes"):
        read_label_map(path, reduce_zero_label=True, num_classes=100)


# ----- data: layout, views, batches ------------------------------------------------------------------------
def _recipe(root: Path, **segmentation):
    from beit3.finetune.recipe import FinetuneRecipe

    r = FinetuneRecipe()
    r.task.name, r.model.name, r.model.drop_path_rate = "semantic_segmentation", "beit3_tiny_patch16_64", 0.0
    r.data.source, r.data.root, r.data.hflip = "ade20k", str(root), True
    r.segmentation.head_channels = 32
    r.model.overrides = {
        "vocab_size": 48
    }  # a small text table: the vision encoder prunes it, but builds it first
    for k, v in segmentation.items():
        setattr(r.segmentation, k, v)
    return r


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def test_the_ade20k_layout_loads_with_classes_from_the_data(ade, tmp_path):
    from beit3.finetune.data.build import load_task_data
    from beit3.finetune.data.sources import LazyImages

    data = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(ade))
    assert data.classes == ["0", "1", "2"]  # labels 1..3 after reducing the zero label
    assert len(data.train.examples) == 8 and len(data.eval.examples) == 3
    assert isinstance(data.train.images, LazyImages)  # decoded in the loader's workers
    assert data.train.examples[0]["label_path"].endswith("annotations/training/ADE_training_00000000.png")
    (tmp_path / "classes.json").write_text(json.dumps(["red", "green", "blue"]))  # beside the folder
    root = write_ade20k(tmp_path / "ADEChallengeData2016", train=1, val=1)
    named = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(root))
    assert named.classes == ["red", "green", "blue"]
    (root / "annotations" / "validation" / "ADE_validation_00000000.png").unlink()
    with pytest.raises(DataSourceError, match="1 of 1 label maps missing"):
        load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(root))
    with pytest.raises(DataSourceError, match="ADEChallengeData2016 folder"):
        load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(tmp_path))


def test_training_views_move_the_label_map_with_the_image_and_repeat_with_the_seed(ade):
    from beit3.finetune.data.batches import Collator
    from beit3.finetune.data.build import load_task_data

    data = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(ade, photometric=False))
    collate = Collator("semantic_segmentation", data.train.images)
    batch = collate(data.train.examples[:4], torch.Generator().manual_seed(3))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["label_map"].shape == (4, 64, 64)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    labels, pixels = batch["label_map"], ((batch["image"] + 1) * 127.5).round()
    for c, colour in COLOURS.items():  # pixels of class c (resized, cropped, flipped) have c's colour
        inside = labels == c - 1
        assert inside.any()
        near = (pixels.permute(0, 2, 3, 1)[inside] - torch.tensor(colour)).abs().amax(-1) <= 40
        assert near.float().mean() > 0.8  # all but edges (nearest labels beside antialiased pixels)
    assert labels.unique().tolist() <= [0, 1, 2, 255]
    again = collate(data.train.examples[:4], torch.Generator().manual_seed(3))
    assert again["image"].equal(batch["image"]) and again["label_map"].equal(labels)
    other = collate(data.train.examples[:4], torch.Generator().manual_seed(4))
    assert not other["image"].equal(batch["image"])
    # Colour jitter (drawn after the geometry) changes the image only: the first view's labels are the same
    # (its geometry drawn first; later views' draws shift), its pixels are not.
    jittered = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(ade, photometric=True))
    coloured = Collator("semantic_segmentation", jittered.train.images)(
        data.train.examples[:4], torch.Generator().manual_seed(3)
    )
    assert coloured["label_map"][0].equal(labels[0]) and not coloured["image"][0].equal(batch["image"][0])


def test_evaluation_batches_keep_the_label_maps_at_their_own_size(ade):
    from beit3.finetune.data.batches import Collator
    from beit3.finetune.data.build import load_task_data

    data = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(ade))
    batch = Collator("semantic_segmentation", data.eval.images)(data.eval.examples[:2], None)
    assert batch["image"].shape == (2, 3, 64, 106)  # 48x80, shorter side at the crop: 80 x 64 / 48, floored
    assert batch["image_size"].tolist() == [[64, 106], [64, 106]]
    assert batch["label_map"].shape == (2, 48, 80) and batch["label_size"].tolist() == [[48, 80]] * 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("segmentation.eval_stride=200", "segmentation.eval_stride=200 exceeds the crop 128"),
        ("segmentation.backbone.out_layers=[0, 1, 2, 9]", r"segmentation.backbone.out_layers \[0, 1, 2, 9\]"),
        ("segmentation.scale_min=3.0", "segmentation.scale_min must not exceed segmentation.scale_max"),
    ],
)
def test_segmentation_settings_the_model_cannot_take_are_refused_without_data(override, message):
    from beit3.engine.config_io import ConfigError
    from beit3.finetune.recipe import load_recipe, validate_run

    ds_config = json.loads((REPO / "ds_configs" / "zero0_fp32.json").read_text())
    validate_run(load_recipe("ade20k_small"), ds_config, 1)
    with pytest.raises(ConfigError, match=message):
        validate_run(load_recipe("ade20k_small", [override]), ds_config, 1)


# ----- the task model --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task():
    """A tiny segmentation model: 3 classes, head width 32 (tests that change it restore it)."""
    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.tasks.segmentation import SemanticSegmentation

    torch.manual_seed(0)
    encoder = build_encoder(
        "beit3_tiny_patch16_64", "vision", normalize_output=False, drop_path_rate=0.0, vocab_size=48
    )
    return SemanticSegmentation(encoder, 3, channels=32)


def test_sliding_windows_cover_the_image_and_average_where_they_overlap(task, monkeypatch):
    seen = []

    def first_channel(windows):  # logits = the window's own pixels: stitching must give the image back
        seen.append(windows.shape[0])
        return windows[:, :1].expand(-1, 3, -1, -1) + 0.0

    monkeypatch.setattr(task, "logits", first_channel)
    monkeypatch.setattr(task, "eval_stride", 24)
    image = torch.randn(3, 64, 107)
    torch.testing.assert_close(task.slide_logits(image), image[:1].expand(3, -1, -1))
    assert seen == [3]  # one row; columns 0, 24 and the last flush with the edge, 43
    small = torch.randn(3, 40, 50)  # smaller than the crop: padded, then cut back
    torch.testing.assert_close(task.slide_logits(small), small[:1].expand(3, -1, -1))


def test_layer_decay_applies_to_the_encoder_and_the_head_takes_its_own_scale(task, monkeypatch):
    from beit3.finetune.tasks.base import OptimSettings

    monkeypatch.setattr(task, "optim", OptimSettings(0.05, 0.5, 10.0))
    scale = {id(p): g["lr_scale"] for g in task.param_groups() for p in g["params"]}
    named = dict(task.named_parameters())
    depth = task.cfg.depth
    assert scale[id(named["backbone.beit3.encoder.layers.0.ffn.A.fc1.weight"])] == pytest.approx(0.5**depth)
    assert scale[id(named["backbone.pyramid.project.p2.0.weight"])] == 1.0
    head = [n for n in named if n.startswith("decode_head.")]
    assert head and all(scale[id(named[n])] == 10.0 for n in head)


def test_a_training_step_reaches_every_parameter_and_counts_the_head_flops(task):
    from torch.utils.flop_counter import FlopCounterMode

    task.zero_grad()
    batch = {"image": torch.randn(2, 3, 64, 64), "label_map": torch.full((2, 64, 64), 255)}
    batch["label_map"][:, :8] = 1
    loss, metrics = task(batch)
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= metrics["acc/pixel"] <= 1.0
    assert all(p.grad is not None for p in task.parameters())  # every parameter in every step (ZeRO-3)
    none_labelled = {"image": batch["image"], "label_map": torch.full((2, 64, 64), 255)}
    assert task(none_labelled)[0].item() == 0.0  # not NaN: a crop of "other" only
    # The head's multiply-adds per 64 px image (head width 32; p2..p5 16, 8, 4, 2 px): the FPN's 1x1
    # laterals and 3x3s at each level, the fuse 3x3 over 4 x 32 channels and the classifier to 3 classes at
    # p2; x2 (multiply, add) x3 (forward, backward).
    head = 340 * 32 * 32 + 340 * 9 * 32 * 32 + 256 * 9 * 128 * 32 + 256 * 32 * 3
    assert task.head_flops(batch) == 2 * 6 * head
    feats = task.backbone(batch["image"][:1])
    with FlopCounterMode(display=False) as counter:  # torch's count of one image's head forward
        task.decode_head(feats)
    assert task.head_flops(batch) == 2 * 3 * counter.get_total_flops()
    stats = task.batch_stats(batch)
    assert stats["flops"] == task.backbone.training_flops(2, 64, 64) + task.head_flops(batch)
    assert stats["samples"] == 2 and stats["tokens"] == 2 * (16 + 1)


def test_a_pretrained_checkpoint_loads_into_the_encoder_and_the_pyramid_is_reported_fresh(ade, tmp_path):
    from beit3.finetune.builder import build_task
    from beit3.model import build_model, save_checkpoint

    torch.manual_seed(1)
    pretrained = build_model("beit3_tiny_patch16_64", pretraining_heads=True, vocab_size=48)
    recipe = _recipe(ade)
    recipe.model.pretrained = str(save_checkpoint(pretrained, tmp_path / "pretrained.pth"))
    task, report = build_task(recipe, ["0", "1", "2"])
    key = "beit3.encoder.layers.1.self_attn.q_proj.A.weight"
    assert task.backbone.state_dict()[key].equal(pretrained.state_dict()[key])
    assert key in report.loaded and any(k.startswith("pyramid.") for k in report.fresh)
    assert not any(k.startswith("beit3.") for k in report.fresh)  # every encoder weight came from the file


def test_gathered_results_come_back_one_per_example_in_example_order(ade, task):
    from beit3.finetune.data.build import load_task_data
    from beit3.finetune.evaluate import EvalContext
    from beit3.finetune.tasks import get_task

    data = load_task_data(None, "semantic_segmentation", 64, recipe=_recipe(ade))
    ev = EvalContext(get_task("semantic_segmentation"), task, data.eval, batch_size=2)
    # 3 examples in batches of 2: the second batch holds one example and a filler, whose result is dropped.
    sums = ev.gathered(lambda batch, real: batch["label_map"].flatten(1).sum(1).tolist())
    from beit3.finetune.dense.data import read_label_map

    assert sums == [int(read_label_map(ex["label_path"], True).sum()) for ex in data.eval.examples]
    assert ev.summed(lambda batch, real: batch["label_size"][:real].sum(0)).tolist() == [3 * 48, 3 * 80]


# ----- end to end: beit3-finetune on 2 CPU ranks ------------------------------------------------------------
RECIPE = """
[task]
name = "semantic_segmentation"
[model]
name = "beit3_tiny_patch16_64"
drop_path_rate = 0.0
overrides = {{vocab_size = 48}}
[data]
source = "ade20k"
root = "{root}"
hflip = true
num_workers = 1
[segmentation]
head_channels = 32
[train]
total_steps = 2
warmup_steps = 1
lr = 1e-3
log_every = 1
save_every = 0
eval_every = 2
[param_groups]
layer_decay = 0.9
"""


@pytest.fixture(scope="module")
def two_rank_run(ade, tmp_path_factory):
    """One 2-rank ``beit3-finetune`` run (torchrun, gloo): 2 steps of batch 2 per rank, then evaluated."""
    tmp = tmp_path_factory.mktemp("seg_run")
    recipe, run = tmp / "recipe.toml", tmp / "run"
    recipe.write_text(RECIPE.format(root=ade))
    finetune_on_two_ranks(recipe, run, "zero0_fp32.json", timeout=240)
    return recipe, run


@pytest.mark.multiprocess
def test_segmentation_finetunes_on_two_ranks_and_logs_miou_and_pixel_accuracy(two_rank_run):
    _, run = two_rank_run
    scalars = tensorboard_run(run)
    losses = list(scalars["loss/seg"].values())
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert set(scalars["eval/miou"]) == {2} and set(scalars["eval/pixel_acc"]) == {2}
    scores = json.loads((run / "eval.json").read_text())
    assert 0.0 <= scores["eval/miou"] <= 1.0 and 0.0 <= scores["eval/pixel_acc"] <= 1.0
    assert json.loads((run / "classes.json").read_text())["classes"] == ["0", "1", "2"]


@pytest.mark.multiprocess
def test_two_rank_evaluation_equals_one_process_on_the_exported_model(two_rank_run):
    from beit3.finetune.evaluate import evaluate
    from beit3.finetune.recipe import load_recipe
    from beit3.finetune.reload import load_finetuned
    from beit3.finetune.train import build_run

    recipe_path, run = two_rank_run
    recipe = load_recipe(recipe_path)
    _, data, task = build_run(recipe, train=False, classes=["0", "1", "2"])
    load_finetuned(task, run / "model.pth")
    one = evaluate("semantic_segmentation", task, data.eval, 2)
    two = json.loads((run / "eval.json").read_text())
    # 3 images on 2 ranks (batch 2: rank 1 holds one image and a filler): the summed confusion matrix is
    # the one process's, so the scores are equal, not merely close.
    assert {k: two[k] for k in one} == one
