"""beit3-finetune-index: released-format indexes from each dataset's public raw files (issue 14 item 2).

Each test writes a few raw files in the real format (same structure and field names) with a handful of
PIL images, runs the command through ``main()``, and reads the result with the package's own reader
(``load_task_data`` on the shipped recipe's ``[data]`` section, run from a folder where the recipe's
relative paths land in the test's data), so a file name or field the recipes do not read fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from beit3.finetune.data.batches import Collator, tokenize_split
from beit3.finetune.data.build import load_task_data
from beit3.finetune.data.sources import load_jsonl_split
from beit3.finetune.data.vqa_answers import (
    answer_vocabulary,
    normalize_answer,
    question_targets,
    soft_score,
)
from beit3.finetune.index import main
from beit3.finetune.recipe import load_recipe
from beit3.tokenizers.text import BOS_ID, EOS_ID

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


def image(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recipe_data(name: str, **overrides):
    """The shipped recipe's ``[data]`` section (paths relative to the working directory)."""
    return load_recipe(name, [f"data.{k}={v}" for k, v in overrides.items()]).data


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----- ImageNet-style class folders -------------------------------------------------------------------------
@pytest.fixture
def imagenet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/imagenet"
    for split, per_class in (("train", 2), ("val", 1)):
        for c, name in enumerate(("n02", "n01", "n10")):
            for i in range(per_class):
                image(root / split / name / f"{name}_{i}.JPEG", (40 * c, 0, 0))
    image(root / "train/n10/nested/deep.png")  # sub-folders count, as ImageFolder's walk
    (root / "train/n01/README.txt").write_text("not an image")
    return root


def test_imagenet_labels_are_sorted_class_folders_and_the_recipe_reads_them(imagenet, capsys):
    code, out, _ = run(capsys, "imagenet", "--train", imagenet / "train", "--val", imagenet / "val")
    assert code == 0 and "3 classes; 7 train and 3 val images" in out
    assert (imagenet / "imagenet.classes.txt").read_text() == "n01\nn02\nn10\n"
    train = rows(imagenet / "imagenet.train.index.jsonl")
    assert train[0] == {"image_path": "train/n01/n01_0.JPEG", "label": 0}
    assert [r["label"] for r in train] == [0, 0, 1, 1, 2, 2, 2]
    assert train[-1]["image_path"] == "train/n10/nested/deep.png"
    data = load_task_data(recipe_data("imagenet1k_base"), "image_classification", SIZE)
    assert [ex["label"] for ex in data.eval.examples] == [0, 1, 2]
    assert data.train.images.shape == (7, 3, SIZE, SIZE) and len(data.eval.examples) == 3


def test_imagenet_refuses_a_val_class_the_train_folder_lacks(imagenet, capsys):
    image(imagenet / "val/n99/x.jpg")
    code, _, err = run(capsys, "imagenet", "--train", imagenet / "train", "--val", imagenet / "val")
    assert code == 2 and "n99" in err and err.startswith("beit3-finetune-index: error:")
    assert not (imagenet / "imagenet.train.index.jsonl").exists()


# ----- VQAv2 ---------------------------------------------------------------------------------------------
def vqa_question(qid: int, image_id: int, text: str) -> dict:
    return {"image_id": image_id, "question": text, "question_id": qid}


def vqa_annotation(qid: int, image_id: int, major: str, answers: list[str]) -> dict:
    given = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]
    return {"question_id": qid, "image_id": image_id, "answers": given, "multiple_choice_answer": major,
            "question_type": "what", "answer_type": "other"}  # fmt: skip


@pytest.fixture
def vqa(tmp_path, monkeypatch):
    """Official-format files: train (images 1, 2), val (images 7, 8), test and test-dev (image 30)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/vqa"
    train_q = [vqa_question(10, 1, "How many dogs?"), vqa_question(11, 1, "What color?"),
               vqa_question(12, 2, "Is it raining?"), vqa_question(13, 2, "Which brand?")]  # fmt: skip
    train_a = [
        vqa_annotation(10, 1, "Two", ["two"] * 4 + ["2"] + ["three"] * 5),  # "two" and "2" are one answer
        vqa_annotation(11, 1, "red", ["red", "Red.", "blue"] + ["green"] * 7),
        vqa_annotation(12, 2, "no", ["no"] * 10),
        vqa_annotation(13, 2, "nike", ["nike"] * 10),  # given once as the major answer: not in the vocabulary
    ]
    val_q = [vqa_question(20, 7, "How many cats?"), vqa_question(21, 8, "Is it red?"),
             vqa_question(22, 8, "What is it?")]  # fmt: skip
    val_a = [
        vqa_annotation(20, 7, "2", ["2"] * 3 + ["4"] * 3 + ["5"] * 4),
        vqa_annotation(21, 8, "no", ["no"] * 9 + ["yes"]),
        vqa_annotation(22, 8, "red", ["A red."] * 10),  # "A red." is "red"
    ]
    questions = {"train2014": train_q, "val2014": val_q, "test2015": [vqa_question(30, 30, "Why?")],
                 "test-dev2015": [vqa_question(31, 30, "Who?")]}  # fmt: skip
    for tag, qs in questions.items():
        write_json(root / f"raw/v2_OpenEnded_mscoco_{tag}_questions.json", {"questions": qs, "license": {}})
    for tag, anns in (("train2014", train_a), ("val2014", val_a)):
        write_json(
            root / f"raw/v2_mscoco_{tag}_annotations.json", {"annotations": anns, "data_type": "mscoco"}
        )
    for folder, ids in (("train2014", (1, 2)), ("val2014", (7, 8)), ("test2015", (30,))):
        for i in ids:
            image(root / folder / f"COCO_{folder}_{i:012d}.jpg", (i * 20, 0, 0))
    return root


def build_vqa(capsys, root: Path, *extra: str) -> tuple[int, str, str]:
    return run(capsys, "vqav2", "--root", root, "--annotations", root / "raw", "--min-answer-count", 2,
               "--rest-val-images", 1, *extra)  # fmt: skip


def test_vqa_answer_normalisation_follows_the_official_evaluation():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("the red-and-white bus") == "red and white bus"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("2,000") == "2000"
    assert normalize_answer("yes!\n") == "yes" and normalize_answer("(none)") == "0"
    assert normalize_answer("An apple, a pear") == "apple pear"


def test_vqa_soft_scores_and_vocabulary_order_are_the_released_rules():
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    # first-met order, not frequency order; the cap keeps the most frequent
    assert answer_vocabulary(["b", "a", "a", "c", "b", "a"], min_count=2) == ["b", "a"]
    assert answer_vocabulary(["b", "a", "a", "c", "b", "a"], min_count=1, max_answers=2) == ["b", "a"]
    assert question_targets(["red", "red", "blue", "green"], {"blue": 0, "red": 1}) == ([1, 0], [0.6, 0.3])


def test_vqa_indexes_answers_scores_splits_and_the_recipe_reads_them(vqa, capsys, tok):
    code, out, _ = build_vqa(capsys, vqa, "--tokenizer", tok.model_file, "--check-images")
    assert code == 0, out
    vocab = [json.loads(line) for line in (vqa / "answer2label.txt").read_text().splitlines()]
    assert vocab == [{"answer": "2", "label": 0}, {"answer": "red", "label": 1}, {"answer": "no", "label": 2}]
    assert "set task.num_classes = 3" in out
    train = {r["qid"]: r for r in rows(vqa / "vqa.train.jsonl")}
    assert sorted(train) == [10, 11, 12]  # 13: no annotator answer in the vocabulary
    assert train[10]["image_path"] == "train2014/COCO_train2014_000000000001.jpg"
    assert (train[10]["labels"], train[10]["scores"]) == ([0], [1.0])  # "two" x4 + "2" -> 5 annotators
    assert (train[11]["labels"], train[11]["scores"]) == ([1], [0.6])  # "red", "Red."; blue/green unknown
    assert train[10]["text"] == "How many dogs?" and train[10]["text_segment"] == tok.encode("How many dogs?")
    val = rows(vqa / "vqa.val.jsonl")
    targets = [(r["qid"], r["labels"], r["scores"]) for r in val]
    assert targets == [(20, [0], [0.9]), (21, [2], [1.0]), (22, [1], [1.0])]
    rest, trainable = rows(vqa / "vqa.rest_val.jsonl"), rows(vqa / "vqa.trainable_val.jsonl")
    assert len({r["image_id"] for r in rest}) == 1
    assert sorted(r["qid"] for r in rest + trainable) == [20, 21, 22]
    assert {r["image_id"] for r in rest}.isdisjoint(r["image_id"] for r in trainable)
    assert rows(vqa / "vqa.train_trainable_val.jsonl") == list(train.values()) + trainable
    (test,) = rows(vqa / "vqa.test-dev.jsonl")
    assert test["image_path"] == "test2015/COCO_test2015_000000000030.jpg"
    assert (test["labels"], test["scores"], test["qid"]) == ([], [], 31)

    d = recipe_data("vqav2_base")  # trains on train + trainable_val, as released
    assert d.train.endswith("vqa.train_trainable_val.jsonl")
    data = load_task_data(d, "vqa", SIZE)
    assert data.classes == ["2", "red", "no"]
    assert [e["question_id"] for e in data.train.examples] == [*train, *(r["qid"] for r in trainable)]
    tokenize_split(data.train, tok, d.max_text_len)
    ex = next(e for e in data.train.examples if e["question_id"] == 11)
    assert ex["scores"] == {1: 0.6} and ex["text"] == [BOS_ID, *tok.encode("What color?"), EOS_ID]
    batch = Collator("vqa", data.train.images, num_answers=3)(data.train.examples[:3], None)
    assert torch.equal(batch["scores"], torch.tensor([[1.0, 0, 0], [0, 0.6, 0], [0, 0, 1.0]]))
    assert {e["question_id"] for e in data.eval.examples} == {r["qid"] for r in rest}


def test_vqa_raw_annotator_answers_count_as_written(vqa, capsys):
    assert build_vqa(capsys, vqa, "--raw-annotator-answers", "--splits", "train", "val")[0] == 0
    train = {r["qid"]: r for r in rows(vqa / "vqa.train.jsonl")}
    # "two" x4 and "Red." no longer count as "2" and "red": only the literal "2" and "red"
    assert (train[10]["scores"], train[11]["scores"], train[12]["scores"]) == ([0.3], [0.3], [1.0])


def test_vqa_reuses_an_answer_vocabulary(vqa, capsys, tmp_path):
    vocab = tmp_path / "answer2label.txt"
    vocab.write_text('{"answer": "no", "label": 0}\n{"answer": "nike", "label": 1}\n')
    assert build_vqa(capsys, vqa, "--answer-vocab", vocab, "--splits", "train")[0] == 0
    assert [(r["qid"], r["labels"]) for r in rows(vqa / "vqa.train.jsonl")] == [(12, [0]), (13, [1])]


def test_vqa_reports_bad_inputs_and_writes_nothing(vqa, capsys):
    (vqa / "raw/v2_mscoco_val2014_annotations.json").unlink()
    code, _, err = build_vqa(capsys, vqa)
    assert code == 2 and "v2_mscoco_val2014_annotations.json does not exist" in err and "visualqa.org" in err
    write_json(vqa / "raw/v2_mscoco_val2014_annotations.json", {"annotations": [{"question_id": 20}]})
    code, _, err = build_vqa(capsys, vqa)
    assert code == 2 and "annotations[0] has no 'image_id'" in err
    assert not list(vqa.glob("*.jsonl")) and not (vqa / "answer2label.txt").exists()


def test_vqa_check_images_names_the_missing_ones(vqa, capsys):
    (vqa / "val2014/COCO_val2014_000000000008.jpg").unlink()
    code, _, err = build_vqa(capsys, vqa, "--check-images")
    assert code == 2 and "val2014/COCO_val2014_000000000008.jpg" in err
    assert not list(vqa.glob("*.jsonl"))
    assert build_vqa(capsys, vqa)[0] == 0  # without the check the index is written


def test_an_interrupted_write_leaves_each_index_whole(vqa, capsys, monkeypatch):
    import beit3.engine.checkpoint as checkpoint

    build_vqa(capsys, vqa)
    before = {p.name: p.read_text() for p in vqa.glob("*.jsonl")}
    assert len(rows(vqa / "vqa.rest_val.jsonl")) == 1
    replace, calls = checkpoint.os.replace, []

    def killed_after_two(src, dst):
        calls.append(dst)
        if len(calls) > 2:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_vqa(capsys, vqa, "--rest-val-images", 2, "--splits", "train", "val")
    assert [p.name for p in calls] == ["vqa.train.jsonl", "vqa.val.jsonl", "vqa.rest_val.jsonl"]
    # the files renamed before the kill are new, the others old; none is half written
    assert (vqa / "vqa.rest_val.jsonl").read_text() == before["vqa.rest_val.jsonl"]
    assert (vqa / "vqa.train_trainable_val.jsonl").read_text() == before["vqa.train_trainable_val.jsonl"]
    assert sorted(p.name for p in vqa.glob("*.jsonl")) == sorted(before)


# ----- NLVR2 ---------------------------------------------------------------------------------------------
def test_nlvr2_pairs_come_from_the_identifier_in_the_official_layout(tmp_path, monkeypatch, capsys, tok):
    monkeypatch.chdir(tmp_path)
    root, raw = tmp_path / "data/nlvr2", tmp_path / "nlvr/nlvr2/data"
    raw.mkdir(parents=True)
    train = [
        {
            "identifier": "train-10171-0-0",
            "sentence": "One dog.",
            "label": "True",
            "directory": 71,
            "synset": "dog",
        },
        {"identifier": "train-10171-0-1", "sentence": "Two dogs.", "label": "False", "directory": 71},
    ]
    dev = [{"identifier": "dev-850-2-0", "sentence": "A bird.", "label": "False"}]
    (raw / "train.json").write_text("".join(json.dumps(r) + "\n" for r in train))
    (raw / "dev.json").write_text(json.dumps(dev[0]) + "\n")
    test1 = {"identifier": "test1-0-1-3", "sentence": "A cow.", "label": "True"}
    (raw / "test1.json").write_text("\n" + json.dumps(test1) + "\n\n")  # blank lines are skipped
    for i in (0, 1):
        image(root / f"images/train/71/train-10171-0-img{i}.png")
        image(root / f"dev/dev-850-2-img{i}.png", (0, 0, 200 * i))
    code, out, _ = run(capsys, "nlvr2", "--data", raw, "--root", root, "--splits", "train", "dev",
                       "--tokenizer", tok.model_file, "--check-images")  # fmt: skip
    assert code == 0, out
    assert run(capsys, "nlvr2", "--data", raw, "--root", root, "--splits", "test1")[0] == 0
    (row,) = rows(root / "nlvr2.test-P.index.jsonl")  # test1 is written under the released name
    assert (row["image_path"], row["image2_path"]) == ("test1/test1-0-1-img0.png", "test1/test1-0-1-img1.png")
    first = rows(root / "nlvr2.train.index.jsonl")[0]
    assert first["image_path"] == "images/train/71/train-10171-0-img0.png"
    assert first["image2_path"] == "images/train/71/train-10171-0-img1.png"
    assert (first["label"], first["identifier"]) == (1, "train-10171-0-0")
    assert rows(root / "nlvr2.dev.index.jsonl")[0]["image_path"] == "dev/dev-850-2-img0.png"
    data = load_task_data(recipe_data("nlvr2_base"), "nlvr2", SIZE)
    assert [ex["label"] for ex in data.train.examples] == [1, 0]
    assert data.train.examples[0]["image"] == data.train.examples[1]["image"] == 0
    assert data.train.examples[0]["image2"] == 1 and data.eval.images.shape == (2, 3, SIZE, SIZE)


def test_nlvr2_refuses_a_label_that_is_not_true_or_false(tmp_path, capsys):
    good = {"identifier": "train-1-0-0", "sentence": "x", "label": "True"}
    (tmp_path / "train.json").write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "label": "yes"}))
    code, _, err = run(capsys, "nlvr2", "--data", tmp_path, "--root", tmp_path, "--splits", "train")
    assert code == 2 and "train.json line 3" in err and "'yes'" in err


# ----- Karpathy splits: COCO, Flickr30k -------------------------------------------------------------------
def karpathy_coco(path: Path) -> Path:
    def item(cocoid, split, folder, captions):
        sentences = [{"raw": c, "tokens": c.lower().split(), "imgid": cocoid} for c in captions]
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        return {"filepath": folder, "filename": name, "imgid": cocoid, "split": split, "cocoid": cocoid,
                "sentids": [], "sentences": sentences}  # fmt: skip

    images = [
        item(5, "train", "train2014", ["A dog runs.", "A brown dog."]),
        item(6, "val", "val2014", ["A cat."]),
        item(7, "restval", "val2014", ["Two birds.", "Birds sit."]),
        item(8, "test", "val2014", ["A red bus.", "A bus on a road."]),
    ]
    return write_json(path, {"images": images, "dataset": "coco"})


def test_coco_retrieval_folds_restval_into_train_with_running_image_ids(tmp_path, monkeypatch, capsys, tok):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/coco"
    split_file = karpathy_coco(tmp_path / "dataset_coco.json")
    code, _, _ = run(
        capsys, "coco-retrieval", "--karpathy", split_file, "--root", root, "--tokenizer", tok.model_file
    )
    assert code == 0
    train = rows(root / "coco_retrieval.train.jsonl")
    five, seven = "train2014/COCO_train2014_000000000005.jpg", "val2014/COCO_val2014_000000000007.jpg"
    assert [(r["image_path"], r["image_id"]) for r in train] == [(five, 0), (five, 0), (seven, 1), (seven, 1)]
    assert train[2]["text_segment"] == tok.encode("Two birds.")
    for cocoid in (5, 6, 7, 8):
        folder = "train2014" if cocoid == 5 else "val2014"
        image(root / folder / f"COCO_{folder}_{cocoid:012d}.jpg")
    d = recipe_data("coco_retrieval_base")
    data = load_task_data(d, "retrieval", SIZE)
    assert [ex["image_id"] for ex in data.eval.examples] == [0, 0]  # test: one image, two captions
    tokenize_split(data.eval, tok, d.max_text_len)
    assert data.eval.examples[1]["raw_text"] == "A bus on a road."


def test_coco_captioning_keeps_coco_ids_and_each_reference_caption(tmp_path, monkeypatch, capsys, tok):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/coco"
    split_file = karpathy_coco(tmp_path / "dataset_coco.json")
    code, _, _ = run(
        capsys, "coco-captioning", "--karpathy", split_file, "--root", root, "--tokenizer", tok.model_file
    )
    assert code == 0
    train = rows(root / "coco_captioning.train.jsonl")
    assert [r["image_id"] for r in train] == [5, 5, 7, 7]
    for cocoid in (5, 6, 7):
        folder = "train2014" if cocoid == 5 else "val2014"
        image(root / folder / f"COCO_{folder}_{cocoid:012d}.jpg")
    d = recipe_data("coco_captioning_base")
    data = load_task_data(d, "captioning", SIZE)
    tokenize_split(data.eval, tok, d.max_text_len)
    (ex,) = data.eval.examples
    assert ex["image_id"] == 6 and ex["raw_text"] == "A cat." and ex["text"][1:-1] == tok.encode("A cat.")


def test_flickr30k_images_live_in_their_folder(tmp_path, capsys):
    splits = ("train", "train", "val", "test")
    images = [
        {"filename": f"{i}.jpg", "imgid": i, "split": s, "sentences": [{"raw": f"caption {i}", "tokens": []}]}
        for i, s in enumerate(splits)
    ]
    split_file = write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    assert run(capsys, "flickr30k", "--karpathy", split_file, "--root", tmp_path)[0] == 0
    train = rows(tmp_path / "flickr30k.train.jsonl")
    assert train == [
        {"image_path": "flickr30k-images/0.jpg", "text": "caption 0", "image_id": 0},
        {"image_path": "flickr30k-images/1.jpg", "text": "caption 1", "image_id": 1},
    ]
    assert rows(tmp_path / "flickr30k.test.jsonl")[0]["image_id"] == 0


def test_karpathy_file_of_the_wrong_structure_is_refused(tmp_path, capsys):
    images = [{"filename": "x.jpg", "split": "dev", "sentences": []}]
    split_file = write_json(tmp_path / "dataset_coco.json", {"images": images})
    code, _, err = run(capsys, "coco-retrieval", "--karpathy", split_file, "--root", tmp_path)
    assert code == 2 and "images[0]: split 'dev'" in err


# ----- NoCaps --------------------------------------------------------------------------------------------
def test_nocaps_val_rows_hold_every_reference(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data/nocaps"
    info = {"images": [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain"},
                       {"id": 1, "file_name": "00223fe7.jpg", "domain": "near-domain"}],
            "annotations": [{"image_id": 1, "id": 0, "caption": "A man on a horse."},
                            {"image_id": 0, "id": 1, "caption": "A bowl of soup."},
                            {"image_id": 1, "id": 2, "caption": "Someone riding."}]}  # fmt: skip
    captions = write_json(tmp_path / "nocaps_val_4500_captions.json", info)
    for name in ("0013ea2087020901.jpg", "00223fe7.jpg"):
        image(root / "val" / name)
    assert run(capsys, "nocaps", "--captions", captions, "--root", root, "--check-images")[0] == 0
    index = rows(root / "nocaps.val.jsonl")
    assert [(r["image_id"], r["text"]) for r in index] == [
        (0, "A bowl of soup."), (1, "A man on a horse."), (1, "Someone riding.")]  # fmt: skip
    d = recipe_data("coco_captioning_base", eval="data/nocaps/nocaps.val.jsonl", root="data/nocaps",
                    train="data/nocaps/nocaps.val.jsonl")  # fmt: skip
    data = load_task_data(d, "captioning", SIZE)
    assert data.eval.images.shape == (2, 3, SIZE, SIZE) and data.eval.examples[2]["image"] == 1


def test_nocaps_test_image_info_gives_one_row_per_image_without_text(tmp_path, capsys):
    info = write_json(tmp_path / "nocaps_test_image_info.json", {"images": [{"id": 4, "file_name": "b.jpg"}]})
    image(tmp_path / "test/b.jpg")
    assert run(capsys, "nocaps", "--captions", info, "--root", tmp_path, "--split", "test")[0] == 0
    assert rows(tmp_path / "nocaps.test.jsonl") == [{"image_path": "test/b.jpg", "image_id": 4}]
    split = load_jsonl_split(tmp_path / "nocaps.test.jsonl", tmp_path, SIZE)
    assert split.examples == [{"image": 0, "image_id": 4}]


def test_nocaps_annotation_of_an_unknown_image_is_refused(tmp_path, capsys):
    info = {"images": [{"id": 0, "file_name": "a.jpg"}], "annotations": [{"image_id": 9, "caption": "x"}]}
    captions = write_json(tmp_path / "nocaps_val_4500_captions.json", info)
    code, _, err = run(capsys, "nocaps", "--captions", captions, "--root", tmp_path)
    assert code == 2 and "image_id 9 is not among the file's images" in err


# ----- the command -----------------------------------------------------------------------------------------
def test_the_console_script_is_registered_and_runs_as_a_module(tmp_path):
    assert "beit3-finetune-index=beit3.finetune.index:main" in (REPO / "setup.py").read_text()
    done = subprocess.run([sys.executable, "-m", "beit3.finetune.index", "nocaps", "--captions",
                           tmp_path / "missing.json", "--root", tmp_path],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "missing.json does not exist" in done.stderr
    assert "nocaps.org" in done.stderr
