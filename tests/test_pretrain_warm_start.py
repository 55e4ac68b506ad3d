"""Warm start (``[model] warm_start``, beit3.pretrain.warm_start): a pretraining run's initial weights from a
released-format or exported checkpoint, with a fresh optimizer and schedule; a resume wins over it.

One 2-rank ZeRO-3 run of ``beit3-pretrain`` is warm-started through its warmup; its step-1 weights (the
exported checkpoint of that step) are checked with AdamW's first-step arithmetic: a fresh AdamW moves each
weight by ``lr * g / (|g| + eps)`` (at most ``lr``) plus the decoupled weight decay ``lr * wd * w``, so every
loaded weight must lie within that of the checkpoint's, on both ranks' ZeRO-3 partitions, while the seeded
fresh initialisation is ~100 lr away. A rerun that resumes is checked in-process on one rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import clean_env, launcher, tensorboard_scalars
from tiny_data import set_args, tiny_pretrain_settings, write_pretrain_data

from beit3.engine.checkpoint import tag_for_step
from beit3.engine.config_io import ConfigError
from beit3.engine.lr import lr_at
from beit3.model import build_model, read_state_dict, save_checkpoint
from beit3.pretrain.export import export_run
from beit3.pretrain.warm_start import apply_warm_start

REPO = Path(__file__).resolve().parents[1]
# The runs use a seeded random visual tokenizer (no checkpoint), which warns that it is for smoke tests.
pytestmark = pytest.mark.filterwarnings("ignore:visual tokenizer .* has random weights")
TINY = {"vocab_size": 64, "visual_vocab_size": 1024}  # tiny_pretrain_settings' model
LR, MIN_LR, WARMUP, WEIGHT_DECAY = 1e-3, 1e-5, 2, 0.05
FRESH_HEAD = ("mim_head.bias", "mim_head.weight")  # left out of the checkpoint: initialised fresh


def checkpoint_of(path: Path, seed: int = 7, **overrides) -> dict[str, torch.Tensor]:
    """An exported-format file (weights + the model configuration) of the tiny model, without the MIM head;
    returns its tensors."""
    torch.manual_seed(seed)  # not the run's seed: its fresh initialisation differs everywhere
    model = build_model("beit3_tiny_patch16_64", **{**TINY, **overrides})
    state = {k: v for k, v in model.state_dict().items() if k not in FRESH_HEAD}
    save_checkpoint(state, path, config=model.cfg)
    return read_state_dict(path)


def pretrain_args(assets: dict, out: Path, steps: int, warm_start: Path, *extra: str) -> list[str]:
    return [
        "--config", str(REPO / "pretrain/recipes/demo.toml"),
        "--ds-config", str(REPO / "ds_configs/zero3_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=3",
        "--output-dir", str(out),
        *set_args(tiny_pretrain_settings(assets)),
        "--set", f"model.warm_start={warm_start}",
        "--set", f"train.total_steps={steps}",
        "--set", f"train.lr={LR}",
        "--set", f"train.min_lr={MIN_LR}",
        "--set", f"train.warmup_steps={WARMUP}",
        "--set", f"train.weight_decay={WEIGHT_DECAY}",
        "--set", "train.log_every=1",
        "--set", "train.save_every=1",
        "--set", "train.keep_last=3",
        "--set", "data.num_workers=0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    return write_pretrain_data(tmp_path_factory.mktemp("warm_start_data"))


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, assets) -> dict:
    """The 2-rank warm-started run; returns paths, the checkpoint's tensors and the launcher's output."""
    import subprocess

    root = tmp_path_factory.mktemp("warm_start")
    source = root / "continued_from.pth"
    weights = checkpoint_of(source)
    out, export = root / "run", root / "export" / "model.pth"
    cmd = [*launcher(2), "-m", "beit3.pretrain.train"]
    cmd += pretrain_args(assets, out, WARMUP, source)
    proc = subprocess.run(cmd, env=clean_env(PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    export_run(out, export, tag=tag_for_step(1))  # the weights after the first step
    return {"out": out, "export": export, "source": source, "weights": weights, "log": proc.stderr}


@pytest.mark.multiprocess
def test_the_report_is_logged_once_and_written_to_the_run_directory(warm_run):
    report = json.loads((warm_run["out"] / "warm_start.json").read_text())
    assert report["source"] == str(warm_run["source"])
    assert report["loaded"] == sorted(warm_run["weights"])
    assert report["fresh"] == list(FRESH_HEAD) and report["unused"] == report["interpolated"] == []
    assert warm_run["log"].count(f"warm start from {warm_run['source']}: loaded {len(report['loaded'])}") == 1


@pytest.mark.multiprocess
def test_the_weights_at_step_0_are_the_checkpoints_on_every_rank(warm_run):
    """After one AdamW step from a fresh optimizer at the warmup's first LR, each weight is within
    lr * (1 + wd |w|) of the checkpoint's, on both ranks' partitions."""
    lr_1 = lr_at(0, LR, WARMUP, WARMUP, MIN_LR)
    trained = read_state_dict(warm_run["export"])
    for key, start in warm_run["weights"].items():
        step = (trained[key] - start).abs()
        assert (step <= lr_1 * (1 + WEIGHT_DECAY * start.abs()) + 1e-7).all(), (key, step.max().item())
    fc1 = [k for k in warm_run["weights"] if k.endswith("fc1.weight")]
    moved = torch.cat([(trained[k] - warm_run["weights"][k]).abs().flatten() for k in fc1])
    assert moved.median() > 0.5 * lr_1  # the step did happen, at the warmup's first LR
    # The bound tells the checkpoint from a fresh initialisation: that of the recipe's seed is far away.
    torch.manual_seed(0)
    fresh = build_model("beit3_tiny_patch16_64", **TINY).state_dict()
    assert all((fresh[k] - warm_run["weights"][k]).abs().max() > 50 * lr_1 for k in fc1)


@pytest.mark.multiprocess
def test_the_optimizer_and_schedule_start_fresh(warm_run):
    lrs = tensorboard_scalars(warm_run["out"], "optim/lr")
    assert lrs[1] == pytest.approx(LR / WARMUP, rel=1e-6)  # the warmup's first value
    assert lrs[WARMUP] == pytest.approx(LR, rel=1e-6)


def test_a_rerun_resumes_instead_of_warm_starting_again(tmp_path, assets, caplog):
    """A run's second start (here: one step further, in-process on one rank) resumes from its checkpoint and
    does not apply the warm start again: its file, deleted by then, is not read; the schedule continues and
    the first start's report stays as it was."""
    from beit3.pretrain import train

    source, out = tmp_path / "continued_from.pth", tmp_path / "run"
    checkpoint_of(source)
    zero0 = ("--ds-config", str(REPO / "ds_configs/zero0_fp32.json"))
    assert train.main([*pretrain_args(assets, out, 1, source, "--set", "train.warmup_steps=1"), *zero0]) == 0
    report = (out / "warm_start.json").read_text()
    source.unlink()
    caplog.set_level("INFO")
    assert train.main([*pretrain_args(assets, out, 2, source), *zero0]) == 0
    assert f"warm start from {source} not applied: the run resumes from" in caplog.text
    assert "at step 1" in caplog.text
    assert (out / "warm_start.json").read_text() == report
    lrs = tensorboard_scalars(out, "optim/lr")
    assert sorted(lrs) == [1, 2] and lrs[2] == pytest.approx(lr_at(1, LR, WARMUP, 2, MIN_LR), rel=1e-6)


# ----- in-process: the checks of the file, before training -----


def test_positions_of_another_resolution_are_interpolated_and_other_task_heads_unused(tmp_path):
    weights = checkpoint_of(tmp_path / "at96.pth", img_size=96)
    weights["vision_head.weight"] = torch.zeros(64, 64)  # as in an image-text-contrastive checkpoint
    model = build_model("beit3_tiny_patch16_64", **TINY)
    report = apply_warm_start(model, weights, "at96.pth")
    assert report.interpolated == ["beit3.encoder.embed_positions.A.weight"]
    assert report.fresh == list(FRESH_HEAD) and report.unused == ["vision_head.weight"]
    assert torch.equal(model.state_dict()["beit3.text_embed.weight"], weights["beit3.text_embed.weight"])
    rows = model.state_dict()["beit3.encoder.embed_positions.A.weight"]
    assert rows.shape[0] == 3 + 4 * 4 and torch.equal(
        rows[:3], weights["beit3.encoder.embed_positions.A.weight"][:3]
    )


def test_a_backbone_key_of_another_architecture_is_refused_naming_it(tmp_path):
    weights = checkpoint_of(tmp_path / "ckpt.pth")
    weights["beit3.encoder.layers.0.ffn.C.fc1.weight"] = torch.zeros(256, 64)  # a VL expert: paper layout
    with pytest.raises(ConfigError, match=r"ffn\.C\.fc1\.weight.*belong to no part of this architecture"):
        apply_warm_start(build_model("beit3_tiny_patch16_64", **TINY), weights, "ckpt.pth")


def run_main(capsys, tmp_path, tok, warm_start: Path, *extra: str) -> tuple[int, str]:
    from beit3.pretrain import train

    assets = {"root": tmp_path / "nowhere", "spm": tok.model_file}
    shard = tmp_path / "images-000000.tar"
    shard.write_bytes(b"")  # existence is all validation checks before data is read
    settings = [s for s in tiny_pretrain_settings(assets) if "_shards=" not in s]
    argv = [
        "--config", str(REPO / "pretrain/recipes/demo.toml"),
        "--ds-config", str(REPO / "ds_configs/zero0_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=3",
        "--output-dir", str(tmp_path / "run"),
        *set_args(settings),
        *set_args([f'data.{kind}_shards=["{shard}"]' for kind in ("image", "text", "pair")]),
        "--set", "model.overrides={vocab_size=128,visual_vocab_size=1024}",  # not the checkpoint's 64
        "--set", f"model.warm_start={warm_start}",
        *extra,
    ]  # fmt: skip
    code = train.main(argv)
    return code, capsys.readouterr().err


def error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("beit3-pretrain: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_missing_file_is_a_configuration_error_naming_it(tmp_path, capsys, tok):
    line = error_line(*run_main(capsys, tmp_path, tok, tmp_path / "absent.pth"))
    assert "[model] warm_start=" in line and "absent.pth" in line and "does not exist" in line


def test_a_file_that_is_not_a_checkpoint_is_a_configuration_error_naming_it(tmp_path, capsys, tok):
    junk = tmp_path / "notes.pth"
    junk.write_text("not a checkpoint\n")
    line = error_line(*run_main(capsys, tmp_path, tok, junk))
    assert "[model] warm_start=" in line and "notes.pth" in line and "not a file torch.save wrote" in line


def test_a_file_of_another_preset_is_refused_naming_the_fields(tmp_path, capsys, tok):
    torch.manual_seed(0)
    paper = build_model("beit3_tiny_paper_patch16_64", vocab_size=128, visual_vocab_size=1024)
    path = save_checkpoint(paper, tmp_path / "paper.pth", config=paper.cfg)
    line = error_line(*run_main(capsys, tmp_path, tok, path))
    assert "another architecture than model.name=beit3_tiny_patch16_64" in line and "layout" in line
    assert "set model.name=beit3_tiny_paper_patch16_64" in line


def test_a_file_of_other_sizes_is_refused_naming_the_key(tmp_path, capsys, tok):
    checkpoint_of(tmp_path / "vocab64.pth")  # a 64-row text embedding; the recipe's model has 128
    line = error_line(*run_main(capsys, tmp_path, tok, tmp_path / "vocab64.pth"))
    assert "beit3.text_embed.weight: checkpoint (64, 64) vs model (128, 64)" in line
    assert "vocab_size" in line
