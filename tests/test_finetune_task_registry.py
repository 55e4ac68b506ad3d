"""One place per task (issue 14 item 6): a task is its spec, registered once, which the recipe checks, the
builder, the collator, the data and the evaluation read; and a run's class names live in its run directory,
so ``--eval-only`` needs no training index."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_data import shapes_recipe

from beit3.engine.config_io import ConfigError
from beit3.finetune.tasks import get_task, register, task_names, unregister
from beit3.finetune.tasks.base import FinetuneTask, init_head
from beit3.finetune.tasks.spec import TaskSpec

DS_CONFIG = "ds_configs/zero0_fp32.json"
TOY = "shape_or_colour"


class _FirstHalf(FinetuneTask):
    """A toy task: is the image's colour one of the first two colours? Vision CLS -> Linear(D, 2)."""

    head_prefixes = ("head",)

    def __init__(self, encoder, optim=None) -> None:
        super().__init__(encoder, optim)
        self.head = torch.nn.Linear(self.cfg.embed_dim, 2)
        init_head(self.head)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.beit3(image=image)[:, 0])

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = self.logits(batch["image"])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["half"])
        return loss, {"loss/toy": loss.detach()}


def _add_half(batch, examples, collator, generator) -> None:
    batch["half"] = torch.tensor([int(ex["label"] < 2) for ex in examples])
    batch["label"] = batch["half"]  # what EvalContext.hits compares the arg-max with


def _evaluate(ev) -> dict[str, float]:
    hits, _, total = ev.hits(lambda batch: ev.task.logits(batch["image"]))
    return {"eval/half_accuracy": hits / total}


TOY_SPEC = TaskSpec(
    name=TOY,
    configuration="vision",
    final_norm=True,
    build=lambda b: _FirstHalf(b.encoder, b.optim),
    selection=("eval/half_accuracy", "max"),
    evaluate=_evaluate,
    collate=_add_half,
    texts_in_batch=False,
    needs_tokenizer=False,
)


@pytest.fixture
def toy_task():
    register(TOY_SPEC)
    yield TOY_SPEC
    unregister(TOY)


def test_every_shipped_task_is_registered_with_a_complete_spec():
    names = task_names()
    assert names[:7] == ("image_classification", "prompt_classification", "text_classification", "vqa",
                         "nlvr2", "retrieval", "captioning")  # fmt: skip
    for name in names:
        spec = get_task(name)
        assert spec.name == name and callable(spec.build) and callable(spec.evaluate)
        assert spec.selection[0].startswith("eval/") and spec.selection[1] in ("max", "min")
    assert [n for n in names if get_task(n).predict] == ["vqa", "retrieval", "captioning", "detection"]
    with pytest.raises(ValueError, match="already registered"):
        register(TaskSpec(**{**get_task("vqa").__dict__, "selection": ("eval/x", "max")}))


def test_a_task_registered_in_one_place_is_validated_built_collated_and_evaluated(toy_task, tmp_path):
    """The toy task above is one spec and one register call: the recipe accepts its name, refuses what its
    spec does not allow (mixup), the builder builds it, the generated data, collator and loader serve it,
    its loss trains, the evaluation reports its metric and the best checkpoint defaults to it."""
    from beit3.finetune.builder import build_task, model_config
    from beit3.finetune.data.batches import BatchLoader, Collator
    from beit3.finetune.data.build import load_task_data
    from beit3.finetune.evaluate import evaluate, predict
    from beit3.finetune.recipe import load_recipe
    from beit3.finetune.train import keep_best_default

    path = shapes_recipe(
        tmp_path / "toy.toml", "", TOY, data={"tokenizer": "", "max_train": 8, "max_eval": 4}
    )
    recipe = load_recipe(path, ["train.eval_every=1"])
    with pytest.raises(ConfigError, match=f"image_classification only, not '{TOY}'"):
        load_recipe(path, ["data.mixup=0.8"])
    keep_best_default(recipe)
    assert (recipe.train.best_metric, recipe.train.best_mode) == ("eval/half_accuracy", "max")

    data = load_task_data(recipe.data, TOY, 64)
    assert len(data.train.examples) == 8 and "text" in data.train.examples[0]  # one captioned image each
    torch.manual_seed(0)
    task, report = build_task(recipe, data.classes)
    assert isinstance(task, _FirstHalf) and report is None
    assert model_config(task, TOY).normalize_output  # final_norm=True: the encoder keeps its LayerNorm
    loader = BatchLoader(data.train, Collator(TOY, data.train.images), batch_size=4)
    batch = next(iter(loader))
    assert set(batch) == {"image", "half", "label"}  # texts_in_batch=False; the hook's keys
    loss, metrics = task(task.prepare_batch(batch, "cpu"))
    loss.backward()
    assert torch.isfinite(loss) and "loss/toy" in metrics
    scores = evaluate(TOY, task, data.eval, batch_size=3)
    assert scores.keys() == {"eval/half_accuracy"} and 0.0 <= scores["eval/half_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="has no official output file"):
        predict(TOY, task, data.eval, batch_size=3)


def test_an_unknown_task_name_lists_the_registered_ones(toy_task, tmp_path):
    from beit3.finetune.recipe import load_recipe

    path = shapes_recipe(tmp_path / "r.toml", "x.spm", "no_such_task")
    with pytest.raises(ConfigError, match=f"task.name must be one of .*'{TOY}'"):
        load_recipe(path)


def test_a_spec_refuses_an_unknown_configuration():
    with pytest.raises(ValueError, match="configuration must be one of"):
        TaskSpec(name="t", configuration="triple", final_norm=True, build=lambda b: b, selection=("a", "max"),
                 evaluate=dict)  # fmt: skip


# ----- class names in the run directory ---------------------------------------------------------------
@pytest.fixture(scope="module")
def process_group():
    from beit3.engine.launch import init_distributed

    init_distributed()


def _eval_index(folder) -> str:
    """A released-format image classification index of 4 shapes images (no train index beside it)."""
    from beit3.finetune.data.build import make_shapes_split

    split = make_shapes_split(4, 64, seed=5)
    rows = []
    for i, (image, ex) in enumerate(zip(split.images, split.examples[::2])):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
        rows.append({"image_path": f"img{i}.png", "label": ex["label"]})
    (folder / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "val.jsonl")


def test_eval_only_reads_the_class_names_from_the_run_directory_without_the_train_index(
    tmp_path, process_group, monkeypatch, capsys, caplog
):
    from beit3.finetune.data.build import COLORS
    from beit3.finetune.train import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    recipe = shapes_recipe(tmp_path / "r.toml", "", "image_classification",
                           data={"tokenizer": "", "max_train": 8, "max_eval": 4})  # fmt: skip
    args = ["--config", recipe, "--ds-config", DS_CONFIG, "--output-dir", str(run),
            "--ds-set", "train_micro_batch_size_per_gpu=4"]  # fmt: skip
    assert main(args) == 0
    assert json.loads((run / "classes.json").read_text()) == {"task": "image_classification",
                                                               "classes": list(COLORS)}  # fmt: skip
    index = tmp_path / "index"
    index.mkdir()
    train = index / "train.jsonl"  # never written
    jsonl = ["--set", "data.source=jsonl", "--set", f"data.root={index}",
             "--set", f"data.eval={_eval_index(index)}", "--set", f"data.train={train}"]  # fmt: skip
    eval_only = args + jsonl + ["--eval-only", str(run / "model.pth")]
    capsys.readouterr()
    assert main(eval_only) == 0  # the head's size from the run's class names; no train.jsonl exists
    scores = json.loads(capsys.readouterr().out)
    assert scores.keys() == {"eval/accuracy", "eval/acc1", "eval/acc5"}
    # Without classes.json (a run from before it existed) the names come from the train index, said so.
    (run / "classes.json").unlink()
    assert main(eval_only) == 2
    assert "train.jsonl" in capsys.readouterr().err
    assert "has no classes.json of task image_classification" in caplog.text


def test_classes_json_round_trips_and_another_tasks_file_is_not_read(tmp_path):
    from beit3.finetune.train import read_classes, write_classes

    assert read_classes(tmp_path) is None
    write_classes(tmp_path, "vqa", ["yes", "no", "2"])
    assert read_classes(tmp_path) == read_classes(tmp_path, "vqa") == ["yes", "no", "2"]
    assert read_classes(tmp_path, "image_classification") is None  # a model of another task: not its names
    (tmp_path / "classes.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="classes.json: expected"):
        read_classes(tmp_path)
