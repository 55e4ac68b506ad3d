"""Evaluation of a finetuned task module on an eval split: the task's metric, as ``eval/<name>`` scalars,
and the official prediction files (:func:`predict`, formats in :mod:`beit3.finetune.outputs`).

Every rank evaluates the whole split with the same forwards (no sharding), which keeps ZeRO-3 partitioned
parameters gathering in lock-step on all ranks; eval splits of the benchmarks are small.

Each task's *selection metric* (:data:`SELECTION`) is the scalar, and its direction, by which a run keeps
its best checkpoint (the engine's ``train.best_metric`` / ``best_mode``): accuracy for classification and
NLVR2, the VQA score, CIDEr for captioning, the mean of the six recalls for retrieval.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from beit3.finetune.data.batches import Collator, images_to_float, pad_texts
from beit3.finetune.data.sources import Split
from beit3.finetune.decoding import BeamSearchConfig, generate_captions
from beit3.finetune.metrics import recall_at_k
from beit3.finetune.outputs import caption_results, caption_scores, retrieval_report, vqa_submission
from beit3.tokenizers.text import BOS_ID, EOS_ID

SELECTION = {
    "image_classification": ("eval/accuracy", "max"),
    "prompt_classification": ("eval/accuracy", "max"),
    "text_classification": ("eval/accuracy", "max"),
    "nlvr2": ("eval/accuracy", "max"),
    "vqa": ("eval/vqa_score", "max"),
    "captioning": ("eval/cider", "max"),
    "retrieval": ("eval/average", "max"),  # the released "average_score": mean of R@1/5/10 both ways
}
PREDICTED = ("vqa", "captioning", "retrieval")  # tasks with an official output file


def _batches(split: Split, collate: Collator, batch_size: int) -> Iterator[dict]:
    g = torch.Generator().manual_seed(0)
    for start in range(0, len(split.examples), batch_size):
        yield collate(split.examples[start : start + batch_size], g)


def _unique_images(split: Split) -> tuple[list[int], dict[int, int]]:
    """Bank rows of the distinct images (by ``image_id``) and the position of each image id."""
    rows, position = [], {}
    for ex in split.examples:
        if ex["image_id"] not in position:
            position[ex["image_id"]] = len(rows)
            rows.append(ex["image"])
    return rows, position


@torch.no_grad()
def evaluate(
    task_name: str,
    task: torch.nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_answers: int = 0,
    tokenizer=None,
    decoding: BeamSearchConfig | None = None,
) -> dict[str, float]:
    """The task's metrics on ``split`` (the module is put in eval mode and restored)."""
    if not split.examples:
        return {}
    was_training = task.training
    task.eval()
    try:
        if task_name == "retrieval":
            return _retrieval(task, split, batch_size, device)
        if task_name == "captioning":
            return _captioning(task, split, batch_size, device, tokenizer, decoding or BeamSearchConfig())
        return _classification(task_name, task, split, batch_size, device, num_answers)
    finally:
        task.train(was_training)


def _classification(task_name, task, split, batch_size, device, num_answers) -> dict[str, float]:
    collate = Collator(task_name, split.images, num_answers=num_answers)
    total, hits = 0, 0.0
    for batch in _batches(split, collate, batch_size):
        batch = task.prepare_batch(batch, device)
        if task_name == "prompt_classification":  # through forward: ZeRO-3 gathers logit_scale there
            _, metrics = task(batch)
            hits += metrics["acc/top1"] * batch["label"].shape[0]
            total += batch["label"].shape[0]
            continue
        if task_name == "image_classification":
            logits = task.logits(batch["image"])
        elif task_name == "text_classification":
            logits = task.logits(batch["text"], batch["text_padding_mask"])
        elif task_name == "vqa":
            logits = task.logits(batch["image"], batch["text"], batch["text_padding_mask"])
        else:  # nlvr2
            logits = task.logits(batch["image"], batch["image2"], batch["text"], batch["text_padding_mask"])
        pred = logits.argmax(-1)
        if task_name == "vqa":
            hits += batch["scores"].gather(1, pred[:, None]).sum().item()
        else:
            hits += (pred == batch["label"]).sum().item()
        total += pred.shape[0]
    name = "eval/vqa_score" if task_name == "vqa" else "eval/accuracy"
    return {name: hits / total}


def _retrieval(task, split, batch_size, device) -> dict[str, float]:
    rows, position = _unique_images(split)
    dtype = next(task.parameters()).dtype
    image_feats = []
    for start in range(0, len(rows), batch_size):
        images = images_to_float(split.images[rows[start : start + batch_size]]).to(device, dtype)
        image_feats.append(task.embed_images(images).float())
    text_feats = []
    for start in range(0, len(split.examples), batch_size):
        ids, pad = pad_texts([ex["text"] for ex in split.examples[start : start + batch_size]])
        text_feats.append(task.embed_texts(ids.to(device), pad.to(device)).float())
    sim = torch.cat(image_feats) @ torch.cat(text_feats).t()
    text_to_image = torch.tensor([position[ex["image_id"]] for ex in split.examples])
    return {f"eval/{k}": v for k, v in recall_at_k(sim.cpu(), text_to_image).items()}


def _references(split: Split, tokenizer) -> list[list[str]]:
    """The reference captions of each distinct image (bank-row order); empty lists where a split has none."""
    rows, position = _unique_images(split)
    refs: list[list[str]] = [[] for _ in rows]
    for ex in split.examples:
        if ex.get("raw_text") or ex.get("text"):
            refs[position[ex["image_id"]]].append(ex.get("raw_text") or tokenizer.decode(ex["text"]))
    return refs


def _generate(task, split, batch_size, device, tokenizer, decoding: BeamSearchConfig) -> list[str]:
    """One beam-search caption per distinct image of ``split`` (bank-row order)."""
    if tokenizer is None:
        raise ValueError("captioning evaluation needs the tokenizer to decode captions")
    rows, _ = _unique_images(split)
    dtype = next(task.parameters()).dtype
    hyps = []
    for start in range(0, len(rows), batch_size):
        images = images_to_float(split.images[rows[start : start + batch_size]]).to(device, dtype)
        for ids in generate_captions(
            task, images, BOS_ID, EOS_ID, tokenizer.mask_id, decoding, vocab_size=tokenizer.vocab_size
        ):
            hyps.append(tokenizer.decode(ids))
    return hyps


def _captioning(task, split, batch_size, device, tokenizer, decoding: BeamSearchConfig) -> dict[str, float]:
    hyps = _generate(task, split, batch_size, device, tokenizer, decoding)
    scores, _ = caption_scores(hyps, _references(split, tokenizer))  # pure python: cheap enough per eval
    return {f"eval/{k}": v for k, v in scores.items()}


@torch.no_grad()
def predict(
    task_name: str,
    task: torch.nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device | str = "cpu",
    answers: list[str] | None = None,
    tokenizer=None,
    decoding: BeamSearchConfig | None = None,
    references: dict[int, list[str]] | None = None,
) -> tuple[object, dict]:
    """(official output, report) of ``task`` on ``split`` (:mod:`beit3.finetune.outputs` has the formats).

    VQA: the submission list (question ids from the index's ``qid``, else the example's position) and, when
    the split carries answers, its VQA score. Captioning: the COCO results list and, when references exist
    (``references`` by image id, e.g. a COCO annotation file, else the split's own captions), the COCO
    scores with the official toolkit where installed. Retrieval: the released recalls (the report too).
    """
    if task_name not in PREDICTED:
        raise ValueError(f"task {task_name!r} has no official output file (tasks with one: {PREDICTED})")
    was_training = task.training
    task.eval()
    try:
        if task_name == "vqa":
            return _predict_vqa(task, split, batch_size, device, answers or [])
        if task_name == "captioning":
            return _predict_captions(task, split, batch_size, device, tokenizer, decoding, references)
        report = retrieval_report({k.removeprefix("eval/"): v for k, v in
                                   _retrieval(task, split, batch_size, device).items()})  # fmt: skip
        return report, dict(report)
    finally:
        task.train(was_training)


def _predict_vqa(task, split, batch_size, device, answers: list[str]) -> tuple[list, dict]:
    preds = []
    for start in range(0, len(split.examples), batch_size):
        chunk = split.examples[start : start + batch_size]
        ids, pad = pad_texts([ex["text"] for ex in chunk])
        rows = torch.tensor([ex["image"] for ex in chunk])
        batch = task.prepare_batch({"image": images_to_float(split.images[rows]), "text": ids,
                                    "text_padding_mask": pad}, device)  # fmt: skip
        preds += task.logits(batch["image"], batch["text"], batch["text_padding_mask"]).argmax(-1).tolist()
    qids = [ex.get("question_id", i) for i, ex in enumerate(split.examples)]
    report: dict = {"questions": len(preds)}
    if any(ex.get("scores") for ex in split.examples):  # an annotated split: its VQA score
        hits = sum(ex.get("scores", {}).get(p, 0.0) for ex, p in zip(split.examples, preds))
        report["vqa_score"] = hits / len(preds)
    return vqa_submission(qids, preds, answers), report


def _predict_captions(task, split, batch_size, device, tokenizer, decoding, references) -> tuple[list, dict]:
    hyps = _generate(task, split, batch_size, device, tokenizer, decoding or BeamSearchConfig())
    rows, position = _unique_images(split)
    image_ids = sorted(position, key=position.get)  # bank-row order, as the captions
    results = caption_results(image_ids, hyps)
    if references is not None:
        missing = [i for i in image_ids if not references.get(i)]
        if missing:
            raise ValueError(f"the references have no caption for {len(missing)} image(s), e.g. {missing[0]}")
        refs = [references[i] for i in image_ids]
    else:
        refs = _references(split, tokenizer)
    report: dict = {"images": len(results)}
    if all(refs):
        report["scores"], report["scorer"] = caption_scores(hyps, refs, official=True)
    return results, report


def sample_captions(task, split: Split, tokenizer, count: int = 4, decoding: BeamSearchConfig | None = None):
    """(generated, reference) caption pairs for the first ``count`` images, for reports."""
    rows, position = _unique_images(split)
    rows = rows[:count]
    dtype = next(task.parameters()).dtype
    device = next(task.parameters()).device
    images = images_to_float(split.images[rows]).to(device, dtype)
    ids = generate_captions(
        task,
        images,
        BOS_ID,
        EOS_ID,
        tokenizer.mask_id,
        decoding or BeamSearchConfig(),
        vocab_size=tokenizer.vocab_size,
    )
    first_ref = {}
    for ex in split.examples:
        first_ref.setdefault(position[ex["image_id"]], ex.get("raw_text") or tokenizer.decode(ex["text"]))
    return [(tokenizer.decode(i), first_ref[r]) for r, i in enumerate(ids)]
