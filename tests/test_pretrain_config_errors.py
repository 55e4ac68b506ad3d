"""Configuration mistakes end with one clear message naming the fix (exit code 2), not a traceback.

Each case changes one setting of a recipe that passes every check (``test_the_base_recipe_passes_...``) and
runs the program's ``main`` in-process; a few run the real console program in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
text_shards = ["{shards}"]
pair_shards = ["{shards}"]
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


def test_every_recipe_has_the_engines_train_table_and_every_setting_reaches_the_engine():
    import dataclasses
    import typing

    from beit3.engine.trainer_config import TrainerConfig, TrainSettings
    from beit3.finetune.recipe import FinetuneRecipe
    from beit3.pretrain.recipe import PretrainRecipe
    from beit3.pretrain.vqkd_recipe import VQKDRecipe

    for recipe in (PretrainRecipe, FinetuneRecipe, VQKDRecipe):
        assert typing.get_type_hints(recipe)["train"] is TrainSettings, recipe.__name__
    engine_fields = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert {f.name for f in dataclasses.fields(TrainSettings)} <= engine_fields
    cfg = TrainerConfig.for_run(TrainSettings(lr=3e-4, keep_last=7), "out", resume="none")
    assert (cfg.lr, cfg.keep_last, cfg.output_dir, cfg.resume) == (3e-4, 7, "out", "none")
    assert cfg.settings() == TrainSettings(lr=3e-4, keep_last=7)


# ----- every configuration mistake: exit 2, one line naming the setting, before any model is built -----


def error_lines(err: str, program: str = "beit3-pretrain") -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{program}: error:")]


def assert_config_error(code: int, err: str, *expected: str, program: str = "beit3-pretrain") -> None:
    lines = error_lines(err, program)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]


def test_the_base_recipe_passes_every_check(tmp_path, tiny_spm, shard):
    """The cases below each change one setting of this recipe, so their errors are theirs alone."""
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.trainer_config import TrainerConfig, preflight
    from beit3.pretrain.recipe import load_recipe, validate

    recipe = load_recipe(write_recipe(tmp_path, tiny_spm, shard))
    ds = load_ds_config(write_ds(tmp_path), 1)
    split, visual = validate(recipe, ds, 1)
    assert split == {"images": 1, "texts": 1, "pairs": 1} and visual is None
    preflight(TrainerConfig.for_run(recipe.train, str(tmp_path / "run")), ds, 1)


# (id, --set overrides, expected text in the one error line)
RECIPE_MISTAKES = [
    ("keep_last_0", ["train.keep_last=0"], "train.keep_last=0"),
    ("log_every_0", ["train.log_every=0"], "train.log_every=0"),
    ("unknown_schedule", ["train.schedule=cosin"], "train.schedule='cosin'"),
    ("negative_lr", ["train.lr=-1e-3"], "train.lr=-0.001"),
    ("nan_lr", ["train.lr=nan"], "train.lr=nan"),
    ("min_lr_above_lr", ["train.min_lr=1.0"], "train.min_lr=1.0 exceeds lr"),
    ("warmup_beyond_total", ["train.warmup_steps=5"], "train.warmup_steps=5 exceeds total_steps=2"),
    ("zero_eps", ["train.eps=0.0"], "train.eps=0.0"),
    ("negative_weight_decay", ["train.weight_decay=-0.1"], "train.weight_decay=-0.1"),
    ("negative_save_every", ["train.save_every=-1"], "train.save_every=-1"),
    ("zero_nonfinite_budget", ["train.max_nonfinite_in_row=0"], "train.max_nonfinite_in_row=0"),
    ("negative_seed", ["train.seed=-1"], "train.seed=-1"),
    ("unknown_optimizer", ["train.optimizer=sgd"], "train.optimizer='sgd'"),
    ("betas_one_value", ["train.betas=[0.9]"], "train.betas: expected 2 values"),
    ("betas_three_values", ["train.betas=[0.9, 0.98, 0.99]"], "train.betas: expected 2 values"),
    ("beta_of_one", ["train.betas=[0.9, 1.0]"], "train.betas=[0.9, 1.0]"),
    ("negative_beta", ["train.betas=[-0.1, 0.98]"], "train.betas=[-0.1, 0.98]"),
    ("drop_path_one", ["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0"),
    ("drop_path_negative", ["model.drop_path_rate=-0.1"], "model.drop_path_rate=-0.1"),
    ("crop_scale_one_value", ["data.crop_scale=[0.5]"], "data.crop_scale: expected 2 values"),
    ("crop_scale_reversed", ["data.crop_scale=[0.9, 0.5]"], "data.crop_scale=[0.9, 0.5] is reversed"),
    ("crop_scale_zero", ["data.crop_scale=[0.0, 1.0]"], "data.crop_scale=[0.0, 1.0]"),
    ("max_image_pixels_0", ["data.max_image_pixels=0"], "data.max_image_pixels=0"),
    ("negative_workers", ["data.num_workers=-1"], "data.num_workers=-1"),
    ("zero_std", ["data.std=[0.5, 0.0, 0.5]"], "data.std"),
    ("std_two_values", ["data.std=[0.5, 0.5]"], "data.std: expected 3 values"),
    ("mask_ratio_above_1", ["data.image_mask_ratio=1.5"], "data.image_mask_ratio=1.5"),
    ("zero_open_shards", ["data.open_shards=0"], "data.open_shards=0"),
    ("negative_mim_weight", ["objective.mim_weight=-1.0"], "objective.mim_weight=-1.0"),
    ("negative_vl_mlm_weight", ["objective.vl_mlm_weight=-0.5"], "objective.vl_mlm_weight=-0.5"),
    ("all_weights_zero", [f"objective.{w}_weight=0.0" for w in ("mim", "mlm", "vl_mlm", "vl_mim")],
     "every loss weight is 0"),
    ("label_smoothing_1", ["objective.label_smoothing=1.0"], "objective.label_smoothing=1.0"),
    ("negative_batch_share", ["batch.images=-1"], "batch.images=-1"),
    ("tokenizer_grid", ["data.tokenizer_img_size=96"], "tokenizer_img_size = 64"),
    ("visual_vocab", ["model.overrides={vocab_size = 1000, visual_vocab_size = 64}"],
     "visual_vocab_size = 1024"),
    ("text_vocab", ["model.overrides={vocab_size = 100, visual_vocab_size = 1024}"], "vocab_size >= "),
    ("unknown_visual_tokenizer", ["tokenizers.visual=vqkd_huge"], "unknown visual tokenizer 'vqkd_huge'"),
    ("bad_grad_checkpointing", ["model.grad_checkpointing=every:0"], "grad_checkpointing='every:0'"),
    ("bad_grad_checkpointing_part", ["model.grad_checkpointing_part=mlp"],
     "grad_checkpointing_part='mlp': use one of 'layer', 'attention', 'ffn'"),
    ("bad_compile", ["model.compile=model"], "[model] compile='model': use one of none, layers"),
    ("compile_mode_with_cuda_graphs", ["model.compile=layers", "model.compile_mode=reduce-overhead"],
     "compile_mode='reduce-overhead'"),
    ("unknown_compile_backend", ["model.compile=layers", "model.compile_backend=tensorrt-ish"],
     "compile_backend='tensorrt-ish' is not a torch.compile backend here"),
    ("compile_without_fixed_text_lengths", ["model.compile=layers", "data.pad_text_to_max_len=false"],
     "set [data] pad_text_to_max_len = true"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,expected", [c[1:] for c in RECIPE_MISTAKES], ids=[c[0] for c in RECIPE_MISTAKES]
)
def test_a_recipe_mistake_exits_2_with_one_line(tmp_path, capsys, tiny_spm, shard, overrides, expected):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    sets = [a for o in overrides for a in ("--set", o)]
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, *sets)
    assert_config_error(code, err, expected)
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory) -> Path:
    """A run directory holding one complete checkpoint, written by the real engine (toy task, 2 steps)."""
    from engine_helpers import make_trainer

    out = tmp_path_factory.mktemp("ckpt") / "run"
    make_trainer(out, "zero0_fp32.json", 2).fit()
    assert (out / "checkpoints" / "latest").is_file()
    return out


def visual_checkpoints(tmp_path: Path, tiny_spm: Path) -> dict[str, Path]:
    files = {"text_file": tmp_path / "notes.pth", "tensor": tmp_path / "tensor.pth",
             "empty_dict": tmp_path / "empty.pth", "random_state_dict": tmp_path / "random.pth"}  # fmt: skip
    files["text_file"].write_text("this is not a checkpoint\n")
    torch.save(torch.randn(4, 4), files["tensor"])
    torch.save({}, files["empty_dict"])
    torch.save({"model": {"encoder.weight": torch.randn(8, 8), "quantize.embed": torch.randn(3)}},
               files["random_state_dict"])  # fmt: skip
    return files


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("text_file", "is not a torch checkpoint"),
        ("tensor", "holds no tokenizer weights"),
        ("empty_dict", "holds no tokenizer weights"),
        ("random_state_dict", "does not fit visual='vqkd_tiny_patch16_64'"),
    ],
)
def test_a_visual_tokenizer_checkpoint_that_is_not_one_exits_2(
    tmp_path, capsys, tiny_spm, shard, kind, expected
):
    path = visual_checkpoints(tmp_path, tiny_spm)[kind]
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(
        capsys, recipe, write_ds(tmp_path), tmp_path, "--set", f"tokenizers.visual_checkpoint={path}"
    )
    assert_config_error(code, err, "[tokenizers] visual_checkpoint=", expected)


def test_fp16_on_a_device_without_fp16_exits_2(tmp_path, capsys, tiny_spm, shard, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)  # as on most CPUs
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path, fp16={"enabled": True}), tmp_path)
    assert_config_error(code, err, "fp16.enabled=true", "cannot train in fp16", "bf16 or fp32")


def test_a_misspelt_deepspeed_key_is_refused_by_deepspeeds_parser_first(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    ds = write_ds(tmp_path, zero_optimization={"stage": 1, "overlap_com": True})
    code, err = run_main(capsys, recipe, ds, tmp_path)
    assert_config_error(code, err, "overlap_com", "--ds-config")


def test_an_output_dir_that_is_a_file_exits_2(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    (tmp_path / "run").write_text("a file")
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path)
    assert_config_error(code, err, "--output-dir", "is a file")


def test_an_output_dir_below_a_file_exits_2(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    (tmp_path / "file").write_text("a file")
    code = train.main(["--config", str(recipe), "--ds-config", str(write_ds(tmp_path)),
                       "--output-dir", str(tmp_path / "file" / "run")])  # fmt: skip
    assert_config_error(code, capsys.readouterr().err, "--output-dir", "cannot be created")


def test_resume_naming_a_missing_path_exits_2(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, "--resume", str(tmp_path / "nowhere"))
    assert_config_error(code, err, "--resume", "nowhere")


def test_resume_none_on_a_directory_with_checkpoints_exits_2(
    tmp_path, capsys, tiny_spm, shard, run_with_checkpoint
):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    before = sorted(p.name for p in (run_with_checkpoint / "checkpoints").iterdir())
    code = train.main(["--config", str(recipe), "--ds-config", str(write_ds(tmp_path)),
                       "--output-dir", str(run_with_checkpoint), "--resume", "none"])  # fmt: skip
    assert_config_error(code, capsys.readouterr().err, "--resume none", "--output-dir")
    assert sorted(p.name for p in (run_with_checkpoint / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "case",
    ["keep_last", "resume_none", "visual_checkpoint"],
)
def test_the_console_program_exits_2_without_a_traceback(
    tmp_path, tiny_spm, shard, run_with_checkpoint, case
):
    """The real ``python -m beit3.pretrain.train`` process: exit status 2 and one line on stderr."""
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    args = [
        "--config",
        str(recipe),
        "--ds-config",
        str(write_ds(tmp_path)),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    if case == "keep_last":
        args += ["--set", "train.keep_last=0"]
    elif case == "resume_none":
        args[-1] = str(run_with_checkpoint)
        args += ["--resume", "none"]
    else:
        args += ["--set", f"tokenizers.visual_checkpoint={tiny_spm}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env = {
        k: v
        for k, v in env.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    proc = subprocess.run([sys.executable, "-m", "beit3.pretrain.train", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
    expected = {"keep_last": "train.keep_last", "resume_none": "--resume none",
                "visual_checkpoint": "not a torch checkpoint"}[case]  # fmt: skip
    assert_config_error(proc.returncode, proc.stderr, expected)


@pytest.mark.parametrize(
    "entries,expected",
    [
        ({"gradient_clipping": -1.0}, "gradient_clipping=-1.0 must be a number >= 0"),
        ({"gradient_clipping": "3"}, "gradient_clipping='3'"),
        ({"zero_optimization": {"stage": 5}}, "zero_optimization.stage must be 0, 1, 2 or 3"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer"),
    ],
)
def test_a_deepspeed_value_out_of_range_exits_2(tmp_path, capsys, tiny_spm, shard, entries, expected):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path, **entries), tmp_path)
    assert_config_error(code, err, expected)


def test_files_that_cannot_be_read_as_recipe_or_deepspeed_config_exit_2(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, tmp_path, tmp_path)  # a directory as --ds-config
    assert_config_error(code, err, "DeepSpeed config", "cannot be read")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    code, err = run_main(capsys, binary, write_ds(tmp_path), tmp_path)
    assert_config_error(code, err, "binary.toml is not a valid TOML recipe")


def test_a_text_tokenizer_that_is_not_a_sentencepiece_model_exits_2(tmp_path, capsys, tiny_spm, shard):
    notes = tmp_path / "notes.model"
    notes.write_text("not a model\n")
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, "--set", f"tokenizers.text={notes}")
    assert_config_error(code, err, "is not a SentencePiece model")


def test_a_model_size_of_zero_exits_2(tmp_path, capsys, tiny_spm, shard):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    sets = ["--set", "model.overrides={patch_size = 0, vocab_size = 1000, visual_vocab_size = 1024}"]
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, *sets)
    assert_config_error(code, err, "[model]", "give positive sizes")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_under_torchrun_both_exit_2_and_rank_0_alone_prints(tmp_path, tiny_spm, shard):
    """Every rank finds the same mistake before any collective, so none waits for another (no hang)."""
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    launch = [
        sys.executable,
        "-m",
        "beit3.engine.supervise",
        "--",
        "torchrun",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    ds = str(write_ds(tmp_path))
    cmd = [*launch, "-m", "beit3.pretrain.train", "--config", str(recipe), "--ds-config", ds,
           "--output-dir", str(tmp_path / "run"), "--set", "train.keep_last=0"]  # fmt: skip
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert len(error_lines(out)) == 1 and "train.keep_last=0" in error_lines(out)[0]
    assert "rank exit codes 2 x 2" in out


@pytest.mark.parametrize("where", ["directory", "below_a_file"])
def test_an_export_path_that_cannot_be_written_exits_2_before_training(
    tmp_path, capsys, tiny_spm, shard, where
):
    recipe = write_recipe(tmp_path, tiny_spm, shard)
    (tmp_path / "file").write_text("x")
    target = tmp_path if where == "directory" else tmp_path / "file" / "model.pth"
    code, err = run_main(capsys, recipe, write_ds(tmp_path), tmp_path, "--export", str(target))
    assert_config_error(code, err, "--export", "is a directory" if where == "directory" else "not a writable")
    assert not (tmp_path / "run").exists()
