"""Masking of the three kinds as the loader applies it: ratios, BERT 80/10/10, separate vs joint pairs."""

from __future__ import annotations

import numpy as np
import torch
from tiny_data import noise_image, sentence

from beit3.pretrain.data import PretrainDataConfig
from beit3.pretrain.data.samples import SampleProcessor, collate
from beit3.pretrain.data.tario import RawSample


def cfg(**kw) -> PretrainDataConfig:
    base = dict(img_size=64, patch_size=8, tokenizer_img_size=32, text_max_len=40, pair_text_max_len=40)
    base.update(kw)
    return PretrainDataConfig(**base)


def raw(fields: dict) -> RawSample:
    return RawSample("k", "mem", fields, ())


def texts(proc, n, kind="text"):
    out = []
    for i in range(n):
        fields = {"txt": (sentence(i, 8, 30)).encode()}
        if kind == "pair":
            fields["jpg"] = IMAGE
        out.append(getattr(proc, kind)(raw(fields), np.random.default_rng(i)))
    return collate(out, None, 1)


IMAGE = noise_image(np.random.default_rng(0), 48, 48)


def test_text_masks_15_percent_of_real_tokens_never_specials(tok):
    batch = texts(SampleProcessor(cfg(), tok), 200)
    labels, padding = batch["text_labels"], batch["text_padding_mask"]
    original = torch.where(labels != -100, labels, batch["text"])
    candidates = (~padding).sum(1) - 2  # not <s> or </s>
    chosen = (labels != -100).sum(1)
    expected = torch.clamp(torch.floor(candidates * 0.15 + 0.5), min=1)
    assert torch.equal(chosen, expected.long())
    specials = torch.isin(original, torch.tensor(sorted(tok.special_ids)))
    assert not ((labels != -100) & specials).any()


def test_bert_80_10_10_replacement_statistics(tok):
    batch = texts(SampleProcessor(cfg(text_mask_ratio=0.5), tok), 400)
    chosen = batch["text_labels"] != -100
    ids, labels = batch["text"][chosen], batch["text_labels"][chosen]
    n = chosen.sum().item()
    masked = (ids == tok.mask_id).float().mean().item()
    kept = (ids == labels).float().mean().item()
    randomised = ((ids != tok.mask_id) & (ids != labels)).float().mean().item()
    assert n > 3000
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1 - 0.1 / tok.vocab_size) < 0.03
    assert abs(randomised - 0.1) < 0.03
    random_ids = ids[(ids != tok.mask_id) & (ids != labels)]
    assert (random_ids >= 4).all() and (random_ids < tok.mask_id).all()  # ordinary pieces only


def test_images_mask_40_percent_of_patches_in_blocks(tok):
    proc = SampleProcessor(cfg(), tok)
    masks = [
        torch.as_tensor(proc.image(raw({"jpg": IMAGE}), np.random.default_rng(i))["image_mask"])
        for i in range(20)
    ]
    grid = 8
    for m in masks:
        assert m.shape == (grid * grid,) and m.sum() == round(0.4 * grid * grid)
    # Block-wise: nearly every masked patch has at least two masked 4-neighbours (about 0.97 here), against
    # about 0.42 for the same number of patches masked uniformly at random.
    m = torch.stack(masks).view(-1, grid, grid).int()
    neighbours = torch.zeros_like(m)
    neighbours[:, 1:] += m[:, :-1]
    neighbours[:, :-1] += m[:, 1:]
    neighbours[:, :, 1:] += m[:, :, :-1]
    neighbours[:, :, :-1] += m[:, :, 1:]
    assert ((neighbours >= 2) & (m > 0)).sum() / m.sum() > 0.8


def test_separate_pair_masking_masks_either_image_or_text(tok):
    batch = texts(SampleProcessor(cfg(), tok), 200, kind="pair")
    image_masked = batch["image_mask"].any(1)
    text_masked = (batch["text_labels"] != -100).any(1)
    assert torch.equal(image_masked, ~text_masked)
    assert 0.4 < image_masked.float().mean() < 0.6
    assert (batch["image_mask"][image_masked].sum(1) == round(0.4 * 64)).all()
    real = (~batch["text_padding_mask"][text_masked]).sum(1) - 2
    chosen = (batch["text_labels"][text_masked] != -100).sum(1)
    assert torch.equal(chosen, torch.floor(real * 0.5 + 0.5).long())


def test_joint_pair_masking_masks_both(tok):
    batch = texts(SampleProcessor(cfg(pair_masking="joint"), tok), 30, kind="pair")
    assert (batch["image_mask"].sum(1) == round(0.4 * 64)).all()
    assert (batch["text_labels"] != -100).any(1).all()


def test_zero_ratios_mask_nothing(tok):
    proc = SampleProcessor(cfg(text_mask_ratio=0.0, image_mask_ratio=0.0), tok)
    batch = texts(proc, 5)
    assert (batch["text_labels"] == -100).all()
    assert not proc.image(raw({"jpg": IMAGE}), np.random.default_rng(0))["image_mask"].any()


def test_long_texts_are_truncated_but_keep_their_end_token(tok):
    proc = SampleProcessor(cfg(text_max_len=6, text_mask_ratio=0.0), tok)
    out = proc.text(raw({"txt": sentence(3, 30, 30).encode()}), np.random.default_rng(0))
    assert len(out["text"]) == 6 and out["text"][0] == tok.bos_id and out["text"][-1] == tok.eos_id
