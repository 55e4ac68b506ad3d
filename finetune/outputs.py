"""Official outputs of finetuning: the files benchmark servers and toolkits read, and the COCO caption scores.

* VQAv2 test-dev / test: a list of ``{"question_id": int, "answer": str}``, one per question, the answer being
  the vocabulary entry of the arg-max (the format the evaluation server takes).
* Captioning (COCO Karpathy test, NoCaps): the COCO results format, ``[{"image_id": int, "caption": str}]``,
  one per image; scored by :func:`caption_scores`.
* Retrieval: recall@1/5/10 both ways and their mean, in percent, under the released names
  (``tr_r1`` ... ``ir_r10``, ``average_score``; tr = image-to-text, ir = text-to-image).

Caption scoring uses ``pycocoevalcap`` (``pip install beit3-pretrain[coco]``) when it is installed: BLEU-4,
ROUGE-L and CIDEr (pure python there), and with ``official=True`` and Java on the PATH the PTB tokenizer,
METEOR, and SPICE when its Stanford CoreNLP jar is present (pycocoevalcap would otherwise download it at
run time: here SPICE is left out instead, and ``scorer`` says so). Without pycocoevalcap, or without Java,
captions are tokenised by :func:`beit3.finetune.metrics.caption_tokens`; without pycocoevalcap the scores
are the package's own BLEU-4 and CIDEr-D (:mod:`beit3.finetune.metrics`), which equal pycocoevalcap's on
the same tokens (``tests/test_finetune_outputs.py``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from beit3.finetune.metrics import bleu, caption_tokens, cider_d

RETRIEVAL_KEYS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10")


def vqa_submission(question_ids: Sequence[int], predictions: Sequence[int], answers: Sequence[str]) -> list:
    """``[{"question_id", "answer"}]``: the answer names of the predicted answer indices."""
    if len(question_ids) != len(predictions):
        raise ValueError(f"{len(question_ids)} question ids but {len(predictions)} predictions")
    if len(set(question_ids)) != len(question_ids):
        raise ValueError("question ids repeat: the submission holds one answer per question")
    return [{"question_id": int(q), "answer": answers[int(p)]} for q, p in zip(question_ids, predictions)]


def caption_results(image_ids: Sequence[int], captions: Sequence[str]) -> list:
    """``[{"image_id", "caption"}]``, the COCO results format."""
    if len(image_ids) != len(captions):
        raise ValueError(f"{len(image_ids)} image ids but {len(captions)} captions")
    return [{"image_id": int(i), "caption": c} for i, c in zip(image_ids, captions)]


def retrieval_report(recalls: dict[str, float]) -> dict[str, float]:
    """Released-format recalls from :func:`beit3.finetune.metrics.recall_at_k` fractions: percent, and
    ``average_score`` the mean of the six (the released runs select their best checkpoint by it)."""
    report = {k: 100.0 * recalls[k] for k in RETRIEVAL_KEYS}
    report["average_score"] = sum(report.values()) / len(RETRIEVAL_KEYS)
    return report


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


# ----- caption scoring --------------------------------------------------------------------------------
def have_pycocoevalcap() -> bool:
    """Whether pycocoevalcap is importable."""
    return importlib.util.find_spec("pycocoevalcap") is not None


def have_java() -> bool:
    """Whether a ``java`` is on the PATH (pycocoevalcap's PTB tokenizer, METEOR and SPICE run in it)."""
    return shutil.which("java") is not None


SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")  # pycocoevalcap 1.2's


def _spice_ready() -> bool:
    """SPICE's Stanford CoreNLP jars are present (else pycocoevalcap downloads them, which fails offline)."""
    spec = importlib.util.find_spec("pycocoevalcap.spice.spice")
    lib = Path(spec.origin).parent / "lib" if spec and spec.origin else None
    return lib is not None and all((lib / jar).is_file() for jar in SPICE_JARS)


def _ptb_tokenize(texts: dict[int, list[str]]) -> dict[int, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})


def _simple_tokenize(texts: dict[int, list[str]]) -> dict[int, list[str]]:
    return {k: [" ".join(caption_tokens(t)) for t in v] for k, v in texts.items()}


def coco_scores(gts: dict[int, list[str]], res: dict[int, list[str]], java: bool = False) -> dict[str, float]:
    """pycocoevalcap's scorers on already tokenised captions (space-separated tokens; ``res`` one per id):
    BLEU-4, ROUGE-L, CIDEr, and with ``java`` METEOR and (when its jar is present) SPICE."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    bleu_n, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores["bleu4"] = float(bleu_n[3])
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider"] = float(Cider().compute_score(gts, res)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
        if _spice_ready():
            from pycocoevalcap.spice.spice import Spice

            with contextlib.redirect_stdout(io.StringIO()):
                scores["spice"] = float(Spice().compute_score(gts, res)[0])
    return scores


def caption_scores(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], official: bool = False
) -> tuple[dict[str, float], str]:
    """(scores, scorer) of one caption per image against that image's references.

    ``official``: the COCO toolkit as the released evaluation runs it (PTB tokenizer, METEOR, SPICE) where
    Java allows; otherwise the pure-python scorers only (during training). ``scorer`` says which ran.
    """
    if len(hypotheses) != len(references) or not hypotheses or any(not r for r in references):
        raise ValueError(
            f"need one non-empty reference list per caption, got {len(hypotheses)} captions and "
            f"{len(references)} reference lists"
        )
    if not have_pycocoevalcap():
        return {"bleu4": bleu(hypotheses, references), "cider": cider_d(hypotheses, references)}, "builtin"
    java = official and have_java()
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    tokenize = _ptb_tokenize if java else _simple_tokenize
    scores = coco_scores(tokenize(gts), tokenize(res), java)
    if not official:
        return scores, "pycocoevalcap (caption_tokens)"
    if not java:
        return scores, "pycocoevalcap (caption_tokens: no java for the PTB tokenizer, METEOR and SPICE)"
    if "spice" not in scores:
        return scores, f"pycocoevalcap (PTB tokenizer; no SPICE: {' and '.join(SPICE_JARS)} missing)"
    return scores, "pycocoevalcap (PTB tokenizer)"
