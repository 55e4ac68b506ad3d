"""beit3-pretrain end to end: 2 ranks under torchrun with ZeRO-3 on real shards, TensorBoard, evaluation,
export. The exact resume after SIGKILL of this run (ZeRO-3, a loader worker per rank) is in
tests/test_data_remote.py, with the shards read over HTTP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import tensorboard_scalars
from run_record import assert_marker_holds_no_recipe, assert_recorded_once
from tiny_data import set_args, tiny_pretrain_settings, write_pretrain_data, write_tiny_shards

from beit3.engine.checkpoint import latest_checkpoint, read_marker
from beit3.model import ModelConfig, build_model, get_config, load_checkpoint
from beit3.model.beit3 import BEiT3Model
from beit3.pretrain.data.loader import COUNTER_NAMES

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pretrain_e2e")
    for kind in ("images", "texts", "pairs"):  # held-out shards for the evaluation during training
        write_tiny_shards(str(root / "held_out" / kind), kind, 8, 8, seed=10 + len(kind))
    return write_pretrain_data(root)


def command(assets: dict, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "beit3.pretrain.train",
        "--config", str(REPO / "pretrain/recipes/demo.toml"),
        "--ds-config", str(REPO / "ds_configs/zero3_fp32.json"),
        "--ds-set", "train_micro_batch_size_per_gpu=3",
        "--output-dir", str(out),
        *set_args(tiny_pretrain_settings(assets)),
        "--set", "model.drop_path_rate=0.1",  # stochastic depth: its RNG must be restored too
        "--set", f"train.total_steps={steps}",
        "--set", "train.warmup_steps=2",
        "--set", "train.log_every=1",
        "--set", "train.save_every=2",
        "--set", "data.num_workers=1",
        *extra,
    ]  # fmt: skip


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_two_ranks_zero3_train_log_export_and_reload(assets, tmp_path):
    out = tmp_path / "run"
    export = tmp_path / "export" / "model.pth"
    held_out = assets["root"] / "held_out"
    shards = [f'eval.{kind[:-1]}_shards=["{held_out}/{kind}/*.tar"]' for kind in ("images", "texts", "pairs")]
    evaluation = set_args([*shards, "eval.samples=5", "train.eval_every=2"])  # rank 1: 2, padded to 3
    proc = subprocess.run(command(assets, out, 4, "--export", str(export), *evaluation), env=env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Evaluation on the held-out shards every 2 steps, on both ranks, gathered: eval/* tags, one console line
    for tag in ("eval/loss/mim", "eval/acc/mim", "eval/loss/mlm", "eval/acc/mlm", "eval/acc/vl_mlm",
                "eval/acc/vl_mim", "eval/acc/vl_mlm_shuffled_image", "eval/acc/vl_mlm_no_image",
                "eval/image_use",
                "eval/health/image_top_pc_share", "eval/health/text_top_pc_share",
                "eval/health/pair_effective_rank", "eval/health/degenerate"):  # fmt: skip
        assert sorted(tensorboard_scalars(out, tag)) == [2, 4], tag
    assert all(0 <= v <= 1 for v in tensorboard_scalars(out, "eval/acc/vl_mlm").values())
    for step in (2, 4):  # the engine's console line of the evaluation's scalars
        line = rf"^step {step}/4 \| eval/loss/mim .* \| eval/image_use "
        assert len(re.findall(line, proc.stdout, re.M)) == 1
    for tag in ("loss/total", "loss/mim", "loss/mlm", "loss/vl_mlm", "acc/mlm", "optim/lr", "optim/grad_norm",
                "perf/samples_per_sec", "perf/tokens_per_sec", "data/skipped/image_decode"):  # fmt: skip
        assert sorted(tensorboard_scalars(out, tag)) == [1, 2, 3, 4], tag
    for name in COUNTER_NAMES:  # every counter the loader declares, logged with no engine code naming it
        assert sorted(tensorboard_scalars(out, f"data/{name}")) == [1, 2, 3, 4], name
    assert all(v == v and v < 1e4 for v in tensorboard_scalars(out, "loss/total").values())
    model = build_model("beit3_tiny_patch16_64", vocab_size=64, visual_vocab_size=1024)
    report = load_checkpoint(model, export, strict=True)
    assert not report.missing and not report.unexpected
    sd = torch.load(export, map_location="cpu", weights_only=True)
    assert set(sd) == {"model", "config"} and all(
        k.startswith(("beit3.", "mlm_head.", "mim_head.")) for k in sd["model"]
    )
    # The run describes itself: config.json records the recipe and the DeepSpeed config once and the resolved
    # model configuration, which the export carries and builds the model from; the marker copies no recipe.
    config = json.loads((out / "config.json").read_text())
    assert_recorded_once(config)
    m = config["recipe"]["model"]
    want = get_config(m["name"], drop_path_rate=m["drop_path_rate"], **m["overrides"])
    assert ModelConfig.from_dict(config["model"]) == want == model.cfg.replace(drop_path_rate=0.1)
    assert sd["config"] == config["model"]
    load_checkpoint(BEiT3Model(ModelConfig.from_dict(sd["config"])), export, strict=True)
    assert_marker_holds_no_recipe(read_marker(latest_checkpoint(out)), config["recipe"])


def test_runs_under_the_deepspeed_launcher(assets, tmp_path):
    """`deepspeed --module beit3.pretrain.train` (it passes --local_rank) trains on 2 CPU ranks."""
    out = tmp_path / "run"
    cmd = command(assets, out, 2)
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", "29731", "--module", "beit3.pretrain.train"]  # fmt: skip
    args = cmd[cmd.index("beit3.pretrain.train") + 1 :]
    proc = subprocess.run(launcher + args, env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(tensorboard_scalars(out, "loss/total")) == [1, 2]
