"""``beit3-finetune`` end to end on the engine: loss goes down, eval and export are written, errors exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from engine_helpers import tensorboard_scalars
from run_record import assert_marker_holds_no_recipe, assert_recorded_once
from tiny_data import shapes_recipe, shapes_spm

from beit3.engine.checkpoint import latest_checkpoint, read_marker
from beit3.finetune.train import main
from beit3.model import ModelConfig, get_config

DS_CONFIG = "ds_configs/zero0_fp32.json"


@pytest.fixture(scope="module", autouse=True)
def process_group():
    """One process group for all in-process runs (DeepSpeed keeps a handle on the first one it sees)."""
    from beit3.engine.launch import init_distributed

    init_distributed()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A small SentencePiece model trained on the shapes captions and questions."""
    return shapes_spm(tmp_path_factory.mktemp("spm"))


def _recipe(tmp_path, spm: str, task: str, steps: int) -> str:
    return shapes_recipe(
        tmp_path / "recipe.toml", spm, task,
        task={"label_smoothing": 0.1},
        data={"max_train": 48, "max_eval": 16},
        train={"total_steps": steps, "warmup_steps": 2, "log_every": 5},
        param_groups={"layer_decay": 1.0},
    )  # fmt: skip


def _scalars(run_dir, tag: str) -> list[float]:
    return list(tensorboard_scalars(run_dir, tag).values())


def test_finetuning_lowers_the_loss_then_evaluates_and_exports(tmp_path, spm, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    args = ["--config", _recipe(tmp_path, spm, "image_classification", 30), "--ds-config", DS_CONFIG,
            "--output-dir", str(run), "--ds-set", "train_micro_batch_size_per_gpu=8"]  # fmt: skip
    assert main(args) == 0
    losses = _scalars(run, "loss/cls")
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    scores = json.loads((run / "eval.json").read_text())
    assert scores["step"] == 30 and 0.0 <= scores["eval/accuracy"] <= 1.0
    assert (run / "model.pth").is_file() and (run / "config.json").is_file()
    # The run describes itself: config.json records each thing once, model.pth carries the model config.
    config = json.loads((run / "config.json").read_text())
    assert_recorded_once(config)
    want = get_config("beit3_tiny_patch16_64", vocab_size=48, max_text_positions=34, normalize_output=False)
    assert ModelConfig.from_dict(config["model"]) == want  # image classification keeps no final LayerNorm
    assert torch.load(run / "model.pth", map_location="cpu", weights_only=True)["config"] == config["model"]
    assert_marker_holds_no_recipe(read_marker(latest_checkpoint(run)), config["recipe"])
    # The exported model reloads strictly and reproduces the final evaluation.
    capsys.readouterr()
    assert main(args + ["--eval-only", str(run / "model.pth")]) == 0
    assert json.loads(capsys.readouterr().out)["eval/accuracy"] == scores["eval/accuracy"]


def test_a_bad_recipe_value_exits_with_code_2_and_names_the_key(tmp_path, spm, capsys):
    args = ["--config", _recipe(tmp_path, spm, "vqa", 4), "--ds-config", DS_CONFIG,
            "--output-dir", str(tmp_path / "run"), "--set", "param_groups.layer_decay=1.5"]  # fmt: skip
    assert main(args) == 2
    assert "param_groups.layer_decay" in capsys.readouterr().err


def test_a_key_of_an_earlier_recipe_layout_says_where_it_lives_now(tmp_path, spm, capsys):
    args = ["--config", _recipe(tmp_path, spm, "vqa", 4), "--ds-config", DS_CONFIG,
            "--output-dir", str(tmp_path / "run"), "--set", "train.layer_decay=0.9"]  # fmt: skip
    assert main(args) == 2
    assert "train.layer_decay is now param_groups.layer_decay" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    "task", ["text_classification", "prompt_classification", "vqa", "nlvr2", "retrieval", "captioning"]
)
def test_every_task_runs_through_the_cli(tmp_path, spm, task, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    args = ["--config", _recipe(tmp_path, spm, task, 4), "--ds-config", DS_CONFIG, "--output-dir", str(run),
            "--ds-set", "train_micro_batch_size_per_gpu=4"]  # fmt: skip
    assert main(args) == 0
    scores = json.loads((run / "eval.json").read_text())
    expected = {"vqa": "eval/vqa_score", "retrieval": "eval/tr_r1", "captioning": "eval/cider"}
    assert expected.get(task, "eval/accuracy") in scores


# DeepSpeed 0.19.8's ZeRO-3 calls deprecated torch collectives and torch.jit.script_method: its warnings.
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("task", ["prompt_classification", "retrieval", "captioning"])
def test_tasks_train_and_evaluate_under_zero3(tmp_path, spm, task, monkeypatch):
    # Under ZeRO-3 a parameter is gathered only inside its owner's forward: logit_scale is read there.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    args = ["--config", _recipe(tmp_path, spm, task, 3), "--ds-config", "ds_configs/zero3_fp32.json",
            "--output-dir", str(run), "--ds-set", "train_micro_batch_size_per_gpu=4"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 3


def test_inference_helpers_reload_a_finished_run(tmp_path, spm, monkeypatch):
    from beit3.finetune.data.build import make_shapes_split
    from beit3.finetune.inference import answer_questions, load_finetuned_task, preprocess_images

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    args = ["--config", _recipe(tmp_path, spm, "vqa", 2), "--ds-config", DS_CONFIG, "--output-dir", str(run),
            "--set", "task.pooling=mean"]  # fmt: skip
    assert main(args) == 0
    task, tokenizer, answers = load_finetuned_task(run / "config.json")
    assert task.pooler.pooling == "mean"  # the run's recipe, as recorded, rebuilds its heads
    images = make_shapes_split(2, 64, seed=5).images
    assert preprocess_images(list(images), 64).shape == (2, 3, 64, 64)
    got = answer_questions(task, tokenizer, list(images), ["what color is the shape?"] * 2, answers)
    assert len(got) == 2 and set(got) <= set(answers)


def test_inference_helpers_embed_rank_and_caption(spm):
    import torch

    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.data.build import make_shapes_split
    from beit3.finetune.inference import caption_images, embed_images, embed_texts, rank_texts
    from beit3.finetune.tasks.captioning import Captioning
    from beit3.finetune.tasks.retrieval import Retrieval
    from beit3.tokenizers.text import TextTokenizer

    tok = TextTokenizer(spm)
    small = {"vocab_size": tok.vocab_size, "max_text_positions": 34}
    images = list(make_shapes_split(2, 64, seed=7).images)
    retrieval = Retrieval(build_encoder("beit3_tiny_patch16_64", "dual", **small))
    assert embed_images(retrieval, images).shape == (2, 64)
    texts = ["a red disc.", "a blue square."]
    feats = embed_texts(retrieval, tok, texts)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2))
    ranked = rank_texts(retrieval, tok, images[0], texts)
    assert sorted(t for t, _ in ranked) == sorted(texts) and ranked[0][1] >= ranked[1][1]
    captioner = Captioning(build_encoder("beit3_tiny_patch16_64", "seq2seq", **small))
    captions = caption_images(captioner, tok, images)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
