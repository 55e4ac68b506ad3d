"""Every shipped recipe against every shipped DeepSpeed config, by the pure ``validate_run`` functions: the
model preset, the images/texts/pairs split of the micro-batch, the visual tokenizer's codebook and grid
against the model, text lengths, and the global batch each recipe's step counts assume. No data, tokenizer or
checkpoint file is read (the shipped paths are placeholders) and DeepSpeed is not started."""

from __future__ import annotations

import builtins
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from beit3.engine.config_io import ConfigError, dotted_overrides, numeric_fields, set_dotted
from beit3.engine.ds_config import EngineConfigError, load_ds_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = sorted((REPO / "pretrain" / "recipes").glob("*.toml"))
FINETUNE = sorted((REPO / "finetune" / "recipes").glob("*.toml"))
# The BEiT-3 training configs (vqkd_*.json train the visual tokenizer, not a recipe).
DS_CONFIGS = sorted(p for p in (REPO / "ds_configs").glob("*.json") if not p.name.startswith("vqkd"))
WORLD_SIZES = (1, 2, 8, 64, 256)


def ds(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def no_file_reads(monkeypatch):
    """validate_run is pure: opening any file while it runs fails the test (modules it imports lazily are
    imported first: importing reads files)."""
    import beit3.finetune.recipe
    import beit3.model
    import beit3.pretrain.recipe
    import beit3.tokenizers.vqkd  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError(f"validate_run opened {args[0]!r}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(Path, "open", refuse)
    monkeypatch.setattr(Path, "read_text", refuse)
    monkeypatch.setattr(Path, "read_bytes", refuse)


def fix_from_message(message: str) -> dict:
    """The ``--ds-set key=value`` options a batch error proposes, as overrides."""
    return dotted_overrides(re.findall(r"--ds-set (\S+)", message))


def check_or_apply_fix(validate, recipe, config: dict, world: int, expected_global: int, unit: int = 1):
    """validate_run passes; or, when the config's global batch is not the recipe's, it refuses in one line
    with --ds-set options that then pass, or (no micro-batch fits ``world`` ranks) says to change the ranks:
    then None."""
    resolved = load_ds_config(config, world)
    if expected_global and resolved["train_batch_size"] != expected_global:
        with pytest.raises(ConfigError, match=r"global_batch_size=\d+: the recipe's schedule") as err:
            validate(recipe, config, world)
        message = str(err.value)
        assert "\n" not in message
        if expected_global % (world * unit):
            assert message.endswith("change the ranks")
            return None
        config = set_dotted(config, fix_from_message(message))
    return validate(recipe, config, world), config


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe_path", PRETRAIN, ids=lambda p: p.stem)
def test_every_pretraining_recipe_with_every_deepspeed_config(recipe_path, ds_path, no_file_reads):
    from beit3.pretrain.recipe import load_recipe, validate_run

    with no_file_reads_paused():
        recipe, config = load_recipe(recipe_path), ds(ds_path)
    for world in WORLD_SIZES:
        checked = check_or_apply_fix(validate_run, recipe, config, world, recipe.train.global_batch_size, 3)
        if checked is None:
            continue
        split, used = checked
        resolved = load_ds_config(used, world)
        assert sum(split.values()) == resolved["train_micro_batch_size_per_gpu"]
        assert split["images"] == split["texts"] == split["pairs"]  # every shipped recipe mixes 1:1:1
        if recipe.train.global_batch_size:
            assert resolved["train_batch_size"] == recipe.train.global_batch_size


@pytest.mark.parametrize("ds_path", DS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe_path", FINETUNE, ids=lambda p: p.stem)
def test_every_finetuning_recipe_with_every_deepspeed_config(recipe_path, ds_path, no_file_reads):
    from beit3.finetune.recipe import load_recipe, validate_run

    with no_file_reads_paused():
        recipe, config = load_recipe(recipe_path), ds(ds_path)
    for world in WORLD_SIZES:
        checked = check_or_apply_fix(validate_run, recipe, config, world, recipe.train.global_batch_size)
        if checked is None:
            continue
        resolved = checked[0]
        if recipe.train.global_batch_size:
            assert resolved["train_batch_size"] == recipe.train.global_batch_size


class no_file_reads_paused:
    """Reading the recipe and JSON themselves is allowed (before validate_run runs)."""

    def __enter__(self):
        import io

        self.saved = (builtins.open, Path.open, Path.read_text, Path.read_bytes)
        builtins.open = io.open
        Path.open, Path.read_text, Path.read_bytes = _PATH_METHODS
        return self

    def __exit__(self, *exc):
        builtins.open, Path.open, Path.read_text, Path.read_bytes = self.saved


_PATH_METHODS = (Path.open, Path.read_text, Path.read_bytes)


def sbatch_defaults(name: str) -> dict:
    """Recipe, DeepSpeed config, GPU count and extra arguments a shipped sbatch script runs with."""
    text = (REPO / "slurm" / name).read_text()

    def default(var: str) -> str:
        match = re.search(rf': "\$\{{{var}:=([^}}]*)\}}"', text)
        return match.group(1) if match else ""

    nodes = int(re.search(r"#SBATCH --nodes=(\d+)", text).group(1))
    gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
    extra = shlex.split(default("BEIT3_EXTRA_ARGS"))
    ds_set = [extra[i + 1] for i, a in enumerate(extra) if a == "--ds-set"]
    return {"recipe": default("BEIT3_RECIPE"), "ds_config": default("BEIT3_DS_CONFIG"),
            "world": nodes * gpus, "ds_set": dotted_overrides(ds_set)}  # fmt: skip


@pytest.mark.parametrize("script", ["pretrain_giant.sbatch", "pretrain_base_ablation.sbatch"])
def test_the_pretraining_sbatch_scripts_run_their_recipe_at_its_global_batch(script):
    from beit3.pretrain.recipe import load_recipe, validate_run

    job = sbatch_defaults(script)
    recipe = load_recipe(REPO / job["recipe"])
    config = set_dotted(ds(REPO / job["ds_config"]), job["ds_set"])
    split = validate_run(recipe, config, job["world"])
    assert load_ds_config(config, job["world"])["train_batch_size"] == recipe.train.global_batch_size == 6144
    assert split == {"images": 8, "texts": 8, "pairs": 8}


@pytest.mark.parametrize(
    "recipe_path", [p for p in FINETUNE if p.stem.endswith("_base")], ids=lambda p: p.stem
)
def test_finetune_sbatch_default_is_refused_with_the_options_that_give_the_recipes_batch(recipe_path):
    """finetune.sbatch's default (zero1_bf16.json, 24 per GPU, 8 GPUs = 192) is not the batch any released
    base recipe was written for: the run is refused at start-up with the --ds-set line that fixes it."""
    from beit3.finetune.recipe import load_recipe, validate_run

    job = sbatch_defaults("finetune.sbatch")
    recipe = load_recipe(recipe_path)
    config = ds(REPO / job["ds_config"])
    with pytest.raises(ConfigError, match="--ds-set train_batch_size") as err:
        validate_run(recipe, config, job["world"])
    fixed = validate_run(recipe, set_dotted(config, fix_from_message(str(err.value))), job["world"])
    assert fixed["train_batch_size"] == recipe.train.global_batch_size
    assert fixed["train_micro_batch_size_per_gpu"] <= config["train_micro_batch_size_per_gpu"]


def test_recipes_name_only_deepspeed_configs_that_exist():
    for recipe in PRETRAIN + FINETUNE:
        for name in re.findall(r"ds_configs/([\w.]+\.json)", recipe.read_text()):
            assert (REPO / "ds_configs" / name).is_file(), (recipe.name, name)


# ----- the range tables cover every numeric setting, so a new field cannot skip validation -----


def _sections(cls: type, where: str = ""):
    """Every dataclass of a recipe tree with its dotted name."""
    import typing

    yield where or cls.__name__, cls
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{where}.{name}" if where else name)


@pytest.mark.parametrize("recipe", ["PretrainRecipe", "FinetuneRecipe", "VQKDRecipe"])
def test_every_numeric_recipe_setting_declares_a_range(recipe):
    from beit3.engine.config_io import declared_ranges
    from beit3.finetune.recipe import FinetuneRecipe
    from beit3.pretrain.recipe import PretrainRecipe
    from beit3.pretrain.vqkd_recipe import VQKDRecipe

    cls = {"PretrainRecipe": PretrainRecipe, "FinetuneRecipe": FinetuneRecipe, "VQKDRecipe": VQKDRecipe}[
        recipe
    ]
    for where, section in _sections(cls):
        missing = set(numeric_fields(section)) - set(declared_ranges(section))
        assert not missing, f"[{where}] has numeric fields without a range: {sorted(missing)}"


def test_a_range_declared_beside_a_field_is_checked_in_any_section():
    from beit3.engine.config_io import bounded, section_problem

    @dataclasses.dataclass
    class Inner:
        ratio: float = bounded(0.5, "[0, 1]")
        sizes: list = bounded(factory=lambda: [1, 2], interval="[1, inf)")

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        count: int = bounded(1, "[1, inf)")

    assert section_problem(Outer()) is None
    assert section_problem(Outer(count=0)) == "Outer.count=0 is out of range: must be >= 1"
    message = section_problem(Outer(inner=Inner(sizes=[1, 0])))
    assert message == "inner.sizes=[1, 0] is out of range: each value must be >= 1"
    assert section_problem(Outer(inner=Inner(ratio=float("nan")))).startswith("inner.ratio=nan")
    with pytest.raises(ValueError):
        bounded(1, "0..1")  # a malformed interval fails where it is declared


def test_the_engine_refuses_an_optional_setting_out_of_range(tmp_path):
    from beit3.engine.trainer_config import TrainerConfig

    with pytest.raises(EngineConfigError, match="peak_flops=-1.0"):
        TrainerConfig(output_dir=str(tmp_path), total_steps=2, peak_flops=-1.0).validate()


# ----- what the cross-check catches (pure, on the shipped files with one value changed) -----


def pretrain(name: str = "giant", *overrides: str):
    from beit3.pretrain.recipe import load_recipe

    return load_recipe(REPO / "pretrain" / "recipes" / f"{name}.toml", list(overrides))


GIANT_DS = REPO / "ds_configs" / "zero3_bf16.json"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.name=beit3_giant"], "unknown model 'beit3_giant'"),
        (["model.overrides={visual_vocab_size = 8000}"], "visual_vocab_size = 8192"),
        (["data.tokenizer_img_size=224"], "set tokenizer_img_size = 256"),
        (["tokenizers.visual=vqkd_tiny_patch16_64"], "has 1024 codes"),
        (["data.patch_size=16"], "differ from the model's 224/14"),
        (["data.text_max_len=2000"], "exceeds the model's max_text_len"),
        (["batch.pairs=3"], "cannot be split 1:1:3"),
        (
            ["train.global_batch_size=3072"],
            "train_batch_size=3072 --ds-set train_micro_batch_size_per_gpu=12",
        ),
        (["model.grad_checkpointing=some"], "grad_checkpointing='some'"),
        (["model.grad_checkpointing_part=attn"], "grad_checkpointing_part='attn': use one of 'layer'"),
    ],
)
def test_validate_run_refuses_a_pretraining_recipe_that_disagrees(overrides, expected):
    from beit3.pretrain.recipe import validate_run

    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_run(pretrain("giant", *overrides), ds(GIANT_DS), 256)


def test_validate_run_refuses_a_world_size_the_global_batch_cannot_be_split_over():
    from beit3.pretrain.recipe import validate_run

    with pytest.raises(EngineConfigError, match="train_batch_size 6144 is not divisible"):
        validate_run(pretrain("giant"), ds(GIANT_DS), 100)


def test_validate_run_takes_the_codebook_a_tokenizer_checkpoint_records():
    """``beit3-vqkd train --set codebook_size=...`` records its overrides in the checkpoint."""
    from beit3.pretrain.recipe import validate_run

    recipe = pretrain("demo", "model.overrides={vocab_size = 4010, visual_vocab_size = 256}")
    demo_ds = ds(REPO / "ds_configs" / "zero3_fp32.json")
    with pytest.raises(ConfigError, match="has 1024 codes"):
        validate_run(recipe, demo_ds, 2)
    assert validate_run(recipe, demo_ds, 2, visual_overrides={"codebook_size": 256})["images"] == 2


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model.img_size=500"], "model.img_size=500 is not a multiple of the patch size 16"),
        (["data.max_text_len=2000"], "data.max_text_len=2000 exceeds the model's max_text_len"),
        (["captioning.max_len=1500"], "captioning.max_len=1500 exceeds"),
        (["model.overrides={depth = 0}"], "model.overrides: depth must be positive"),
    ],
)
def test_validate_run_refuses_a_finetuning_recipe_that_disagrees(overrides, expected):
    from beit3.finetune.recipe import load_recipe, validate_run

    recipe = load_recipe("coco_captioning_base", overrides)
    config = {**ds(REPO / "ds_configs" / "zero1_bf16.json"), "train_micro_batch_size_per_gpu": 16}
    config["gradient_accumulation_steps"] = 2
    assert validate_run(load_recipe("coco_captioning_base"), config, 8)["train_batch_size"] == 256
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_run(recipe, config, 8)


def test_a_resume_on_other_ranks_is_checked_against_the_global_batch_it_keeps():
    """engine/reshard.py keeps a checkpoint's global batch on another world size: base_ablation trained at
    6144 on 64 GPUs (gas 4) resumes on 32 with gas 8, although the JSON alone now resolves to 3072."""
    from beit3.pretrain.recipe import validate_run

    recipe = pretrain("base_ablation")
    config = {**ds(REPO / "ds_configs" / "zero2_bf16.json"), "gradient_accumulation_steps": 4}
    assert validate_run(recipe, config, 64)["pairs"] == 8
    with pytest.raises(ConfigError, match="gives 24 x 4 accumulation x 32 ranks = 3072"):
        validate_run(recipe, config, 32)
    assert validate_run(recipe, config, 32, trained_global_batch=6144)["pairs"] == 8
    with pytest.raises(ConfigError, match="checkpoint being resumed was trained with global batch 1536"):
        validate_run(recipe, config, 32, trained_global_batch=1536)


def test_trained_global_batch_reads_the_checkpoint_marker(tmp_path):
    from beit3.engine.checkpoint import trained_global_batch

    tag = tmp_path / "step00000010"
    tag.mkdir()
    assert trained_global_batch(None) is None
    (tag / "complete.json").write_text(
        json.dumps({"step": 10, "world_size": 2, "ds_config": {"train_batch_size": 48}})
    )
    assert trained_global_batch(tag) == 48
    (tag / "complete.json").write_text(json.dumps({"step": 10, "world_size": 2}))
    assert trained_global_batch(tag) is None
