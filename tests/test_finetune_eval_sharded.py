"""Sharded evaluation's single-process parts: top-k hits, recalls by shares of the similarity rows, progress
lines, beam search's shared stop rule.

The 2-rank checks (the one-process metrics and prediction files from 2 ranks, captioning included) are in
tests/test_finetune_multirank.py, in one launch with the other tasks'.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import beit3.finetune.evaluate as ev
from beit3.finetune.decoding import BeamSearchConfig, beam_search
from beit3.finetune.metrics import recall_at_k


def _reference_top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """Plain torch: a row hits when fewer than k classes score above its label."""
    above = (logits > logits.gather(1, labels[:, None])).sum(dim=1)
    return int((above < k).sum())


@pytest.mark.parametrize("classes", [10, 5, 3, 1])
def test_top_k_hits_match_a_plain_torch_reference_with_k_capped_at_the_classes(classes):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(64, classes, generator=g)
    labels = torch.randint(classes, (64,), generator=g)
    hits5 = ev.top_k_hits(logits, labels, 5)
    assert hits5 == _reference_top_k_hits(logits, labels, 5)
    assert ev.top_k_hits(logits, labels, 1) == int((logits.argmax(1) == labels).sum())
    if classes <= 5:  # top-5 of at most 5 classes holds every label
        assert hits5 == 64
    else:
        assert ev.top_k_hits(logits, labels, 1) < hits5 < 64


def test_recalls_from_shares_of_the_similarity_rows_sum_to_recall_at_k(monkeypatch):
    """9 images with 1-3 texts each (texts 1 and 2, of images 0 and 1, identical: ties), 3 ranks' shares
    summed give the one-process counts, which give recall_at_k of the whole similarity matrix."""
    g = torch.Generator().manual_seed(0)
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 1])
    images = torch.nn.functional.normalize(torch.randn(9, 4, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images[text_to_image] + torch.randn(15, 4, generator=g), dim=-1)
    texts[1] = texts[2]
    expected = recall_at_k(images @ texts.t(), text_to_image)
    counts = []
    monkeypatch.setattr(ev, "_sum_across_ranks", lambda values, device: counts.append(values) or values)
    got = ev.sharded_recalls(images, texts, text_to_image, "cpu")
    assert got.keys() == expected.keys() and 0 < got["average"] < 1
    assert got == {k: pytest.approx(v, abs=1e-6) for k, v in expected.items()}
    for r in range(3):
        monkeypatch.setattr(ev, "_world", lambda r=r: (r, 3))
        ev.sharded_recalls(images, texts, text_to_image, "cpu")
    assert counts[0][:2] == [9.0, 15.0]  # images with a text, texts
    assert [sum(c[i] for c in counts[1:]) for i in range(len(counts[0]))] == counts[0]


def test_progress_lines_count_every_ranks_items_on_rank_0_only(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="beit3.finetune.evaluate")
    assert list(ev._sharded(5, 2)) == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    assert not caplog.records  # a quick evaluation logs nothing (PROGRESS_EVERY_S = 30)
    monkeypatch.setattr(ev, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(ev, "_world", lambda: (0, 2))  # rank 0 of 2: items 0, 2, 4; rank 1 holds 1, 3
    assert list(ev._sharded(5, 2, "images")) == [([0, 2], 2), ([4, 4], 1)]
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in lines] == ["evaluating: 4/5 images", "evaluating: 5/5 images"]
    assert "/s over 2 ranks" in lines[0] and "s left" in lines[0]
    caplog.clear()
    monkeypatch.setattr(ev, "_world", lambda: (1, 2))
    assert list(ev._sharded(5, 2, "images")) == [([1, 3], 2), ([1, 1], 0)]
    assert not caplog.records


def _markov_step(calls: list[int]):
    """Next-token distribution from the last token (0 <s>, 2 </s>, 3 and 4 words), counting calls (rows of
    stopped items go on with </s>)."""
    table = {0: [0.0, 0.0, 0.1, 0.6, 0.3], 3: [0.0, 0.0, 0.5, 0.3, 0.2], 4: [0.0, 0.0, 0.9, 0.05, 0.05]}
    table[2] = [0.2] * 5
    table = {k: torch.tensor([max(p, 1e-9) for p in v]).log() for k, v in table.items()}

    def step(tokens, parents):
        calls.append(1)
        return torch.stack([table[t] for t in tokens[:, -1].tolist()])

    return step


def test_beam_search_steps_on_until_stop_agrees_with_the_same_result():
    """Another rank's batch still searching (stop says no): the search takes every step to max_len, and
    the steps after its own items stopped leave their results as they are."""
    cfg = BeamSearchConfig(num_beams=2, max_len=8, length_penalty=0.6)
    alone, together = [], []
    expected = beam_search(_markov_step(alone), 2, 0, 2, cfg)
    seen = []
    got = beam_search(_markov_step(together), 2, 0, 2, cfg, stop=lambda done: seen.append(done) or False)
    assert got == expected and all(math.isfinite(s) for _, s in got)
    assert len(alone) < len(together) == cfg.max_len - 1
    assert seen[len(alone) - 1 :] == [True] * (len(together) - len(alone) + 1)  # done from alone's last step
    assert not any(seen[: len(alone) - 1])
