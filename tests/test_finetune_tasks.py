"""Task heads and losses on tiny batches; every parameter of a task module is used by one forward."""

from __future__ import annotations

import math

import pytest
import torch

from beit3.finetune.configurations import build_encoder
from beit3.finetune.tasks.base import OptimSettings
from beit3.finetune.tasks.captioning import Captioning, mask_captions
from beit3.finetune.tasks.classification import ImageClassification, PromptClassification, TextClassification
from beit3.finetune.tasks.retrieval import Retrieval, contrastive_loss
from beit3.finetune.tasks.vqa import NLVR2, VQA

NAME = "beit3_tiny_patch16_64"
SMALL = {"vocab_size": 40, "max_text_positions": 20}
G = torch.Generator().manual_seed(0)
IMAGE = torch.randn(4, 3, 64, 64, generator=G)
TEXT = torch.randint(4, 39, (4, 7), generator=G)
TEXT[:, 0] = 0
PAD = torch.zeros(4, 7, dtype=torch.bool)
PAD[0, 5:] = True


def _encoder(configuration, **kw):
    torch.manual_seed(0)
    return build_encoder(NAME, configuration, **SMALL, **kw)


def _task(name: str):
    """A fresh task module and a batch for it."""
    scores = torch.zeros(4, 6)
    scores[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 1.0
    caption = mask_captions(TEXT, PAD, 0.6, 39, torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    factories = {
        "image_classification": lambda: (
            ImageClassification(_encoder("vision", normalize_output=False), 3),
            {"image": IMAGE, "label": labels},
        ),
        "text_classification": lambda: (
            TextClassification(_encoder("language", normalize_output=False), 3),
            {"text": TEXT, "text_padding_mask": PAD, "label": labels},
        ),
        "vqa": lambda: (
            VQA(_encoder("fusion", normalize_output=False), 6),
            {"image": IMAGE, "text": TEXT, "text_padding_mask": PAD, "scores": scores},
        ),
        "nlvr2": lambda: (
            NLVR2(_encoder("fusion")),
            {
                "image": IMAGE,
                "image2": IMAGE.flip(0),
                "text": TEXT,
                "text_padding_mask": PAD,
                "label": torch.tensor([0, 1, 1, 0]),
            },
        ),  # fmt: skip
        "retrieval": lambda: (
            Retrieval(_encoder("dual")),
            {"image": IMAGE, "text": TEXT, "text_padding_mask": PAD},
        ),
        "captioning": lambda: (
            Captioning(_encoder("seq2seq")),
            {"image": IMAGE, "text_padding_mask": PAD, **caption},
        ),
    }
    return factories[name]()


TASKS = ("image_classification", "text_classification", "vqa", "nlvr2", "retrieval", "captioning")


@pytest.mark.parametrize("task_name", TASKS)
def test_task_forward_gives_a_finite_loss_and_touches_every_parameter(task_name):
    task, batch = _task(task_name)
    loss, metrics = task(task.prepare_batch(batch, "cpu"))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert all(k.count("/") == 1 for k in metrics)
    loss.backward()
    untouched = [n for n, p in task.named_parameters() if p.grad is None]
    assert untouched == []
    stats = task.batch_stats(batch)
    assert stats["samples"] >= 4 and stats["tokens"] > 0 and stats["flops"] > 0


def test_classification_heads_start_near_zero():
    task = ImageClassification(_encoder("vision", normalize_output=False), 10)
    assert task.head.weight.abs().max() <= 0.04 * 0.001
    assert task.logits(IMAGE).abs().max() < 1e-2


def test_vqa_loss_is_bce_summed_over_answers():
    task, batch = _task("vqa")
    logits = task.logits(batch["image"], batch["text"], batch["text_padding_mask"])
    loss, metrics = task(batch)
    per_answer = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, batch["scores"], reduction="none"
    )
    assert loss.item() == pytest.approx(per_answer.sum(1).mean().item(), rel=1e-5)
    assert 0.0 <= metrics["score/vqa"] <= 1.0


def test_nlvr2_depends_on_which_image_comes_first():
    task, batch = _task("nlvr2")
    a = task.logits(batch["image"], batch["image2"], batch["text"], batch["text_padding_mask"])
    b = task.logits(batch["image2"], batch["image"], batch["text"], batch["text_padding_mask"])
    assert a.shape == (4, 2) and not torch.allclose(a, b)


def test_contrastive_loss_is_low_for_aligned_features_and_log_b_for_identical_ones():
    feats = torch.nn.functional.normalize(torch.eye(4), dim=-1)
    low, metrics = contrastive_loss(feats, feats, torch.tensor(math.log(100.0)))
    assert low.item() < 1e-3 and metrics["acc/i2t"] == 1.0
    same = torch.nn.functional.normalize(torch.ones(4, 4), dim=-1)
    flat, _ = contrastive_loss(same, same, torch.tensor(0.0))
    assert flat.item() == pytest.approx(math.log(4), rel=1e-5)


def test_retrieval_logit_scale_starts_at_log_1_over_0_07():
    task = Retrieval(_encoder("dual"))
    assert task.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert task.vision_head.bias is None and task.language_head.bias is None


def test_prompt_classification_scores_images_against_every_class_prompt():
    task = PromptClassification(Retrieval(_encoder("dual")), TEXT[:3], PAD[:3])
    logits = task.logits(IMAGE)
    assert logits.shape == (4, 3)
    loss, _ = task({"image": IMAGE, "label": torch.tensor([0, 1, 2, 0])})
    loss.backward()
    assert all(p.grad is not None for p in task.parameters())


def test_param_groups_apply_layer_decay_head_scale_and_decay_exemptions():
    task = VQA(_encoder("fusion", normalize_output=False), 6, OptimSettings(0.05, 0.5, 20.0))
    groups = task.param_groups()
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(task.named_parameters())
    depth = task.cfg.depth  # 2: embeddings 0.5**3, layer 0 0.5**2, layer 1 0.5, heads 1
    assert by_param[id(named["beit3.text_embed.weight"])]["lr_scale"] == pytest.approx(0.5**3)
    assert by_param[id(named["beit3.encoder.layers.0.ffn.A.fc1.weight"])]["lr_scale"] == pytest.approx(
        0.5**depth
    )
    assert by_param[id(named["head.0.weight"])]["lr_scale"] == pytest.approx(20.0)
    assert by_param[id(named["pooler.dense.weight"])]["lr_scale"] == pytest.approx(20.0)
    assert by_param[id(named["head.0.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["head.0.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["beit3.vision_embed.cls_token"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_logit_scale_is_not_decayed():
    task = Retrieval(_encoder("dual"))
    group = next(g for g in task.param_groups() if any(p is task.logit_scale for p in g["params"]))
    assert group["weight_decay"] == 0.0


@pytest.mark.parametrize("part", ["layer", "attention", "ffn"])
def test_recipe_activation_checkpointing_reaches_the_backbone_and_keeps_the_gradients(part):
    """[model] grad_checkpointing / grad_checkpointing_part of a finetune recipe: the task's backbone
    recomputes those layers (or branches), with the same loss and gradients as without (drop path on)."""
    from beit3.finetune.builder import build_task
    from beit3.finetune.recipe import FinetuneRecipe, ModelSection, TaskSection

    def built(spec: str):
        recipe = FinetuneRecipe(
            task=TaskSection(name="vqa", num_classes=5),
            model=ModelSection(name="beit3_tiny_paper_patch16_64", drop_path_rate=0.2,
                               grad_checkpointing=spec, grad_checkpointing_part=part),
        )  # fmt: skip
        torch.manual_seed(0)
        task, _ = build_task(recipe, [str(i) for i in range(5)])
        return task.train()

    batch = {
        "image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
        "text": torch.randint(4, 60, (2, 6)),
        "text_padding_mask": torch.tensor([[False] * 6, [False] * 4 + [True] * 2]),
        "scores": torch.rand(2, 5),
    }
    steps = []
    for spec in ("none", "every:2"):
        task = built(spec)
        assert sorted(task.beit3.checkpoint_layers) == ([] if spec == "none" else [0, 2])
        assert task.beit3.checkpoint_part == (part if spec != "none" else "layer")
        torch.manual_seed(3)  # the drop-path draws
        loss, _ = task(batch)
        loss.backward()
        steps.append(
            (loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = steps
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-7)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7, msg=name)


def test_mean_pooling_averages_the_tokens_that_are_not_padding():
    from beit3.finetune.tasks.base import fused_padding, pool_tokens

    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    want = torch.stack([x[0, :3].mean(0), x[1].mean(0), x[2, :1].mean(0)])
    torch.testing.assert_close(pool_tokens(x, "mean", pad), want)
    torch.testing.assert_close(pool_tokens(x, "mean"), x.mean(1))
    torch.testing.assert_close(pool_tokens(x, "cls", pad), x[:, 0])
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool_tokens(x, "max")
    fused = fused_padding(pad[:, :2], 3)  # 3 vision tokens, then the text's 2
    assert fused.tolist() == [[False] * 3 + row for row in pad[:, :2].tolist()]


def _padded(extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TEXT / PAD with ``extra`` more padding positions (ids that would change a mean over them)."""
    text = torch.cat([TEXT, torch.full((4, extra), 17)], dim=1)
    pad = torch.cat([PAD, torch.ones(4, extra, dtype=torch.bool)], dim=1)
    return text, pad


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pooled_heads_read_the_pooling_asked_for_and_ignore_padding(pooling):
    """Every head that reads task.pooling: its output is the head applied to pool_tokens of the encoder
    output (computed here apart), and padding added to the texts changes nothing."""
    from beit3.finetune.tasks.base import fused_padding, pool_tokens

    torch.manual_seed(0)
    vqa = VQA(_encoder("fusion", normalize_output=False), 6, pooling=pooling).eval()
    text_cls = TextClassification(_encoder("language", normalize_output=False), 3, pooling=pooling).eval()
    retrieval = Retrieval(_encoder("dual"), pooling=pooling).eval()
    long_text, long_pad = _padded(5)
    with torch.no_grad():
        x = vqa.beit3(image=IMAGE, text=TEXT, text_padding_mask=PAD)
        pooled = pool_tokens(x, pooling, fused_padding(PAD, vqa.cfg.num_vision_tokens))
        want = vqa.head(torch.tanh(vqa.pooler.dense(vqa.pooler.norm(pooled))))
        torch.testing.assert_close(vqa.logits(IMAGE, TEXT, PAD), want)
        torch.testing.assert_close(vqa.logits(IMAGE, long_text, long_pad), want, atol=1e-5, rtol=1e-5)

        x = text_cls.beit3(text=TEXT, text_padding_mask=PAD)
        want = text_cls.head(text_cls.fc_norm(pool_tokens(x, pooling, PAD)))
        torch.testing.assert_close(text_cls.logits(TEXT, PAD), want)
        torch.testing.assert_close(text_cls.logits(long_text, long_pad), want, atol=1e-5, rtol=1e-5)

        x = retrieval.beit3(text=TEXT, text_padding_mask=PAD)
        want = torch.nn.functional.normalize(retrieval.language_head(pool_tokens(x, pooling, PAD)), dim=-1)
        torch.testing.assert_close(retrieval.embed_texts(TEXT, PAD), want)
        torch.testing.assert_close(retrieval.embed_texts(long_text, long_pad), want, atol=1e-5, rtol=1e-5)
        image = retrieval.beit3(image=IMAGE)
        want = torch.nn.functional.normalize(retrieval.vision_head(pool_tokens(image, pooling)), dim=-1)
        torch.testing.assert_close(retrieval.embed_images(IMAGE), want)


def test_the_recipe_pooling_reaches_the_built_heads():
    """task.pooling through the recipe and the builder, for each kind of task that reads it."""
    from beit3.finetune.builder import build_task
    from beit3.finetune.recipe import load_recipe

    cases = (
        ("easy_vqa_small", "vqa"),
        ("wordnet_small", "text_classification"),
        ("stamps_retrieval_small", "retrieval"),
        ("itc_small", "contrastive"),
    )
    for recipe_name, task_name in cases:
        for pooling in ("cls", "mean"):
            sets = [f"task.pooling={pooling}", f"model.name={NAME}", 'model.pretrained=""']
            recipe = load_recipe(recipe_name, sets)
            assert recipe.task.name == task_name
            task, _ = build_task(recipe, classes=["a", "b", "c"])
            assert getattr(task, "pooler", task).pooling == pooling, (recipe_name, pooling)
