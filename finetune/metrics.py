"""Evaluation metrics, pure functions: accuracy, VQA score, retrieval recall@k, BLEU-4 and CIDEr-D.

BLEU and CIDEr-D follow the definitions used by the COCO caption evaluation (corpus BLEU with the closest
reference length for the brevity penalty; CIDEr-D with document frequencies over the references of the
evaluated set, clipped term frequencies, a Gaussian length penalty with sigma 6 and a factor 10), written
from the papers (Papineni et al. 2002; Vedantam et al. 2015). Captions are compared as whitespace tokens of
lower-cased text with punctuation removed (:func:`caption_tokens`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max is the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def vqa_score(logits: torch.Tensor, scores: torch.Tensor) -> float:
    """VQA score: mean soft score of the arg-max answer (scores are min(#annotators agreeing / 3, 1))."""
    pred = logits.argmax(-1)
    return scores.gather(1, pred[:, None]).float().mean().item()


def vqa_soft_score(num_agreeing: int) -> float:
    """Soft target of an answer given by ``num_agreeing`` annotators: 0.3, 0.6, 0.9, then 1.0 from 4 on."""
    return min(1.0, 0.3 * num_agreeing)


def recall_at_k(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k from an (images x texts) similarity matrix.

    ``text_to_image[j]`` is the row (image) text ``j`` describes. An image counts as retrieved at k when any
    of its texts is among its k best texts; a text when its image is among its k best images. Keys:
    ``tr_r1`` (text retrieval = image-to-text), ``ir_r1`` (image retrieval), ... and ``average``.
    """
    num_images, num_texts = similarity.shape
    out = {}
    # Text-to-image: rank of the true image for each text.
    order = similarity.t().argsort(dim=1, descending=True)  # (T, I)
    rank_ir = (order == text_to_image[:, None]).float().argmax(dim=1)
    # Image-to-text: best rank among the image's texts.
    order = similarity.argsort(dim=1, descending=True)  # (I, T)
    hits = text_to_image[order] == torch.arange(num_images)[:, None]  # (I, T): text at rank r is mine
    has_text = hits.any(dim=1)
    rank_tr = hits.float().argmax(dim=1)[has_text]
    for k in ks:
        out[f"tr_r{k}"] = (rank_tr < k).float().mean().item()
        out[f"ir_r{k}"] = (rank_ir < k).float().mean().item()
    out["average"] = sum(out.values()) / len(out)
    return out


def caption_tokens(text: str) -> list[str]:
    """Lower-case words with punctuation removed (a light stand-in for the PTB tokenizer)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (uniform weights, no smoothing) of hypotheses against lists of references.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus; the brevity penalty uses,
    per sentence, the reference length closest to the hypothesis length (the shorter one on ties).
    """
    _check_pairs(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        h = caption_tokens(hyp)
        rs = [caption_tokens(r) for r in refs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(h, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)  # max count of each n-gram over the references
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def cider_d(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D: mean over images of 10 x the n-gram tf-idf similarity averaged over n and references.

    Document frequency of an n-gram = number of images whose references contain it; idf = log(N_images) -
    log(max(1, df)). Hypothesis weights are clipped to the reference's (min) and a Gaussian penalty
    exp(-(len_h - len_r)^2 / (2 sigma^2)) discourages length gaming.
    """
    _check_pairs(hypotheses, references)
    refs_tok = [[caption_tokens(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in refs_tok:
        df.update({g for r in refs for n in range(1, max_n + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(references)))

    def vectors(words: list[str]) -> list[dict]:
        out = []
        for n in range(1, max_n + 1):
            out.append({g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(words, n).items()})
        return out

    def similarity(vh: dict, vr: dict, delta: int) -> float:
        norm_h = math.sqrt(sum(v * v for v in vh.values()))
        norm_r = math.sqrt(sum(v * v for v in vr.values()))
        if norm_h == 0 or norm_r == 0:
            return 0.0
        dot = sum(min(v, vr[g]) * vr[g] for g, v in vh.items() if g in vr)
        return dot / (norm_h * norm_r) * math.exp(-(delta**2) / (2 * sigma**2))

    scores = []
    for hyp, refs in zip(hypotheses, refs_tok):
        h = caption_tokens(hyp)
        vh = vectors(h)
        per_n = [0.0] * max_n
        for r in refs:
            vr = vectors(r)
            for n in range(max_n):
                per_n[n] += similarity(vh[n], vr[n], len(h) - len(r))
        scores.append(10.0 * sum(per_n) / max_n / len(refs))
    return sum(scores) / len(scores)


def _check_pairs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need one reference list per hypothesis, got {len(hypotheses)} hypotheses and "
            f"{len(references)} reference lists"
        )
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
