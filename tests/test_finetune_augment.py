"""The released finetuning recipes' training details (issue 14 item 3): timm's training transforms where the
images are decoded, the crop_pct evaluation view, Mixup/CutMix with soft targets, batches reproducible per key
(workers or not, resumed or not), captioning's drop-worst loss, and tiny finetuning runs with all of it on."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from beit3.engine.config_io import ConfigError
from beit3.finetune.data.augment import (
    AugmentError,
    MixupSettings,
    TrainTransform,
    eval_view,
    require,
    seeded,
)
from beit3.finetune.data.batches import BatchLoader, Collator
from beit3.finetune.data.build import load_task_data, make_shapes_split
from beit3.finetune.data.sources import LazyImages, load_image, load_jsonl_split

SIZE = 32


@pytest.fixture(autouse=True)
def real_timm(monkeypatch):
    """tests/reference_impl.py may have left its stand-in ``timm`` (for torchscale) in sys.modules: these
    tests need the real one."""
    import sys

    if getattr(sys.modules.get("timm"), "_beit3_shim", False):
        for name in ("timm", "timm.models", "timm.models.layers"):
            monkeypatch.delitem(sys.modules, name, raising=False)


def fixture_image(width: int = 50, height: int = 37) -> Image.Image:
    """A picture whose every crop, flip and resize shows: a colour gradient with a dark corner block."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    rgb[: height // 3, : width // 4] = 0
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def plain(image: Image.Image) -> torch.Tensor:
    """The square resize in [-1, 1] (no augmentation)."""
    return torch.from_numpy(np.asarray(eval_view(image, SIZE)).copy()).permute(2, 0, 1).float() / 127.5 - 1


def run(transform: TrainTransform, image: Image.Image, seed: int) -> torch.Tensor:
    with seeded(seed):
        return transform(image)


# ----- the transforms -----------------------------------------------------------------------------------
def test_random_resized_crop_and_flip_give_normalised_crops_that_differ_from_the_resize():
    image = fixture_image()
    crop = TrainTransform(SIZE, 0.08)
    outs = [run(crop, image, s) for s in range(6)]
    assert all(o.shape == (3, SIZE, SIZE) and o.dtype == torch.float32 for o in outs)
    assert all(o.min() >= -1.0 and o.max() <= 1.0 for o in outs)  # [-1, 1] (mean = std = 0.5)
    assert all(not torch.allclose(o, plain(image), atol=0.05) for o in outs)  # a crop, not the resize
    assert torch.equal(run(crop, image, 3), outs[3]) and not torch.equal(
        outs[3], outs[4]
    )  # a function of the seed
    # The flip draws from torch, the crop from python's random: same seed, same crop, mirrored or not.
    flipped = [run(TrainTransform(SIZE, 0.08, hflip=True), image, s) for s in range(6)]
    mirrored = [torch.equal(f, o.flip(-1)) for f, o in zip(flipped, outs)]
    assert all(m or torch.equal(f, o) for m, f, o in zip(mirrored, flipped, outs))
    assert 0 < sum(mirrored) < 6


def test_randaugment_changes_the_crop_and_random_erasing_at_probability_one_erases_a_rectangle():
    image = fixture_image()
    crop = TrainTransform(SIZE, 0.5)
    augmented = TrainTransform(SIZE, 0.5, randaug="rand-m9-mstd0.5-inc1")
    assert any(not torch.equal(run(crop, image, s), run(augmented, image, s)) for s in range(4))
    white = Image.new("RGB", (40, 30), (255, 255, 255))
    assert torch.equal(run(TrainTransform(SIZE, 0.5), white, 0), torch.ones(3, SIZE, SIZE))
    erased = run(TrainTransform(SIZE, 0.5, reprob=1.0), white, 0)
    changed = (erased != 1.0).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert 0 < changed.sum() < SIZE * SIZE and box.float().mean() > 0.95  # per-pixel noise in one box
    assert erased.std() > 0.1


def test_randaugment_at_magnitude_ten_posterizes_to_black_instead_of_failing():
    """The ImageNet recipe's increasing posterize keeps 0 bits at magnitude 10 (m9 + noise reaches it): Pillow
    13 refuses that, which ended a finetuning run within a few dozen batches; it is the black image that
    older Pillow gave. Every op at magnitude 10, many times, runs through."""
    from PIL import ImageOps

    from beit3.finetune.data.augment import posterize

    image = fixture_image()
    assert posterize(image, 0).getextrema() == ((0, 0),) * 3 and posterize(image, 8) is image
    assert posterize(image, 3).tobytes() == ImageOps.posterize(image, 3).tobytes()
    strongest = TrainTransform(SIZE, 0.5, randaug="rand-n3-m10-mstd0-inc1")
    for seed in range(60):  # 180 ops drawn from 15: posterize at 0 bits about 12 times
        assert run(strongest, image, seed).shape == (3, SIZE, SIZE)


def test_the_crop_pct_evaluation_view_is_torchvisions_resize_and_center_crop(tmp_path):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, PILToTensor, Resize

    fixture_image().save(tmp_path / "a.png")
    for crop_pct in (0.875, 1.0):
        reference = Compose(
            [Resize(int(SIZE / crop_pct), InterpolationMode.BICUBIC), CenterCrop(SIZE), PILToTensor()]
        )
        want = reference(Image.open(tmp_path / "a.png").convert("RGB"))
        assert torch.equal(load_image(tmp_path / "a.png", SIZE, crop_pct), want)
        assert torch.equal(LazyImages([str(tmp_path / "a.png")], SIZE, crop_pct)[0], want)
    square = torch.from_numpy(np.asarray(fixture_image().resize((SIZE, SIZE), Image.BICUBIC)).copy())
    assert torch.equal(load_image(tmp_path / "a.png", SIZE), square.permute(2, 0, 1))  # crop_pct 0: as before


def test_crop_pct_gives_an_in_memory_eval_bank_its_view_and_leaves_the_train_bank(tmp_path):
    from beit3.finetune.recipe import DataSection

    base = load_task_data(DataSection(source="shapes", max_train=4, max_eval=4), "image_classification", SIZE)
    cropped = load_task_data(
        DataSection(source="shapes", max_train=4, max_eval=4, crop_pct=0.5), "image_classification", SIZE
    )
    assert torch.equal(base.train.images, cropped.train.images)
    assert cropped.eval.images.shape == base.eval.images.shape and cropped.eval.images.dtype == torch.uint8
    assert not torch.equal(base.eval.images, cropped.eval.images)


def test_mixup_mixes_two_labels_with_targets_summing_to_one_and_cutmix_pastes_the_partner():
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    mix = MixupSettings(0.8, 0.0, 1.0, 0.5, "batch", 0.1, 4)
    with seeded(1):
        mixed, target = mix.apply(x.clone(), labels)
    assert target.shape == (4, 4) and torch.allclose(target.sum(1), torch.ones(4))
    assert all(
        set(t.topk(2).indices.tolist()) == {i, 3 - i} for i, t in enumerate(target)
    )  # partner: flipped
    off = 0.1 / 4
    lam = float((target[0, 0] - off) / (1 - 0.1))
    assert 0 < lam < 1 and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-5)
    cut = MixupSettings(0.0, 1.0, 1.0, 0.5, "batch", 0.1, 4)
    with seeded(2):
        pasted, target = cut.apply(x.clone(), labels)
    own, partner = pasted == x, pasted == x.flip(0)
    assert (own | partner).all() and partner.any() and own.any()
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_soft_target_cross_entropy_is_the_released_loss_and_plain_cross_entropy_on_one_hot():
    from beit3.finetune.tasks.classification import soft_target_cross_entropy

    logits, labels = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2])
    target = torch.softmax(torch.randn(5, 7), -1)
    reference = torch.stack([-(target[i] * torch.log_softmax(logits[i], 0)).sum() for i in range(5)]).mean()
    assert torch.allclose(soft_target_cross_entropy(logits, target), reference)
    one_hot = F.one_hot(labels, 7).float()
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))


# ----- reproducible batches -------------------------------------------------------------------------------
IMAGENET_TRANSFORM = TrainTransform(SIZE, 0.08, True, "rand-m9-mstd0.5-inc1", 0.4, 0.25)  # released settings
IMAGENET_MIXUP = MixupSettings(0.8, 1.0, 1.0, 0.5, "batch", 0.1, 4)


def _collator(split) -> Collator:
    return Collator("image_classification", split.images, transform=IMAGENET_TRANSFORM, mixup=IMAGENET_MIXUP)


def _batches(loader, n: int | None = None) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]


def test_augmented_batches_are_a_function_of_their_key_and_leave_the_global_rngs_alone():
    split = make_shapes_split(12, SIZE, seed=0)
    for ex in split.examples:
        ex.pop("scores")
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = _batches(BatchLoader(split, _collator(split), 4, seed=3))
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])  # the training's RNG streams are not disturbed
    _same(first, _batches(BatchLoader(split, _collator(split), 4, seed=3)))
    assert first[0]["image"].shape == (4, 3, SIZE, SIZE) and first[0]["target"].shape == (4, 4)
    assert not torch.equal(first[0]["image"], first[1]["image"])
    other = _batches(BatchLoader(split, _collator(split), 4, seed=4))
    assert not torch.equal(first[0]["target"], other[0]["target"])


def _write_index(root, n: int) -> str:
    rows = []
    for i in range(n):
        fixture_image(30 + i % 7, 24 + i % 5).rotate(30 * i).save(root / f"im{i}.png")
        rows.append({"image_path": f"im{i}.png", "label": i % 4})
    (root / "idx.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "idx.jsonl")


def test_worker_and_in_process_augmented_batches_are_equal_and_resume_exactly(tmp_path):
    split = load_jsonl_split(_write_index(tmp_path, 18), tmp_path, SIZE)

    def loader(workers: int) -> BatchLoader:
        return BatchLoader(split, _collator(split), 4, seed=5, num_workers=workers)

    plain_run = loader(0)
    expected = _batches(plain_run) + _batches(plain_run)  # two epochs of 4 batches
    got = loader(2)
    _same(expected, _batches(got) + _batches(got))
    interrupted = loader(2)
    _batches(interrupted, 3)
    resumed = loader(2)
    resumed.load_state_dict(interrupted.state_dict())
    _same(expected[3:], _batches(resumed) + _batches(resumed))


def test_batches_carry_their_optimizer_step_when_asked():
    split = make_shapes_split(8, SIZE, seed=0)
    split.examples = split.examples[::2]  # one per image
    collate = Collator("image_classification", split.images)
    loader = BatchLoader(split, collate, 2, micro_batches_per_step=3)
    steps = [b["step"] for b in _batches(loader) + _batches(loader)]  # 2 epochs of 4 micro-batches
    assert steps == [0, 0, 0, 1, 1, 1, 2, 2]
    loader.start_at(6)
    assert [b["step"] for b in _batches(loader)] == [2, 2]
    assert "step" not in next(iter(BatchLoader(split, collate, 2)))


# ----- captioning's drop-worst loss -----------------------------------------------------------------------
def _reference_token_losses(logits, labels, eps):
    """Per-token KL(smoothed one-hot || softmax), by torch's kl_div."""
    c = logits.shape[-1]
    target = torch.full_like(logits, eps / (c - 1)).scatter_(1, labels[:, None], 1 - eps)
    return F.kl_div(torch.log_softmax(logits, -1), target, reduction="none").sum(-1)


def test_drop_worst_keeps_the_lowest_share_of_the_token_losses():
    from beit3.finetune.tasks.captioning import drop_worst, label_smoothed_loss

    logits, labels = torch.randn(11, 9), torch.randint(0, 9, (11,))
    per_token = label_smoothed_loss(logits, labels, 0.1, reduce=False)
    reference = _reference_token_losses(logits, labels, 0.1)
    assert torch.allclose(per_token, reference, atol=1e-6)
    kept = drop_worst(per_token, 0.2)
    assert kept.numel() == int(11 * 0.8) == 8
    assert torch.allclose(kept.mean(), reference.sort().values[:8].mean(), atol=1e-6)


def test_the_captioning_loss_drops_its_worst_tokens_from_the_configured_step_on():
    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.tasks.captioning import Captioning, mask_captions

    torch.manual_seed(0)
    task = Captioning(
        build_encoder("beit3_tiny_patch16_64", "seq2seq", vocab_size=40, max_text_positions=20)
    ).eval()
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 17, 2], [0, 20, 21, 22, 23, 24, 25, 2, 1, 1]])
    batch = {"image": torch.rand(2, 3, 64, 64) * 2 - 1, "text_padding_mask": ids == 1}
    batch.update(mask_captions(ids, ids == 1, 0.6, 39, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        full, _ = task(batch)
        h = task.hidden(batch["image"], batch["text"], batch["text_padding_mask"])
        logits = task.mlm_head(h[batch["masked"]])
    losses = _reference_token_losses(logits, batch["labels"][batch["masked"]], 0.1)
    assert torch.allclose(full, losses.mean(), atol=1e-5)
    task.set_drop_worst(0.5, after=3)
    with torch.no_grad(), pytest.raises(ValueError, match="step"):
        task(batch)
    with torch.no_grad():
        before, _ = task({**batch, "step": 2})
        after, _ = task({**batch, "step": 3})
    keep = int(losses.numel() * 0.5)
    assert torch.allclose(before, full) and torch.allclose(
        after, losses.sort().values[:keep].mean(), atol=1e-5
    )
    assert after < full


# ----- recipe settings --------------------------------------------------------------------------------------
def _recipe(*overrides: str):
    from beit3.finetune.recipe import load_recipe

    return load_recipe("imagenet1k_base", list(overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.randaug=rand-x9"], "data.randaug must be a timm RandAugment string"),
        (
            ["data.crop_scale=0"],
            "data.randaug, data.color_jitter, data.reprob run in timm's training transform",
        ),
        (["data.mixup_mode=row"], "data.mixup_mode must be one of"),
        (["task.name=vqa", "data.tokenizer=x.spm"], "image_classification only, not 'vqa'"),
        (["task.name=text_classification", "data.tokenizer=x.spm"], "has no images to augment"),
        (["captioning.drop_worst_ratio=0.2"], "captioning.drop_worst_ratio applies to the captioning loss"),
        (["data.reprob=1.5"], "data.reprob=1.5 is out of range"),
    ],
)
def test_augmentation_settings_are_checked_with_the_fix_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _recipe(*overrides)


def test_mixup_needs_an_even_micro_batch():
    from beit3.finetune.recipe import validate_run

    config = {"train_batch_size": 1024, "train_micro_batch_size_per_gpu": 1}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=1 must be even"):
        validate_run(_recipe(), config, 1024)
    assert validate_run(_recipe("data.mixup=0", "data.cutmix=0"), config, 1024)["train_batch_size"] == 1024


def test_the_shipped_recipes_build_the_released_transforms():
    from beit3.finetune.recipe import load_recipe
    from beit3.finetune.train import augmentation

    transform, mixup = augmentation(load_recipe("imagenet1k_base"), 224, 1000)
    steps = repr(transform.pipeline())
    assert (
        "scale=(0.08, 1.0)" in steps and "interpolation=bicubic" in steps and "RandomHorizontalFlip" in steps
    )
    assert (
        "RandAugment(n=2" in steps
        and "m=9, mstd=0.5" in steps
        and "RandomErasing(p=0.25, mode=pixel" in steps
    )
    assert "ColorJitter" not in steps  # timm leaves colour jitter out beside RandAugment, as the release ran
    assert mixup == MixupSettings(0.8, 1.0, 1.0, 0.5, "batch", 0.1, 1000)
    transform, mixup = augmentation(load_recipe("vqav2_base"), 480, 3129)
    steps = repr(transform.pipeline())
    assert "scale=(0.5, 1.0)" in steps and "RandAugment(n=2" in steps and "m=7" in steps and mixup is None
    assert "RandomErasing" not in steps
    assert augmentation(load_recipe("digits_small"), 64, 10) == (None, None)  # the small recipes stay fast


def test_missing_libraries_are_named_by_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setitem(sys.modules, "timm.data", None)
    with pytest.raises(AugmentError, match=r"pip install -e '\.\[augment\]'"):
        require()


# ----- tiny finetuning runs with augmentation and activation checkpointing ----------------------------------
@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    from tiny_data import shapes_spm

    from beit3.engine.launch import init_distributed

    init_distributed()
    return shapes_spm(tmp_path_factory.mktemp("spm"))


def _finetune(
    tmp_path, spm, task: str, settings: list[str], steps: int = 2, run: str = "run", micro: int = 4
):
    from tiny_data import shapes_recipe

    from beit3.finetune.train import main

    recipe = shapes_recipe(tmp_path / f"{task}.toml", spm, task, train={"warmup_steps": 1, "save_every": 2})
    args = ["--config", recipe, "--ds-config", "ds_configs/zero0_fp32.json",
            "--output-dir", str(tmp_path / run), "--ds-set", f"train_micro_batch_size_per_gpu={micro}",
            "--set", f"train.total_steps={steps}", "--set", "model.grad_checkpointing=all",
            "--set", "train.ema_decay=0.5"]  # fmt: skip
    for s in settings:
        args += ["--set", s]
    assert main(args) == 0
    return tmp_path / run


VL_AUGMENT = ["data.crop_scale=0.5", "data.hflip=true", "data.randaug=rand-n2-m7"]


def test_an_imagenet_style_recipe_finetunes_with_mixup_and_resumes_to_the_same_losses(
    tmp_path, spm, monkeypatch
):
    """The released ImageNet augmentation (crop 0.08, RandAugment, erasing, Mixup/CutMix, crop_pct) on a
    released-format index decoded in 2 workers: 3 steps straight, and 2 + a resume to 3, give equal losses."""
    from engine_helpers import tensorboard_scalars

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    index = _write_index(tmp_path, 16)
    settings = ["data.source=jsonl", f"data.root={tmp_path}", f"data.train={index}", f"data.eval={index}",
                "data.max_eval=6", "data.eval_batch_size=3", "data.num_workers=2", "data.hflip=true",
                "data.crop_scale=0.08", "data.randaug=rand-m9-mstd0.5-inc1", "data.color_jitter=0.4",
                "data.reprob=0.25", "data.mixup=0.8", "data.cutmix=1.0", "data.crop_pct=0.875",
                "task.label_smoothing=0.1"]  # fmt: skip
    straight = _finetune(tmp_path, spm, "image_classification", settings, steps=3, run="straight")
    _finetune(tmp_path, spm, "image_classification", settings, steps=2, run="resumed")
    _finetune(tmp_path, spm, "image_classification", settings, steps=3, run="resumed")
    losses = tensorboard_scalars(straight, "loss/cls")
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    assert tensorboard_scalars(tmp_path / "resumed", "loss/cls") == losses
    report = json.loads((straight / "eval.json").read_text())
    assert 0.0 <= report["eval/accuracy"] <= 1.0 and 0.0 <= report["ema/eval/accuracy"] <= 1.0
    # The EMA of the weights went through the resume: the exported averages are the uninterrupted run's.
    ema, resumed_ema = (
        torch.load(r / "ema_model.pth", weights_only=True)["model"] for r in (straight, tmp_path / "resumed")
    )
    assert ema.keys() == resumed_ema.keys() and all(torch.equal(ema[k], resumed_ema[k]) for k in ema)
    trained = torch.load(straight / "model.pth", weights_only=True)["model"]
    assert ema.keys() == trained.keys()
    assert not torch.equal(ema["head.weight"], trained["head.weight"])  # an average, not the last weights


def test_a_vqa_recipe_finetunes_with_the_vision_language_augmentation(tmp_path, spm, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = []
    original = TrainTransform.__call__
    monkeypatch.setattr(
        TrainTransform, "__call__", lambda self, image: calls.append(1) or original(self, image)
    )
    keep = ["train.eval_every=1", "train.best_metric=ema/eval/vqa_score"]  # the best by the EMA's score
    run = _finetune(tmp_path, spm, "vqa", [*VL_AUGMENT, "data.max_eval=4", *keep])
    assert len(calls) == 2 * 4  # every training image of the 2 steps went through the transform
    report = json.loads((run / "eval.json").read_text())
    assert "eval/vqa_score" in report and "ema/eval/vqa_score" in report and (run / "ema_model.pth").is_file()
    # best_model.pth holds the weights its metric was measured on: the EMA of the best checkpoint
    from beit3.engine.checkpoint import checkpoint_root, read_best
    from beit3.engine.consolidate import consolidate_ema

    record = read_best(checkpoint_root(run))
    assert record["metric"] == "ema/eval/vqa_score"
    best = torch.load(run / "best_model.pth", weights_only=True)["model"]
    averaged = consolidate_ema(run, tag=record["tag"])
    assert best.keys() == averaged.keys() and all(torch.equal(best[k], averaged[k].float()) for k in best)


def test_a_captioning_recipe_finetunes_with_augmentation_and_drop_worst(tmp_path, spm, monkeypatch):
    from engine_helpers import tensorboard_scalars

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    drop = ["captioning.drop_worst_ratio=0.5", "captioning.drop_worst_after=1", "data.max_eval=2"]
    run = _finetune(tmp_path, spm, "captioning", [*VL_AUGMENT, *drop])
    assert all(math.isfinite(v) for v in tensorboard_scalars(run, "loss/caption").values())
    report = json.loads((run / "eval.json").read_text())
    assert "eval/cider" in report and "ema/eval/cider" in report and (run / "ema_model.pth").is_file()
