"""Finetuning metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from beit3.finetune.metrics import (
    accuracy,
    bleu,
    caption_tokens,
    cider_d,
    recall_at_k,
    vqa_score,
    vqa_soft_score,
)


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(logits, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_vqa_score_is_the_soft_score_of_the_chosen_answer():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    scores = torch.tensor([[0.3, 1.0, 0.0], [0.6, 0.9, 0.0]])
    assert vqa_score(logits, scores) == pytest.approx((0.3 + 0.9) / 2)


def test_vqa_soft_scores_follow_annotator_agreement():
    assert [vqa_soft_score(n) for n in range(6)] == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])


def test_recall_at_k_both_directions_with_two_texts_for_one_image():
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.2, 0.3, 0.1, 0.5], [0.0, 0.7, 0.4, 0.6]])
    text_to_image = torch.tensor([0, 0, 1, 2])
    r = recall_at_k(sim, text_to_image, ks=(1, 2, 5))
    # Image ranks of their best own text: 0, 3, 1. Text ranks of their image: 0, 2, 2, 0.
    assert r["tr_r1"] == pytest.approx(1 / 3) and r["tr_r2"] == pytest.approx(2 / 3) and r["tr_r5"] == 1.0
    assert r["ir_r1"] == pytest.approx(0.5) and r["ir_r2"] == pytest.approx(0.5) and r["ir_r5"] == 1.0
    assert r["average"] == pytest.approx((1 / 3 + 2 / 3 + 1 + 0.5 + 0.5 + 1) / 6)


def test_caption_tokens_lowercase_and_drop_punctuation():
    assert caption_tokens("A mango, on the Table.") == ["a", "mango", "on", "the", "table"]


def test_bleu4_by_hand():
    # Clipped precisions 5/6, 3/5, 2/4, 1/3; equal lengths so no brevity penalty.
    got = bleu(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert got == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)


def test_bleu_brevity_penalty_uses_the_closest_reference():
    got = bleu(["the cat sat on"], [["the cat sat on the mat", "a dog"]])
    # Reference lengths 6 and 2 are equally close to 4; the tie goes to the shorter, so no penalty.
    assert got == 1.0
    got = bleu(["the cat sat on"], [["the cat sat on the mat"]])
    assert got == pytest.approx(math.exp(1 - 6 / 4))


def test_bleu_is_zero_without_a_four_gram_match():
    assert bleu(["a b c d"], [["a b c e"]]) == 0.0


def test_cider_d_by_hand():
    # Two images; df of each unigram/bigram is 1 so idf = log 2 for every n-gram that occurs.
    # Image 1: unigram cosine 1/2 (shares "a"), bigram 0, no 3/4-grams -> 10 * 0.5 / 4 = 1.25.
    # Image 2: identical unigrams and bigrams -> 10 * (1 + 1) / 4 = 5.
    got = cider_d(["a c", "c d"], [["a b"], ["c d"]])
    assert got == pytest.approx((1.25 + 5.0) / 2)


def test_cider_d_penalises_length_difference():
    # Same n-grams as the reference but one word longer: a Gaussian factor exp(-1 / 72) on every n.
    exact = cider_d(["a b c d", "x y"], [["a b c d"], ["x y"]])
    longer = cider_d(["a b c d d", "x y"], [["a b c d"], ["x y"]])
    assert longer < exact


def test_metrics_reject_missing_references():
    with pytest.raises(ValueError, match="one reference list per hypothesis"):
        bleu(["a"], [])
