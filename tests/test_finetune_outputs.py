"""Official outputs of finetuning (VQAv2 submission, COCO caption results and scores, retrieval recalls) and
keeping the best evaluated checkpoint (issue 14 item 4; docs/finetune.md, "Outputs")."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_data import shapes_recipe, shapes_spm

from beit3.engine.checkpoint import latest_checkpoint, read_marker
from beit3.finetune import outputs
from beit3.finetune.metrics import bleu, cider_d
from beit3.finetune.train import main

DS_CONFIG = "ds_configs/zero0_fp32.json"

# Four images' reference captions and one candidate each, overlapping at every n-gram order up to 4 (so that
# no BLEU precision is zero: there pycocoevalcap's 1e-9 smoothing and our plain 0 would differ).
REFERENCES = [
    ["a red disc on a table", "a red circle on a white table", "the red disc"],
    ["a blue square on white", "blue square on white paper"],
    ["two dogs running in a park", "dogs play in the park", "two dogs run in the grass"],
    ["a man rides a brown horse", "a man riding a horse"],
]
CANDIDATES = ["a red disc on a white table", "a blue square on white paper", "two dogs run in the park",
              "a man riding a brown horse"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One process group for all in-process runs (DeepSpeed keeps a handle on the first one it sees)."""
    from beit3.engine.launch import init_distributed

    init_distributed()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return shapes_spm(tmp_path_factory.mktemp("spm"))


# ----- the file formats ---------------------------------------------------------------------------------
def test_the_vqa_submission_holds_one_answer_name_per_question():
    got = outputs.vqa_submission([262148000, 262148001], [2, 0], ["yes", "no", "2"])
    assert got == [{"question_id": 262148000, "answer": "2"}, {"question_id": 262148001, "answer": "yes"}]
    with pytest.raises(ValueError, match="one answer per question"):
        outputs.vqa_submission([5, 5], [0, 1], ["yes", "no"])


def test_caption_results_are_the_coco_results_format():
    assert outputs.caption_results([391895, 522418], ["a man on a bike.", "a woman with a cake."]) == [
        {"image_id": 391895, "caption": "a man on a bike."},
        {"image_id": 522418, "caption": "a woman with a cake."},
    ]


def test_retrieval_report_is_the_released_percentages_and_their_mean():
    recalls = {"tr_r1": 0.5, "tr_r5": 0.75, "tr_r10": 1.0, "ir_r1": 0.25, "ir_r5": 0.5, "ir_r10": 1.0}
    report = outputs.retrieval_report({**recalls, "average": 0.0})
    assert report == {**{k: 100 * v for k, v in recalls.items()}, "average_score": 400 / 6}


# ----- caption scores: pycocoevalcap and the fallback ----------------------------------------------------
def test_builtin_bleu_and_cider_equal_pycocoevalcap_on_the_same_tokens():
    """Compared on pre-tokenised captions through pycocoevalcap's scorers' compute_score (its PTB tokenizer
    needs Java): the same tokens go into both."""
    pytest.importorskip("pycocoevalcap.cider.cider", reason="pip install pycocoevalcap==1.2")
    gts = {i: [" ".join(outputs.caption_tokens(r)) for r in refs] for i, refs in enumerate(REFERENCES)}
    res = {i: [" ".join(outputs.caption_tokens(c))] for i, c in enumerate(CANDIDATES)}
    official = outputs.coco_scores(gts, res)
    assert official["bleu4"] == pytest.approx(bleu(CANDIDATES, REFERENCES), rel=1e-6)
    assert official["cider"] == pytest.approx(cider_d(CANDIDATES, REFERENCES), rel=1e-9)
    assert 0 < official["rouge_l"] <= 1


def test_caption_scores_fall_back_to_the_builtin_bleu_and_cider(monkeypatch):
    monkeypatch.setattr(outputs, "have_pycocoevalcap", lambda: False)
    scores, scorer = outputs.caption_scores(CANDIDATES, REFERENCES, official=True)
    assert scorer == "builtin"
    assert scores == {"bleu4": bleu(CANDIDATES, REFERENCES), "cider": cider_d(CANDIDATES, REFERENCES)}


@pytest.mark.slow
def test_official_caption_scores_run_the_ptb_tokenizer_and_meteor_under_java():
    pytest.importorskip("pycocoevalcap.cider.cider", reason="pip install pycocoevalcap==1.2")
    if not outputs.have_java():
        pytest.skip("no java: pycocoevalcap's PTB tokenizer and METEOR run in it")
    scores, scorer = outputs.caption_scores(CANDIDATES, REFERENCES, official=True)
    assert scorer.startswith("pycocoevalcap (PTB tokenizer")
    assert {"bleu4", "rouge_l", "cider", "meteor"} <= scores.keys() and 0 < scores["meteor"] < 1
    assert scores["cider"] == pytest.approx(cider_d(CANDIDATES, REFERENCES), rel=0.05)  # tokenisers differ


# ----- prediction files from a finetuned model --------------------------------------------------------
def _train(tmp_path, spm, task: str, steps: int = 2, **train) -> tuple:
    run = tmp_path / f"run_{task}"
    recipe = shapes_recipe(tmp_path / f"{task}.toml", spm, task,
                           train={"total_steps": steps, "warmup_steps": 1, **train})  # fmt: skip
    args = ["--config", recipe, "--ds-config", DS_CONFIG, "--output-dir", str(run),
            "--ds-set", "train_micro_batch_size_per_gpu=4"]  # fmt: skip
    assert main(args) == 0
    return run, args


def _write_vqa_index(folder, answers: list[str]) -> None:
    """A released-format VQA index: train rows with labels, test-dev rows without, qids, answer2label.txt."""
    from beit3.finetune.data.build import make_shapes_split

    split = make_shapes_split(3, 64, seed=3)
    for i, image in enumerate(split.images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
    rows = [{"image_path": f"img{i}.png", "text": q, "labels": [1], "scores": [1.0], "qid": 1000 + 10 * i + j,
             "image_id": i} for i in range(3) for j, q in enumerate(["what color is the shape?",
                                                                      "what shape is it?"])]  # fmt: skip
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = [{**r, "labels": [], "scores": []} for r in rows]
    (folder / "test-dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    (folder / "answer2label.txt").write_text(
        "".join(json.dumps({"answer": a, "label": i}) + "\n" for i, a in enumerate(answers))
    )


def test_predict_writes_the_vqa_submission_with_the_index_question_ids(tmp_path, spm, monkeypatch, capsys):
    from beit3.finetune.data.build import COLORS, SHAPES

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, args = _train(tmp_path, spm, "vqa")
    answers = [f"answer {a}" for a in (*COLORS, *SHAPES)]  # as many as the trained head has
    index = tmp_path / "vqa_index"
    index.mkdir()
    _write_vqa_index(index, answers)
    train, test = index / "train.jsonl", index / "test-dev.jsonl"
    jsonl = ["--set", "data.source=jsonl", "--set", f"data.root={index}", "--set", f"data.train={train}",
             "--set", f"data.eval={test}"]  # fmt: skip
    out = tmp_path / "vqa_test-dev_submission.json"
    capsys.readouterr()
    assert main(args + jsonl + ["--eval-only", str(run / "model.pth"), "--predict", str(out)]) == 0
    submission = json.loads(out.read_text())
    assert [row["question_id"] for row in submission] == [1000, 1001, 1010, 1011, 1020, 1021]
    assert all(row.keys() == {"question_id", "answer"} and row["answer"] in answers for row in submission)
    assert json.loads(capsys.readouterr().out) == {"questions": 6}  # test-dev has no answers to score


def test_predict_writes_coco_caption_results_scored_against_coco_annotations(
    tmp_path, spm, monkeypatch, capsys
):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(outputs, "have_java", lambda: False)  # the pure-python scorers: a fast test
    run, args = _train(tmp_path, spm, "captioning")
    refs = tmp_path / "captions_gt.json"  # COCO format; the eval split's images are numbered 0..7
    refs.write_text(json.dumps({"annotations": [{"image_id": i, "caption": c} for i in range(8)
                                                for c in ("a red disc.", "a blue square.")]}))  # fmt: skip
    out = tmp_path / "captions.json"
    capsys.readouterr()
    assert main(args + ["--eval-only", str(run / "model.pth"), "--predict", str(out),
                        "--references", str(refs)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert sorted(r["image_id"] for r in results) == list(range(8))  # one per eval image
    assert all(r.keys() == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 8 and {"bleu4", "cider"} <= report["scores"].keys()
    coco = outputs.have_pycocoevalcap()
    assert report["scorer"].startswith("pycocoevalcap (caption_tokens: no java" if coco else "builtin")


def test_predict_writes_the_released_retrieval_recalls(tmp_path, spm, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run, args = _train(tmp_path, spm, "retrieval")
    out = tmp_path / "recalls.json"
    assert main(args + ["--eval-only", str(run / "model.pth"), "--predict", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report) == [*outputs.RETRIEVAL_KEYS, "average_score"]
    assert all(0 <= v <= 100 for v in report.values())
    assert report["average_score"] == pytest.approx(sum(report[k] for k in outputs.RETRIEVAL_KEYS) / 6)


def test_predict_without_eval_only_or_for_a_task_without_a_file_exits_2(tmp_path, spm, capsys):
    recipe = shapes_recipe(tmp_path / "r.toml", spm, "nlvr2")
    args = ["--config", recipe, "--ds-config", DS_CONFIG, "--output-dir", str(tmp_path / "run")]
    assert main(args + ["--predict", str(tmp_path / "p.json")]) == 2
    assert "--predict and --references need --eval-only" in capsys.readouterr().err
    model = tmp_path / "model.pth"
    model.write_bytes(b"")
    assert main(args + ["--eval-only", str(model), "--predict", str(tmp_path / "p.json")]) == 2
    assert "has no official output file" in capsys.readouterr().err
    assert main(args + ["--eval-only", str(model), "--references", str(model)]) == 2
    assert "--references scores caption predictions" in capsys.readouterr().err


# ----- keeping the best evaluated checkpoint ----------------------------------------------------------
def _scripted_eval(monkeypatch, values: list[float]):
    """Replace the finetune evaluation by a scripted accuracy sequence (the final evaluation repeats the
    last value)."""
    import beit3.finetune.train as train

    sequence = iter(values)
    last = values[-1]

    def fake(recipe, task, data, tokenizer, batch_size, device):
        return {"eval/accuracy": next(sequence, last)}

    monkeypatch.setattr(train, "_evaluate", fake)


def _tags(run) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))


def test_the_best_evaluated_checkpoint_is_kept_through_rotation_and_resume(tmp_path, spm, monkeypatch):
    from beit3.engine.consolidate import consolidate_checkpoint

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = {"eval_every": 2, "save_every": 2, "keep_last": 1, "log_every": 4}
    # Up then down: the best is step 4's, and keep_last 1 rotates away steps 2 and 6.
    _scripted_eval(monkeypatch, [0.3, 0.9, 0.5, 0.4])
    run, args = _train(tmp_path, spm, "image_classification", steps=8, **settings)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best == {"metric": "eval/accuracy", "mode": "max", "value": 0.9, "step": 4, "tag": "step00000004"}
    assert _tags(run) == ["step00000004", "step00000008"] and latest_checkpoint(run).name == "step00000008"
    assert read_marker(latest_checkpoint(run))["best"] == best  # what a resume restores
    trainer = json.loads((run / "config.json").read_text())["engine"]["trainer"]
    assert (trainer["best_metric"], trainer["best_mode"]) == ("eval/accuracy", "max")  # the task's default
    exported = torch.load(run / "best_model.pth", map_location="cpu", weights_only=True)["model"]
    at_step_4 = consolidate_checkpoint(run, tag="step00000004")
    assert all(torch.equal(exported[k], at_step_4[k]) for k in at_step_4)
    # Resumed with values below the best so far: the best stays step 4's, never rotated out.
    _scripted_eval(monkeypatch, [0.6, 0.7])
    assert main(args + ["--set", "train.total_steps=12"]) == 0
    assert json.loads((run / "checkpoints" / "best.json").read_text()) == best
    assert _tags(run) == ["step00000004", "step00000012"]
    # A better value later takes over; the old best then rotates like any checkpoint.
    _scripted_eval(monkeypatch, [0.95, 0.2])
    assert main(args + ["--set", "train.total_steps=16"]) == 0
    assert json.loads((run / "checkpoints" / "best.json").read_text())["tag"] == "step00000014"
    assert _tags(run) == ["step00000014", "step00000016"]


def test_best_mode_and_best_metric_are_validated_with_the_fix():
    from beit3.engine.trainer_config import TrainSettings

    assert "use 'max' (higher is better) or 'min'" in TrainSettings(best_mode="up").problem()
    message = TrainSettings(best_metric="eval/accuracy").problem()
    assert "train.best_metric='eval/accuracy' needs periodic evaluations: set eval_every > 0" in message
    assert TrainSettings(best_metric="eval/accuracy", eval_every=5).problem() is None


def test_a_best_metric_the_evaluation_does_not_return_names_the_ones_it_does():
    from beit3.engine.best import BestMetricError, KeepBest

    keep = KeepBest("eval/acc", "max")
    with pytest.raises(BestMetricError, match=r"not among the evaluation's scalars \(eval/accuracy\)"):
        keep.offer({"eval/accuracy": 0.5}, step=2)
    lower = KeepBest("eval/loss", "min")
    assert lower.offer({"eval/loss": 2.0}, 2) and lower.offer({"eval/loss": 1.0}, 4)
    assert not lower.offer({"eval/loss": 1.5}, 6) and not lower.offer({"eval/loss": float("nan")}, 8)
    assert lower.record["step"] == 4
