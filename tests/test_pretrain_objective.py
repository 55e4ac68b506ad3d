"""The masked-data-modeling objective against plain PyTorch math, and its ZeRO-3 parameter-usage property."""

import math

import pytest
import torch
import torch.nn.functional as F

from beit3.model import build_model, flops
from beit3.pretrain.objective import MaskedDataModeling, ObjectiveConfig

CODEBOOK = 32


class PatchMeanTokenizer:
    """A deterministic stand-in visual tokenizer: code = binned mean intensity of each 16x16 patch."""

    def codes(self, images: torch.Tensor) -> torch.Tensor:
        patches = F.avg_pool2d(images.mean(1, keepdim=True), 16).flatten(1)  # (B, Np) in [0, 1]
        return (patches * (CODEBOOK - 1)).round().long().clamp(0, CODEBOOK - 1)


def make_batch(gen: torch.Generator, n: int = 3, text_len: int = 7, vocab: int = 100) -> dict:
    grid = 16

    def images():
        return torch.rand(n, 3, 64, 64, generator=gen)

    def text_part():
        ids = torch.randint(4, vocab, (n, text_len), generator=gen)
        ids[:, 0], ids[:, -1] = 0, 2
        pad = torch.zeros(n, text_len, dtype=torch.bool)
        pad[0, -2:] = True
        ids[pad] = 1
        labels = torch.full_like(ids, -100)
        labels[:, 2] = ids[:, 2]
        labels[1:, 3] = ids[1:, 3]
        masked = ids.clone()
        masked[labels != -100] = 99
        return {"text": masked, "text_padding_mask": pad, "text_labels": labels}

    img = images()
    image_mask = torch.rand(n, grid, generator=gen) < 0.4
    image_mask[:, 0] = True
    pair_img = images()
    pair_mask = torch.zeros(n, grid, dtype=torch.bool)
    pair_mask[1, 3:9] = True  # one pair masks its image, the others only their text
    pair = {"image": pair_img * 2 - 1, "tokenizer_image": pair_img, "image_mask": pair_mask, **text_part()}
    pair["text_labels"][1] = -100
    return {
        "image": {"image": img * 2 - 1, "tokenizer_image": img, "image_mask": image_mask},
        "text": text_part(),
        "pair": pair,
        "stats": {"skipped/corrupt_image": 0},
    }


@pytest.fixture
def task():
    torch.manual_seed(0)
    model = build_model("beit3_tiny_paper_patch16_64", vocab_size=100, visual_vocab_size=CODEBOOK)
    return MaskedDataModeling(model, PatchMeanTokenizer(), ObjectiveConfig(mim_weight=1.0, mlm_weight=0.5))


def reference_losses(task, batch) -> dict[str, float]:
    """Full-vocabulary logits at every position and cross-entropy with ignore_index: no masked selection."""
    m = task.model
    out = {}
    b = batch["image"]
    h = m(image=b["image"], image_mask=b["image_mask"])
    logits = m.mim_head(h[:, 1:])
    target = torch.where(b["image_mask"], b["image_codes"], -100)
    out["mim"] = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    b = batch["text"]
    h = m(text=b["text"], text_padding_mask=b["text_padding_mask"])
    out["mlm"] = F.cross_entropy(m.mlm_head(h).flatten(0, 1), b["text_labels"].flatten(), ignore_index=-100)
    b = batch["pair"]
    h = m(
        image=b["image"], text=b["text"], text_padding_mask=b["text_padding_mask"], image_mask=b["image_mask"]
    )
    nv = h.shape[1] - b["text"].shape[1]
    out["vl_mlm"] = F.cross_entropy(m.mlm_head(h[:, nv:]).flatten(0, 1), b["text_labels"].flatten())
    target = torch.where(b["image_mask"], b["image_codes"], -100)
    out["vl_mim"] = F.cross_entropy(m.mim_head(h[:, 1:nv]).flatten(0, 1), target.flatten(), ignore_index=-100)
    return {k: v.item() for k, v in out.items()}


def test_losses_equal_full_logit_cross_entropy(task):
    batch = task.prepare_batch(make_batch(torch.Generator().manual_seed(1)), torch.device("cpu"))
    task.eval()
    loss, metrics = task(batch)
    ref = reference_losses(task, batch)
    for name, value in ref.items():
        assert metrics[f"loss/{name}"].item() == pytest.approx(value, rel=1e-5)
    expected_total = ref["mim"] + 0.5 * ref["mlm"] + ref["vl_mlm"] + ref["vl_mim"]
    assert loss.item() == pytest.approx(expected_total, rel=1e-5)
    assert all(0.0 <= metrics[f"acc/{n}"].item() <= 1.0 for n in ref)


def test_one_step_gives_every_parameter_a_gradient(task):
    """A mixed micro-batch touches every parameter, the property ZeRO-3 needs (no stale gradients)."""
    batch = task.prepare_batch(make_batch(torch.Generator().manual_seed(2)), torch.device("cpu"))
    loss, _ = task(batch)
    loss.backward()
    missing = [n for n, p in task.named_parameters() if p.grad is None]
    assert missing == []
    # the vision-language experts of the top layer (paper layout) learn from the pair sub-batch
    vl = [p for n, p in task.named_parameters() if ".C." in n]
    assert vl and all(p.grad.abs().sum() > 0 for p in vl if p.dim() == 2)


def test_pairs_without_masked_images_give_zero_not_nan(task):
    batch = make_batch(torch.Generator().manual_seed(3))
    batch["pair"]["image_mask"][:] = False
    batch = task.prepare_batch(batch, torch.device("cpu"))
    loss, metrics = task(batch)
    assert metrics["loss/vl_mim"].item() == 0.0
    assert math.isfinite(loss.item())


def test_visual_tokenizer_is_not_a_parameter_and_codes_replace_views(task):
    batch = task.prepare_batch(make_batch(torch.Generator().manual_seed(4)), torch.device("cpu"))
    assert "tokenizer_image" not in batch["image"] and batch["image"]["image_codes"].shape == (3, 16)
    assert not any("visual_tokenizer" in n for n, _ in task.named_parameters())
    assert batch["stats"] == {"skipped/corrupt_image": 0}


def test_param_groups_exempt_norms_biases_positions_and_tokens(task):
    decay, no_decay = task.param_groups()
    names = {id(p): n for n, p in task.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.beit3.encoder.embed_positions.A.weight" in no_decay_names
    assert "model.beit3.vision_embed.mask_token" in no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.parameters()))


def test_batch_stats_count_samples_tokens_and_flops(task):
    batch = make_batch(torch.Generator().manual_seed(5))
    stats = task.batch_stats(batch)
    assert stats["samples"] == 9
    assert stats["tokens"] == 3 * 17 + 3 * 7 + 3 * (17 + 7)
    assert stats["flops"] > 6 * flops.active_params_per_token(task.model.cfg) * stats["tokens"]


def test_the_visual_tokenizer_runs_once_per_micro_batch_with_the_same_codes(task):
    calls = []

    class Counting(PatchMeanTokenizer):
        def codes(self, images):
            calls.append(len(images))
            return super().codes(images)

    batch = make_batch(torch.Generator().manual_seed(5))
    expected = {k: PatchMeanTokenizer().codes(batch[k]["tokenizer_image"]) for k in ("image", "pair")}
    task.__dict__["visual_tokenizer"] = Counting()
    out = task.prepare_batch(batch, torch.device("cpu"))
    assert calls == [6]  # the 3 images and the 3 pairs' images, together
    for key, codes in expected.items():
        assert torch.equal(out[key]["image_codes"], codes)


def test_unpadded_flops_count_each_text_at_its_real_length(task):
    from beit3.model.flops import Pass, training_flops

    batch = make_batch(torch.Generator().manual_seed(6))  # row 0 of texts and of pairs pads 2 of 7 tokens
    stats = task.batch_stats(batch)
    cfg = task.model.cfg
    masked_text = sum(int(batch[k]["text_labels"].ne(-100).sum()) for k in ("text", "pair"))
    masked_patches = sum(int(batch[k]["image_mask"].sum()) for k in ("image", "pair"))
    real = [Pass(3, image=True), Pass(1, text_len=5), Pass(2, text_len=7)]
    real += [Pass(1, image=True, text_len=5), Pass(2, image=True, text_len=7)]
    assert stats["unpadded_flops"] == pytest.approx(training_flops(cfg, real, masked_text, masked_patches))
    assert stats["unpadded_flops"] < stats["flops"]
    for key in ("text", "pair"):
        batch[key]["text_padding_mask"][:] = False
    assert task.batch_stats(batch)["unpadded_flops"] == task.batch_stats(batch)["flops"]  # nothing padded
