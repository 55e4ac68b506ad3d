"""bench/finetune_small.py's streaming path: a task exported as released-format JSONL indexes with its images
as PNG files reads back through ``data.source = "jsonl"`` as the same examples and the same pixels."""

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import finetune_small as bench  # noqa: E402

from beit3.finetune.data.build import load_task_data  # noqa: E402
from beit3.finetune.recipe import load_recipe  # noqa: E402

RECIPE = """
[task]
name = "{task}"
[model]
name = "beit3_tiny_paper_patch16_64"
[data]
source = "shapes"
tokenizer = "unused.model"  # the recipe check wants one for texts; loading the data does not read it
max_train = 12
max_eval = 6
"""


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "captioning"])
def test_an_exported_task_reads_back_the_same_examples_and_pixels(tmp_path, task):
    recipe = tmp_path / f"shapes_{task}.toml"
    recipe.write_text(RECIPE.format(task=task))
    args = argparse.Namespace(model="beit3_tiny_paper_patch16_64", set=[], work=tmp_path, workers=2)
    sets = bench.export_index(str(recipe), args)
    assert sets[0] == "data.source=jsonl" and sets[-1] == "data.num_workers=2"
    memory = load_task_data(load_recipe(recipe).data, task, 64)
    streamed = load_task_data(load_recipe(recipe, sets).data, task, 64)
    assert len(streamed.classes) == len(memory.classes)  # the head's size
    assert task != "vqa" or streamed.classes == memory.classes  # VQA: answer2label.txt gives the names
    for mem, disk in ((memory.train, streamed.train), (memory.eval, streamed.eval)):
        assert len(disk.examples) == len(mem.examples)
        for a, b in zip(mem.examples, disk.examples):
            assert a["text"] == b["text"] and a.get("scores") == b.get("scores")
            assert "scores" in a or a["label"] == b["label"]  # a row carries labels + scores, or a label
            for key in ("image", "image2"):
                if key in a:
                    assert torch.equal(mem.images[a[key]], disk.images[b[key]])
