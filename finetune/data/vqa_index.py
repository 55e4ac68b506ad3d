"""VQAv2 indexes in the released format from the official questions and annotations JSON files.

Writes ``vqa.{train,val,test,test-dev}.jsonl``, the ViLT-style split of val into ``vqa.rest_val.jsonl``
(the questions of ``rest_val_images`` val images, 1,000 as released, drawn with a seed here; the release
drew them unseeded) and ``vqa.trainable_val.jsonl`` (the rest), ``vqa.train_trainable_val.jsonl`` (train +
trainable_val in one file: the released training set, for ``data.train``), and ``answer2label.txt``
(JSON lines ``{"answer", "label"}`` in label order). Rows: ``image_path``
(``<folder>/COCO_<folder>_<image_id:012d>.jpg``; test-dev images live in ``test2015``), ``text`` (the
question), ``labels`` + ``scores`` (empty for the test splits), ``qid`` (the question id, for submissions)
and ``image_id``. Train and val questions none of whose annotators' answers is in the vocabulary are left
out, as released. Answers and scores: :mod:`beit3.finetune.data.vqa_answers`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

from beit3.finetune.data.indexes import IndexFiles, RawDataError, need, need_text, progress, read_json
from beit3.finetune.data.vqa_answers import (
    MIN_ANSWER_COUNT,
    NUM_ANSWERS,
    answer_vocabulary,
    normalize_answer,
    question_targets,
)

# split -> (file tag, image folder)
VQA_SPLITS = {
    "train": ("train2014", "train2014"),
    "val": ("val2014", "val2014"),
    "test": ("test2015", "test2015"),
    "test-dev": ("test-dev2015", "test2015"),
}
ANNOTATED = ("train", "val")
WHERE_TO_GET = "visualqa.org/download.html, 'Questions' and 'Annotations' of VQA v2 (real images)"
QUESTIONS_EXPECTED = '{"questions": [{"image_id", "question", "question_id"}]}'
ANNOTATIONS_EXPECTED = (
    '{"annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer"}]}]}'
)
REST_VAL_IMAGES = 1000


def questions_file(split: str) -> str:
    return f"v2_OpenEnded_mscoco_{VQA_SPLITS[split][0]}_questions.json"


def annotations_file(split: str) -> str:
    return f"v2_mscoco_{VQA_SPLITS[split][0]}_annotations.json"


def image_path(split: str, image_id: int) -> str:
    """The COCO image of a question: ``train2014/COCO_train2014_000000000009.jpg``."""
    folder = VQA_SPLITS[split][1]
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def read_questions(path: Path) -> list[dict]:
    """The checked questions of one split, in file order."""
    data = read_json(path, "VQAv2 questions file", WHERE_TO_GET)
    out = []
    for i, q in enumerate(need(data, "questions", str(path), QUESTIONS_EXPECTED, list)):
        where = f"{path}: questions[{i}]"
        out.append({"question_id": need(q, "question_id", where, QUESTIONS_EXPECTED, int),
                    "image_id": need(q, "image_id", where, QUESTIONS_EXPECTED, int),
                    "question": need_text(q, "question", where, QUESTIONS_EXPECTED)})  # fmt: skip
    return out


def read_annotations(path: Path, questions: list[dict], raw_answers: bool) -> dict[int, dict]:
    """question id -> {"major": normalised multiple-choice answer, "answers": annotators' answers}, checked
    against the questions (every question annotated, the same image). ``raw_answers`` keeps the
    annotators' answers as written (the released builder counted them so)."""
    data = read_json(path, "VQAv2 annotations file", WHERE_TO_GET)
    image_of = {q["question_id"]: q["image_id"] for q in questions}
    out = {}
    for i, a in enumerate(need(data, "annotations", str(path), ANNOTATIONS_EXPECTED, list)):
        where = f"{path}: annotations[{i}]"
        qid = need(a, "question_id", where, ANNOTATIONS_EXPECTED, int)
        image_id = need(a, "image_id", where, ANNOTATIONS_EXPECTED, int)
        if qid not in image_of:
            raise RawDataError(f"{where}: question_id {qid} is not in the questions file of this split")
        if image_of[qid] != image_id:
            raise RawDataError(
                f"{where}: image_id {image_id} differs from question {qid}'s ({image_of[qid]})"
            )
        given = [need(x, "answer", f"{where}.answers[{j}]", ANNOTATIONS_EXPECTED, str)
                 for j, x in enumerate(need(a, "answers", where, ANNOTATIONS_EXPECTED, list))]  # fmt: skip
        major = need(a, "multiple_choice_answer", where, ANNOTATIONS_EXPECTED, str)
        out[qid] = {"major": normalize_answer(major),
                    "answers": given if raw_answers else [normalize_answer(x) for x in given]}  # fmt: skip
    unannotated = [qid for qid in image_of if qid not in out]
    if unannotated:
        raise RawDataError(
            f"{path} lacks the annotations of {len(unannotated)} question(s) (e.g. question_id "
            f"{unannotated[0]}): are the questions and annotations files of the same split?"
        )
    return out


def read_answer_vocabulary(path: str | Path) -> list[str]:
    """Answers of an ``answer2label.txt`` (JSON lines ``{"answer", "label"}``, labels 0, 1, ... in order)."""
    path = Path(path)
    if not path.is_file():
        raise RawDataError(
            f"answer vocabulary {path} does not exist (an answer2label.txt of an earlier build)"
        )
    answers = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RawDataError(f"{path} line {number} is not JSON: {e}") from e
        where, expected = f"{path} line {number}", '{"answer": ..., "label": ...} with labels 0, 1, 2, ...'
        if need(row, "label", where, expected, int) != len(answers):
            raise RawDataError(
                f"{where}: label {row['label']} where {len(answers)} was expected ({expected})"
            )
        answers.append(need(row, "answer", where, expected, str))
    if len(set(answers)) != len(answers):
        raise RawDataError(f"{path} lists an answer twice")
    return answers


def _rows(split: str, questions: list[dict], annotations: dict | None, index: dict) -> tuple[list[dict], int]:
    rows, dropped = [], 0
    for q in progress(questions, f"{split} questions"):
        labels, scores = [], []  # the test splits have no answers
        if annotations is not None:
            labels, scores = question_targets(annotations[q["question_id"]]["answers"], index)
            if not labels:
                dropped += 1
                continue
        rows.append({"image_path": image_path(split, q["image_id"]), "text": q["question"], "labels": labels,
                     "scores": scores, "qid": q["question_id"], "image_id": q["image_id"]})  # fmt: skip
    return rows, dropped


def rest_val_split(val_rows: list[dict], num_images: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest_val, trainable_val): the questions of ``num_images`` val images drawn with ``seed``, and the
    others; both keep the file order."""
    images = list(dict.fromkeys(r["image_path"] for r in val_rows))
    random.Random(seed).shuffle(images)
    held = set(images[:num_images])
    rest = [r for r in val_rows if r["image_path"] in held]
    trainable = [r for r in val_rows if r["image_path"] not in held]
    return rest, trainable


def vqav2_index(
    annotations_dir: str | Path,
    splits: Iterable[str] = tuple(VQA_SPLITS),
    min_answer_count: int = MIN_ANSWER_COUNT,
    max_answers: int = NUM_ANSWERS,
    answer_vocab: str | Path | None = None,
    rest_val_images: int = REST_VAL_IMAGES,
    seed: int = 0,
    raw_answers: bool = False,
) -> IndexFiles:
    """The VQAv2 indexes of ``splits`` (module docstring) from the official files in ``annotations_dir``."""
    splits = list(splits)
    folder = Path(annotations_dir)
    questions = {s: read_questions(folder / questions_file(s)) for s in splits}
    annotations = {s: read_annotations(folder / annotations_file(s), questions[s], raw_answers)
                   for s in splits if s in ANNOTATED}  # fmt: skip
    notes = []
    if answer_vocab is not None:
        answers = read_answer_vocabulary(answer_vocab)
        notes.append(f"answer vocabulary: {len(answers)} answers from {answer_vocab}")
    else:
        if not annotations:
            raise RawDataError("building the answer vocabulary needs the train/val splits, or --answer-vocab")
        majors = [annotations[s][q["question_id"]]["major"] for s in ANNOTATED if s in annotations
                  for q in questions[s]]  # fmt: skip
        answers = answer_vocabulary(majors, min_answer_count, max_answers)
        if not answers:
            raise RawDataError(f"no answer is given {min_answer_count} times: lower --min-answer-count")
        notes.append(f"answer vocabulary: {len(answers)} answers given at least {min_answer_count} times "
                     f"over {' + '.join(s for s in ANNOTATED if s in annotations)}")  # fmt: skip
    if len(answers) != NUM_ANSWERS:
        notes.append(
            f"set task.num_classes = {len(answers)} in the recipe (the released VQAv2 recipe: {NUM_ANSWERS})"
        )
    index = {a: i for i, a in enumerate(answers)}
    files = IndexFiles(notes=notes)
    files.side_files["answer2label.txt"] = "".join(
        json.dumps({"answer": a, "label": i}, ensure_ascii=False) + "\n" for i, a in enumerate(answers)
    )
    for split in splits:
        rows, dropped = _rows(split, questions[split], annotations.get(split), index)
        files.indexes[f"vqa.{split}.jsonl"] = rows
        note = f"{split}: {len(rows)} questions"
        files.notes.append(
            note + (f" ({dropped} without an answer in the vocabulary left out)" if dropped else "")
        )
    if "val" in splits:
        rest, trainable = rest_val_split(files.indexes["vqa.val.jsonl"], rest_val_images, seed)
        files.indexes["vqa.rest_val.jsonl"], files.indexes["vqa.trainable_val.jsonl"] = rest, trainable
        files.notes.append(f"rest_val: {len(rest)} questions; trainable_val: {len(trainable)} (seed {seed})")
        if "train" in splits:
            files.indexes["vqa.train_trainable_val.jsonl"] = files.indexes["vqa.train.jsonl"] + trainable
    return files
