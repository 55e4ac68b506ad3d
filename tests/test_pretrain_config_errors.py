"""Configuration mistakes end with one clear message naming the fix (exit code 2), not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from beit3.pretrain import train

REPO = Path(__file__).resolve().parents[1]


def write_recipe(
    tmp_path: Path, spm: Path, shards: Path, extra: str = "", model: str = "beit3_tiny_patch16_64"
):
    text = f"""
[model]
name = "{model}"
overrides = {{vocab_size = 1000, visual_vocab_size = 1024}}
[tokenizers]
text = "{spm}"
visual = "vqkd_tiny_patch16_64"
[data]
image_shards = ["{shards}"]
img_size = 64
patch_size = 16
tokenizer_img_size = 64
text_max_len = 32
pair_text_max_len = 32
num_workers = 0
min_num_patches = 2
[train]
total_steps = 2
warmup_steps = 1
{extra}
"""
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def write_ds(tmp_path: Path, **entries) -> Path:
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, **entries}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "images-000000.tar"
    path.write_bytes(b"")  # existence is all validation checks before data is read
    return path


def run_main(capsys, recipe: Path, ds: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    code = train.main(
        ["--config", str(recipe), "--ds-config", str(ds), "--output-dir", str(tmp_path / "run"), *extra]
    )
    return code, capsys.readouterr().err


def test_unknown_recipe_key_names_the_known_keys(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard, extra="learning_rate = 1e-3")
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert code == 2
    assert "unknown key(s) ['learning_rate'] in [train]" in err and "'lr'" in err


def test_unknown_model_lists_the_registered_ones(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard, model="beit3_huge")
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert code == 2 and "unknown model 'beit3_huge'" in err and "beit3_base_patch16_224" in err


def test_micro_batch_that_cannot_be_split_three_ways(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path, train_micro_batch_size_per_gpu=4), tmp_path)
    assert code == 2 and "use a multiple of 3" in err


def test_global_batch_not_divisible_by_world_size_and_micro_batch(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    ds = write_ds(tmp_path, train_batch_size=7, gradient_accumulation_steps=None)
    code, err = run_main(capsys, recipe, ds, tmp_path)
    assert code == 2 and "train_batch_size" in err


def test_missing_shards(tmp_path, capsys, tiny_spm):
    recipe = write_recipe(tmp_path, tiny_spm, tmp_path / "nowhere" / "shard-{000000..000003}.tar")
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert code == 2 and "[data]" in err and "nowhere" in err


def test_deepspeed_json_with_an_optimizer_block_contradicts_the_recipe(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    ds = write_ds(tmp_path, optimizer={"type": "Adam", "params": {"lr": 1e-4}})
    code, err = run_main(capsys, recipe, ds, tmp_path)
    assert code == 2 and "optimizer" in err


def test_missing_text_tokenizer_file(tmp_path, capsys, shard):
    recipe = write_recipe(tmp_path, tmp_path / "absent.model", shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert code == 2 and "absent.model" in err


def test_image_size_disagreeing_with_the_model(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard, extra="")
    recipe.write_text(recipe.read_text().replace("img_size = 64\n", "img_size = 96\n", 1))
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert code == 2 and "img_size" in err


def test_bad_command_line_override_value(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, "--set", "train.total_steps=many")
    assert code == 2 and "train.total_steps" in err


@pytest.mark.parametrize(
    "recipe", sorted((REPO / "pretrain" / "recipes").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_parses(recipe):
    from beit3.pretrain.recipe import load_recipe

    r = load_recipe(recipe)
    assert r.train.total_steps > 0


@pytest.mark.parametrize("ds", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_splits_into_images_texts_and_pairs(ds):
    from beit3.pretrain.recipe import PretrainRecipe, micro_batch_split

    micro = json.loads(ds.read_text())["train_micro_batch_size_per_gpu"]
    split = micro_batch_split(PretrainRecipe(), micro)
    assert split["images"] == split["texts"] == split["pairs"] == micro // 3


def test_every_train_setting_of_the_recipe_reaches_the_engine():
    import dataclasses

    from beit3.engine.trainer_config import TrainerConfig
    from beit3.pretrain.recipe import TrainSection

    engine_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert {f.name for f in dataclasses.fields(TrainSection)} <= engine_fields
