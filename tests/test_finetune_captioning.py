"""Captioning: attention layout, token masking, smoothed loss, and beam search with and without the cache."""

from __future__ import annotations

import math

import pytest
import torch

from beit3.finetune.configurations import build_encoder
from beit3.finetune.decoding import (
    BeamSearchConfig,
    CachedStep,
    RecomputeStep,
    beam_search,
    generate_captions,
)
from beit3.finetune.tasks.captioning import (
    Captioning,
    captioning_attention_mask,
    label_smoothed_loss,
    mask_captions,
)

MASK_ID = 39


def test_attention_mask_blocks_image_to_text_and_future_text():
    m = captioning_attention_mask(num_vision=2, text_len=3)
    expected = torch.tensor(
        [
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def _captions():
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 17, 2], [0, 20, 21, 2, 1, 1, 1, 1, 1, 1]])
    return ids, ids == 1


def test_masking_chooses_round_share_of_tokens_never_bos_or_padding():
    ids, pad = _captions()
    out = mask_captions(ids, pad, mask_prob=0.6, mask_id=MASK_ID, generator=torch.Generator().manual_seed(0))
    masked = out["masked"]
    assert masked.sum(1).tolist() == [6, 2]  # round(0.6 * 10), round(0.6 * 4)
    assert not masked[:, 0].any() and not (masked & pad).any()
    assert torch.equal(out["labels"], ids)
    assert torch.equal(out["text"][~masked], ids[~masked])


def test_masking_keeps_at_least_one_and_one_fewer_than_all():
    ids = torch.tensor([[0, 5, 2], [0, 5, 2]])
    pad = torch.zeros_like(ids, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    assert mask_captions(ids, pad, 0.01, MASK_ID, g)["masked"].sum(1).tolist() == [1, 1]
    assert mask_captions(ids, pad, 1.0, MASK_ID, g)["masked"].sum(1).tolist() == [2, 2]


def test_masked_tokens_become_mask_80_percent_kept_10_random_10():
    ids = torch.full((400, 50), 7)
    ids[:, 0] = 0
    out = mask_captions(ids, ids == 1, 0.6, MASK_ID, torch.Generator().manual_seed(0))
    chosen = out["text"][out["masked"]]
    n = chosen.numel()
    assert (chosen == MASK_ID).sum() / n == pytest.approx(0.8, abs=0.02)
    assert (chosen == 7).sum() / n == pytest.approx(0.1 + 0.1 / (MASK_ID - 4), abs=0.02)
    assert ((chosen >= 4) & (chosen <= MASK_ID)).all()  # random replacements avoid special ids


def test_label_smoothed_loss_is_zero_at_the_smoothed_target_and_matches_kl():
    eps, c = 0.1, 5
    labels = torch.tensor([2, 0])
    target = torch.full((2, c), eps / (c - 1))
    target[torch.arange(2), labels] = 1 - eps
    assert label_smoothed_loss(target.log(), labels, eps).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, c, generator=torch.Generator().manual_seed(0))
    kl = (target * (target.log() - logits.log_softmax(-1))).sum(-1).mean()
    assert label_smoothed_loss(logits, labels, eps).item() == pytest.approx(kl.item(), rel=1e-5)


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    enc = build_encoder("beit3_tiny_patch16_64", "seq2seq", vocab_size=40, max_text_positions=20)
    return Captioning(enc).eval()


def test_training_forward_scores_only_masked_positions(captioner):
    ids, pad = _captions()
    batch = mask_captions(ids, pad, 0.6, MASK_ID, torch.Generator().manual_seed(0))
    batch.update(image=torch.randn(2, 3, 64, 64), text_padding_mask=pad)
    loss, metrics = captioner(batch)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert set(metrics) == {"loss/caption", "acc/masked_tokens"}


def test_beam_search_with_the_cache_equals_recomputing_full_sequences(captioner):
    image = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cfg = BeamSearchConfig(num_beams=3, max_len=9)
    banned = (0, 1, MASK_ID)
    cached = beam_search(CachedStep(captioner, image, 3, MASK_ID), 3, 0, 2, cfg, banned)
    full = beam_search(RecomputeStep(captioner, image, 3, MASK_ID), 3, 0, 2, cfg, banned)
    assert [ids for ids, _ in cached] == [ids for ids, _ in full]
    assert [s for _, s in cached] == pytest.approx([s for _, s in full], abs=1e-4)


def test_cached_step_distributions_match_full_passes_step_by_step(captioner):
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    cached, full = CachedStep(captioner, image, 1, MASK_ID), RecomputeStep(captioner, image, 1, MASK_ID)
    tokens = torch.zeros(2, 1, dtype=torch.long)
    rows = torch.arange(2)
    for next_ids in ([5, 6], [7, 8], [9, 10]):
        torch.testing.assert_close(cached(tokens, rows), full(tokens, rows), atol=1e-5, rtol=1e-4)
        tokens = torch.cat([tokens, torch.tensor(next_ids)[:, None]], dim=1)


def _markov_step(table: dict[int, list[float]]):
    """A step function whose next-token distribution depends only on the last token."""

    def step(tokens, parents):
        return torch.tensor([table[t] for t in tokens[:, -1].tolist()]).log()

    return step


def test_beam_search_finds_the_likelier_sequence_greedy_misses():
    # Tokens: 0 <s>, 1 unused, 2 </s>, 3 "a", 4 "b". Greedy takes "a" (0.6) then 0.5 * </s> = 0.30;
    # beam search finds "b" (0.4) then certain </s> = 0.40.
    table = {
        0: [0.0, 0.0, 0.0, 0.6, 0.4],
        3: [0.0, 0.0, 0.5, 0.25, 0.25],
        4: [0.0, 0.0, 1.0, 0.0, 0.0],
    }
    eps = 1e-9
    table = {k: [max(p, eps) for p in v] for k, v in table.items()}
    greedy = beam_search(
        _markov_step(table), 1, 0, 2, BeamSearchConfig(num_beams=1, max_len=3, length_penalty=0)
    )
    beam = beam_search(
        _markov_step(table), 1, 0, 2, BeamSearchConfig(num_beams=2, max_len=3, length_penalty=0)
    )
    assert greedy[0][0] == [3] and beam[0][0] == [4]
    assert beam[0][1] == pytest.approx(math.log(0.4), abs=1e-6)


def test_generate_captions_falls_back_to_recompute_for_vl_expert_layouts():
    torch.manual_seed(0)
    enc = build_encoder("beit3_tiny_paper_patch16_64", "seq2seq", vocab_size=40, max_text_positions=20)
    task = Captioning(enc)
    with pytest.raises(ValueError, match="RecomputeStep"):
        CachedStep(task, torch.randn(1, 3, 64, 64), 2, MASK_ID)
    out = generate_captions(task, torch.randn(2, 3, 64, 64), 0, 2, MASK_ID, BeamSearchConfig(2, max_len=5))
    assert len(out) == 2 and all(len(ids) <= 4 for ids in out)
    assert task.training  # mode restored


def test_generation_never_emits_ids_the_tokenizer_cannot_decode(captioner):
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    out = generate_captions(captioner, image, 0, 2, 9, BeamSearchConfig(2, max_len=6), vocab_size=10)
    assert all(0 <= i < 10 and i not in (0, 1, 9) for ids in out for i in ids)
