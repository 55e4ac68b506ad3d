"""``beit3-finetune``: every configuration mistake exits 2 with one line naming the setting, before data or a
model are loaded (the recipe below passes every check; each case changes one setting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_data import shapes_recipe, shapes_spm

from beit3.finetune.train import main

REPO = Path(__file__).resolve().parents[1]
DS_CONFIG = str(REPO / "ds_configs" / "zero0_fp32.json")
PROGRAM = "beit3-finetune"


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> str:
    return shapes_spm(tmp_path_factory.mktemp("spm"))


def write_recipe(tmp_path: Path, spm: str, task: str = "vqa") -> str:
    return shapes_recipe(tmp_path / "recipe.toml", spm, task)


def run(capsys, tmp_path: Path, spm: str, *extra: str, task: str = "vqa", output_dir: Path | None = None):
    args = ["--config", write_recipe(tmp_path, spm, task), "--ds-config", DS_CONFIG,
            "--output-dir", str(output_dir or tmp_path / "run"), *extra]  # fmt: skip
    code = main(args)
    return code, capsys.readouterr().err


def assert_config_error(code: int, err: str, *expected: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith(f"{PROGRAM}: error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]


def test_the_base_recipe_passes_every_check(tmp_path, spm):
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.trainer_config import TrainerConfig, preflight
    from beit3.finetune.recipe import load_recipe, validate_run

    recipe = load_recipe(write_recipe(tmp_path, spm))
    ds = validate_run(recipe, load_ds_config(DS_CONFIG, 1), 1)
    preflight(TrainerConfig.for_run(recipe.train, str(tmp_path / "r")), ds, 1)


RECIPE_MISTAKES = [
    ("keep_last_0", ["train.keep_last=0"], "train.keep_last=0"),
    ("log_every_0", ["train.log_every=0"], "train.log_every=0"),
    ("unknown_schedule", ["train.schedule=cosin"], "train.schedule='cosin'"),
    ("negative_lr", ["train.lr=-1e-3"], "train.lr=-0.001"),
    ("inf_lr", ["train.lr=inf"], "train.lr=inf"),
    ("min_lr_above_lr", ["train.min_lr=0.1"], "train.min_lr=0.1 exceeds lr"),
    ("warmup_beyond_total", ["train.warmup_steps=3"], "train.warmup_steps=3 exceeds total_steps=2"),
    ("zero_eps", ["train.eps=0.0"], "train.eps=0.0"),
    ("negative_weight_decay", ["train.weight_decay=-0.01"], "train.weight_decay=-0.01"),
    ("negative_save_every", ["train.save_every=-5"], "train.save_every=-5"),
    ("negative_eval_every", ["train.eval_every=-1"], "train.eval_every=-1"),
    ("betas_one_value", ["train.betas=[0.9]"], "train.betas: expected 2 values"),
    ("beta_above_1", ["train.betas=[0.9, 1.5]"], "train.betas=[0.9, 1.5]"),
    ("layer_decay_0", ["param_groups.layer_decay=0.0"], "param_groups.layer_decay=0.0"),
    ("head_lr_scale_negative", ["param_groups.head_lr_scale=-2.0"], "param_groups.head_lr_scale=-2.0"),
    ("drop_path_one", ["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0"),
    ("img_size_not_a_patch_multiple", ["model.img_size=70"], "model.img_size=70"),
    ("negative_img_size", ["model.img_size=-64"], "model.img_size=-64"),
    ("unknown_model", ["model.name=beit3_huge"], "unknown model 'beit3_huge'"),
    ("negative_classes", ["task.num_classes=-1"], "task.num_classes=-1"),
    ("label_smoothing_1", ["task.label_smoothing=1.0"], "task.label_smoothing=1.0"),
    ("text_len_2", ["data.max_text_len=2"], "data.max_text_len=2"),
    ("text_len_beyond_model", ["data.max_text_len=64"], "data.max_text_len=64 exceeds the model's"),
    ("negative_max_train", ["data.max_train=-1"], "data.max_train=-1"),
    ("mask_prob_1", ["captioning.mask_prob=1.0"], "captioning.mask_prob=1.0"),
    ("zero_beams", ["captioning.num_beams=0"], "captioning.num_beams=0"),
    ("nan_length_penalty", ["captioning.length_penalty=nan"], "captioning.length_penalty=nan"),
    ("unknown_task", ["task.name=segmentation"], "task.name"),
    ("unknown_pooling", ["task.pooling=max"], "task.pooling must be one of ('cls', 'mean'), got 'max'"),
    ("pooling_of_a_task_without_a_pooled_head", ["task.name=nlvr2", "task.pooling=mean"],
     "task.pooling applies to the tasks with a pooled head"),
    ("bad_grad_checkpointing", ["model.grad_checkpointing=every:0"],
     "model.grad_checkpointing='every:0': use 'none', 'all' or 'every:N'"),
    ("bad_grad_checkpointing_part", ["model.grad_checkpointing_part=mlp"],
     "model.grad_checkpointing_part='mlp': use one of 'layer', 'attention', 'ffn'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "overrides,expected", [c[1:] for c in RECIPE_MISTAKES], ids=[c[0] for c in RECIPE_MISTAKES]
)
def test_a_recipe_mistake_exits_2_with_one_line(tmp_path, capsys, spm, overrides, expected):
    code, err = run(capsys, tmp_path, spm, *[a for o in overrides for a in ("--set", o)])
    assert_config_error(code, err, expected)
    assert not (tmp_path / "run").exists()


def test_fp16_on_a_device_without_fp16_exits_2(tmp_path, capsys, spm, monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    code, err = run(capsys, tmp_path, spm, "--ds-set", "fp16.enabled=true")
    assert_config_error(code, err, "fp16.enabled=true", "cannot train in fp16")


def test_a_micro_batch_of_zero_exits_2(tmp_path, capsys, spm):
    code, err = run(capsys, tmp_path, spm, "--ds-set", "train_micro_batch_size_per_gpu=0")
    assert_config_error(code, err, "train_micro_batch_size_per_gpu must be a positive integer")


def test_an_output_dir_that_is_a_file_exits_2(tmp_path, capsys, spm):
    (tmp_path / "run").write_text("a file")
    code, err = run(capsys, tmp_path, spm)
    assert_config_error(code, err, "--output-dir", "is a file")


def test_resume_naming_a_missing_path_exits_2(tmp_path, capsys, spm):
    code, err = run(capsys, tmp_path, spm, "--resume", str(tmp_path / "nowhere"))
    assert_config_error(code, err, "--resume", "nowhere")


def test_eval_only_with_a_missing_model_exits_2(tmp_path, capsys, spm):
    code, err = run(capsys, tmp_path, spm, "--eval-only", str(tmp_path / "model.pth"))
    assert_config_error(code, err, "--eval-only", "model.pth")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, spm) -> Path:
    """A finished finetuning run (2 steps): its run directory holds a complete checkpoint."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    args = ["--config", write_recipe(tmp, spm), "--ds-config", DS_CONFIG, "--output-dir", str(out)]
    with pytest.MonkeyPatch.context() as patch:  # never leak into later tests (nproc reads it)
        patch.setenv("OMP_NUM_THREADS", "1")
        assert main(args) == 0
    assert (out / "checkpoints" / "latest").is_file()
    return out


def test_resume_none_on_a_directory_with_checkpoints_exits_2(tmp_path, capsys, spm, finished_run):
    before = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    code, err = run(capsys, tmp_path, spm, "--resume", "none", output_dir=finished_run)
    assert_config_error(code, err, "--resume none", "--output-dir")
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("case", ["betas", "resume_none"])
def test_the_console_program_exits_2_without_a_traceback(tmp_path, spm, finished_run, case):
    """The real ``python -m beit3.finetune.train`` process: exit status 2 and one line on stderr."""
    out = finished_run if case == "resume_none" else tmp_path / "run"
    extra = ["--resume", "none"] if case == "resume_none" else ["--set", "train.betas=[0.9]"]
    args = [
        "--config",
        write_recipe(tmp_path, spm),
        "--ds-config",
        DS_CONFIG,
        "--output-dir",
        str(out),
        *extra,
    ]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "beit3.finetune.train", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert_config_error(
        proc.returncode, proc.stderr, "--resume none" if case == "resume_none" else "train.betas"
    )
