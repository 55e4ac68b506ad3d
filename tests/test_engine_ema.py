"""The EMA of the weights (``train.ema_decay``, engine/ema.py) at ZeRO 0-3: its math, skipped steps, the swap
for evaluation, checkpoints and resume (same and another world size), consolidation.

In-process runs (one gloo rank) check the math against a plain-torch reference; one 2-rank torchrun launch
(this file as its script: ``python tests/test_engine_ema.py --runs '<json>' --results DIR``) runs ZeRO-0 and
ZeRO-3 side by side, an interrupted ZeRO-3 run, and a resume of a 1-rank ZeRO-3 checkpoint on 2 ranks; a
2-rank ZeRO-3 checkpoint is then resumed on 1 rank in-process.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    DS_CONFIGS,
    ToyData,
    ToyMultiwayTask,
    single_rank,  # noqa: F401  (a fixture)
    tensorboard_scalars,
)

SCRIPT = str(Path(__file__).resolve())
pytestmark = [
    pytest.mark.usefixtures("single_rank"),
    # DeepSpeed 0.19.8 calls deprecated torch names (collectives, torch.jit.script_method): not ours to fix.
    pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning"),
]
DECAY = 0.8
STEPS, SAVE_EVERY = 6, 3
# Micro-batch 2, global batch 4 on the source's world size (gas 2 on 1 rank, 1 on 2 ranks), so that a
# checkpoint of either world size resumes on the other (the global batch is kept).
MICRO = 2
# Width 15: the experts' 225 weights and the 15-element biases do not split evenly over 2 ranks (ZeRO-3 pads
# the last partition). ZeRO-3 keeps the biases (4 and 15 elements) whole (persistent) and partitions the
# weights (60-225): the swap covers both kinds of storage.
DIM = 15
# ZeRO++ hpZ on 2 ranks: every parameter partitioned and released after each use, so each release leaves a
# secondary partition that the next gather reads instead of ds_tensor.
HPZ = {f"zero_optimization.{k}": v for k, v in {"zero_hpz_partition_size": 2, "stage3_max_reuse_distance": 0,
       "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}.items()}  # fmt: skip
PERSIST_BIASES = {"zero_optimization.stage3_param_persistence_threshold": 20}


def _overrides(world: int, extra: dict | None = None) -> dict:
    return {"train_batch_size": None, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 4 // (MICRO * world), **(extra or {})}  # fmt: skip


def eval_batch() -> dict:
    """A fixed batch, drawn without touching the global RNG (the training's dropout stream)."""
    gen = torch.Generator().manual_seed(7)
    xa, xb = torch.randn(2, 4, 8, generator=gen)
    ya, yb = torch.randint(0, 4, (2, 4), generator=gen)
    return {"xa": xa, "ya": ya, "xb": xb, "yb": yb, "index": -2}


def build(spec: dict, dist=None):
    """A Trainer on the toy task with an EMA and an evaluation of ``eval_batch`` (its loss); ``dist``: this
    process's (None: the in-process one-rank group of the ``single_rank`` fixture)."""
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.launch import init_distributed
    from beit3.engine.trainer import Trainer, TrainerConfig

    dist = dist or init_distributed()

    torch.manual_seed(0)  # the same initial weights in every run
    task = ToyMultiwayTask(dim=DIM, dropout=spec.get("dropout", 0.1))
    ds = load_ds_config(DS_CONFIGS / spec["ds_config"], dist.world_size, spec.get("overrides"))
    data = ToyData(ds["train_micro_batch_size_per_gpu"], rank=dist.rank, nan_batches=spec.get("nan", ()))
    batch = eval_batch()

    def evaluate(step: int) -> dict[str, float]:
        return {"eval_loss": float(task(batch)[0])}

    eval_every = spec.get("eval_every", SAVE_EVERY)
    cfg = TrainerConfig(
        output_dir=spec["output_dir"], total_steps=spec["steps"], log_every=1,
        save_every=spec.get("save_every", SAVE_EVERY), keep_last=10, lr=1e-2, warmup_steps=0,
        schedule="constant", ema_decay=spec.get("ema_decay", DECAY), eval_every=eval_every,
        best_metric="ema/eval_loss" if eval_every and spec.get("ema_decay", DECAY) else "",
        best_mode="min", resume=spec.get("resume", "auto"), shutdown_at_end=False,
    )  # fmt: skip
    return Trainer(task, data, ds, cfg, dist, eval_fn=evaluate if eval_every else None)


def swap_check(trainer) -> dict:
    """Collective: the local storage inside and after ``swapped()``, and the loss of the fixed batch."""
    ema, task, batch = trainer.ema, trainer.engine.module, eval_batch()
    task.eval()
    with torch.no_grad():
        before = [s.local().clone() for s in ema.slots]
        resident = {s.name: s.live().data.clone() for s in ema.slots
                    if s.start is not None and s.live().data.numel() == s.numel}  # fmt: skip
        loss_before = float(task(batch)[0])
        # ZeRO++ hpZ: that forward's release left secondary partitions of the trained weights
        secondaries = sum(getattr(s.live(), "ds_secondary_tensor", None) is not None for s in ema.slots)
        with ema.swapped():
            inside = all(torch.equal(s.local(), s.ema.to(s.local().dtype)) for s in ema.slots)
            loss_in = float(task(batch)[0])
        restored = all(torch.equal(s.local(), b) for s, b in zip(ema.slots, before, strict=True))
        restored_resident = all(torch.equal(ema_slot(ema, n).live().data, v) for n, v in resident.items())
        loss_after = float(task(batch)[0])
    task.train()
    return {"inside_is_ema": inside, "restored": restored, "restored_resident": restored_resident,
            "resident": sorted(resident), "secondaries": secondaries, "loss_before": loss_before,
            "loss_in": loss_in, "loss_after": loss_after}  # fmt: skip


def ema_slot(ema, name: str):
    return next(s for s in ema.slots if s.name == name)


# ----- the script side (runs under torchrun) -----
def run_spec(spec: dict, dist) -> dict:
    trainer = build(spec, dist)
    out = {"name": spec["name"], "start": trainer.step}
    if spec.get("dump_loaded"):
        loaded = {s.name: s.ema.clone() for s in trainer.ema.slots}
        torch.save(loaded, Path(spec["output_dir"]) / f"ema_loaded_rank{dist.rank}.pt")
    result = trainer.fit()
    out.update(step=result.step, exit_reason=result.exit_reason)
    if spec.get("swap_check"):
        out["swap"] = swap_check(trainer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True)
    parser.add_argument("--results", required=True)
    from beit3.engine.launch import add_launcher_args, init_distributed, shutdown_distributed

    args = add_launcher_args(parser).parse_args(argv)
    dist = init_distributed(args.local_rank)
    results = [run_spec(spec, dist) for spec in json.loads(args.runs)]
    Path(args.results, f"results_rank{dist.rank}.json").write_text(json.dumps(results))
    shutdown_distributed()
    return 0


# ----- the pytest side -----
def _tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step{step:08d}"


def _initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.double() for k, v in ToyMultiwayTask(dim=DIM).state_dict().items()}


def _loss_with(state: dict[str, torch.Tensor]) -> float:
    module = ToyMultiwayTask(dim=DIM, dropout=0.0)
    module.load_state_dict(state)
    with torch.no_grad():
        return float(module(eval_batch())[0])


def test_ema_equals_a_plain_torch_reference_and_skipped_steps_leave_it(tmp_path):
    """ZeRO-0, one rank: checkpoints of every step give the weights; the EMA follows them with decay 0.8,
    except in step 3, whose NaN batch skips the optimizer step (weights and EMA unchanged)."""
    from beit3.engine.consolidate import consolidate_checkpoint, consolidate_ema
    from beit3.engine.ema import ema_state_dict

    one_batch = _overrides(1, {"gradient_accumulation_steps": 1})
    spec = {"output_dir": str(tmp_path), "ds_config": "zero0_fp32.json", "steps": 5, "save_every": 1,
            "eval_every": 0, "nan": (2,), "overrides": one_batch}  # fmt: skip
    trainer = build(spec)
    assert trainer.fit().exit_reason == "finished"
    reference = _initial_weights()
    for step in range(1, 6):
        weights = consolidate_checkpoint(_tag(tmp_path, step))
        if step != 3:
            reference = {k: DECAY * v + (1 - DECAY) * weights[k].double() for k, v in reference.items()}
        saved = ema_state_dict(_tag(tmp_path, step))
        assert sorted(saved) == sorted(reference)
        assert max((saved[k].double() - reference[k]).abs().max().item() for k in saved) < 1e-6, step
    previous, skipped = (ema_state_dict(_tag(tmp_path, s)) for s in (2, 3))
    assert all(torch.equal(previous[k], skipped[k]) for k in previous)
    weights2, weights3 = (consolidate_checkpoint(_tag(tmp_path, s)) for s in (2, 3))
    assert all(torch.equal(weights2[k], weights3[k]) for k in weights2)  # the step was skipped
    marker = json.loads((_tag(tmp_path, 5) / "complete.json").read_text())
    assert marker["ema"]["updates"] == 4 and marker["ema"]["decay"] == DECAY
    assert "ema_rank00000.pt" in marker["files"]  # checksummed like every file of the tag
    exported = consolidate_ema(tmp_path)
    assert exported.keys() == consolidate_checkpoint(tmp_path).keys()
    assert all(torch.equal(exported[k], v) for k, v in ema_state_dict(_tag(tmp_path, 5)).items())


def test_steps_skipped_on_an_fp16_overflow_leave_the_ema(tmp_path, monkeypatch):
    """ZeRO-2 fp16 from a loss scale of 2^18: DeepSpeed skips the first four steps (overflows), the fifth
    runs; the EMA moved once, from its start toward the fp16 weights of that one step."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)  # CPU trap 2
    spec = {"output_dir": str(tmp_path), "ds_config": "zero2_fp16.json", "steps": 5, "eval_every": 0,
            "dropout": 0.0, "overrides": _overrides(1, {"fp16.initial_scale_power": 18})}  # fmt: skip
    trainer = build(spec)
    start = {s.name: s.ema.clone() for s in trainer.ema.slots}
    trainer.fit()
    assert (trainer.skipped_steps, trainer.ema.updates) == (4, 1)
    for slot in trainer.ema.slots:
        weights = slot.local().float()
        assert slot.local().dtype == torch.float16 and not torch.equal(weights, start[slot.name])
        expected = DECAY * start[slot.name] + (1 - DECAY) * weights
        assert torch.allclose(slot.ema, expected, rtol=0, atol=1e-6), slot.name


def test_swap_puts_the_ema_in_and_the_trained_bits_back_with_buffers_and_bf16():
    """Without DeepSpeed: a bf16 module with a BatchNorm (floating running stats averaged, the integer
    counter not); inside ``swapped()`` the module holds the EMA rounded to bf16, after it the exact bits."""
    from beit3.engine.ema import WeightEma

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)).bfloat16()
    ema = WeightEma(module, 0.5)
    assert sorted(s.name for s in ema.slots) == ["0.bias", "0.weight", "1.bias", "1.running_mean",
                                                 "1.running_var", "1.weight"]  # fmt: skip
    start = {k: v.float().clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    module(torch.randn(4, 3).bfloat16())  # training mode: the running stats and the counter move
    ema.update()
    trained = {k: v.clone() for k, v in module.state_dict().items()}
    for name, value in start.items():
        if name != "1.num_batches_tracked":
            expected = 0.5 * value + 0.5 * trained[name].float()
            assert torch.allclose(ema_slot(ema, name).ema, expected, atol=1e-6), name
    with ema.swapped():
        inside = module.state_dict()
        assert torch.equal(inside["0.weight"], ema_slot(ema, "0.weight").ema.bfloat16())
        assert torch.equal(inside["1.running_mean"], ema_slot(ema, "1.running_mean").ema.bfloat16())
        assert inside["1.num_batches_tracked"] == trained["1.num_batches_tracked"]
        with pytest.raises(RuntimeError, match="inside swapped"):
            ema.update()
    assert all(torch.equal(v, trained[k]) for k, v in module.state_dict().items())
    with pytest.raises(ZeroDivisionError), ema.swapped():  # an evaluation that fails: restored all the same
        raise ZeroDivisionError
    assert all(torch.equal(v, trained[k]) for k, v in module.state_dict().items()) and not ema.active


def test_a_checkpoint_without_ema_starts_it_from_its_weights_with_a_warning(tmp_path, caplog):
    spec = {"output_dir": str(tmp_path), "ds_config": "zero0_fp32.json", "steps": 2, "eval_every": 0,
            "ema_decay": 0.0, "overrides": _overrides(1)}  # fmt: skip
    build(spec).fit()
    with caplog.at_level(logging.WARNING, logger="beit3.engine.trainer"):
        resumed = build({**spec, "steps": 3, "ema_decay": DECAY})
    assert resumed.step == 2 and "holds no EMA of the weights" in caplog.text
    assert all(torch.equal(s.ema, s.local()) for s in resumed.ema.slots)


def test_settings_refuse_a_decay_outside_its_range_and_an_ema_metric_without_ema():
    from beit3.engine.ds_config import EngineConfigError
    from beit3.engine.trainer_config import TrainSettings

    assert "train.ema_decay=1.0" in TrainSettings(ema_decay=1.0).problem()
    assert "[0, 1)" in TrainSettings(ema_decay=-0.1).problem()
    problem = TrainSettings(eval_every=10, best_metric="ema/accuracy").problem()
    assert "needs ema_decay > 0: set ema_decay" in problem
    assert TrainSettings(eval_every=10, best_metric="ema/accuracy", ema_decay=0.9999).problem() is None
    with pytest.raises(EngineConfigError, match="ema_decay"):
        TrainSettings(ema_decay=1.5).validate()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """A 1-rank ZeRO-3 source (in-process), then one 2-rank launch: ZeRO-0 and ZeRO-3 runs of 6 steps, a
    ZeRO-3 run interrupted at step 3 and resumed, and the 1-rank source resumed on 2 ranks."""
    from engine_helpers import torchrun

    root = tmp_path_factory.mktemp("ema")
    source1 = {"name": "one_rank_z3", "output_dir": str(root / "one_rank_z3"), "ds_config": "zero3_fp32.json",
               "steps": 3, "overrides": _overrides(1, PERSIST_BIASES)}  # fmt: skip
    build(source1).fit()
    z3 = {"ds_config": "zero3_fp32.json", "overrides": _overrides(2, PERSIST_BIASES)}
    specs = [
        {"name": "z0", "output_dir": str(root / "z0"), "ds_config": "zero0_fp32.json", "steps": STEPS,
         "overrides": _overrides(2)},
        {"name": "z3", "output_dir": str(root / "z3"), "steps": STEPS, "swap_check": True, **z3},
        {"name": "z3_part1", "output_dir": str(root / "z3_resumed"), "steps": SAVE_EVERY, **z3},
        {"name": "z3_part2", "output_dir": str(root / "z3_resumed"), "steps": STEPS, **z3},
        {**source1, "name": "from_one_rank", "steps": 4, "dump_loaded": True},
        {"name": "z3_hpz", "output_dir": str(root / "z3_hpz"), "ds_config": "zero3_fp32.json",
         "steps": SAVE_EVERY, "swap_check": True, "overrides": _overrides(2, HPZ)},
    ]  # fmt: skip
    proc = torchrun(specs, root / "launch", 2, SCRIPT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return root


def _results(root: Path, rank: int = 0) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / "launch" / f"results_rank{rank}.json").read_text())}


@pytest.mark.multiprocess
def test_two_rank_zero3_ema_equals_zero0_and_evaluates_the_ema_weights(launched):
    from beit3.engine.consolidate import consolidate_checkpoint, consolidate_ema
    from beit3.engine.ema import ema_state_dict

    for step in (SAVE_EVERY, STEPS):
        zero0, zero3 = (ema_state_dict(_tag(launched / n, step)) for n in ("z0", "z3"))
        assert sorted(zero0) == sorted(zero3)
        assert max((zero0[k] - zero3[k]).abs().max().item() for k in zero0) < 1e-6
        # each ZeRO-3 rank saved its partitions only: the half (rounded up) of each flattened weight
        parts = [torch.load(_tag(launched / "z3", step) / f"ema_rank{r:05d}.pt") for r in (0, 1)]
        for name, full in zero3.items():
            half = math.ceil(full.numel() / 2)
            assert torch.equal(torch.cat([p["tensors"][name] for p in parts]), full.reshape(-1))
            assert [p["starts"][name] for p in parts] == [0, half]
    # The evaluation ran on the EMA weights (TensorBoard's ema/ scalars) and on the trained ones
    for run in ("z0", "z3"):
        for step in (SAVE_EVERY, STEPS):
            ema_loss = tensorboard_scalars(launched / run, "ema/eval_loss")[step]
            assert ema_loss == pytest.approx(
                _loss_with(consolidate_ema(_tag(launched / run, step))), abs=1e-6
            )
            loss = tensorboard_scalars(launched / run, "eval_loss")[step]
            assert loss == pytest.approx(
                _loss_with(consolidate_checkpoint(_tag(launched / run, step))), abs=1e-6
            )
            assert abs(ema_loss - loss) > 1e-4
    best = json.loads((launched / "z3" / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "ema/eval_loss" and best["tag"] in ("step00000003", "step00000006")


@pytest.mark.multiprocess
def test_two_rank_zero3_swap_is_bit_exact_for_partitioned_and_persistent_parameters(launched):
    for rank in (0, 1):
        swap = _results(launched, rank)["z3"]["swap"]
        assert swap["inside_is_ema"] and swap["restored"] and swap["restored_resident"]
        assert swap["resident"] == ["embed.bias", "expert_a.bias", "expert_b.bias", "head.bias"]
        assert swap["loss_after"] == swap["loss_before"] and abs(swap["loss_in"] - swap["loss_before"]) > 1e-4


@pytest.mark.multiprocess
def test_hpz_secondary_partitions_never_serve_the_other_weights(launched):
    """A secondary partition left by the ordinary evaluation would make the EMA evaluation gather the trained
    weights, and one left by the EMA evaluation would make the next forward gather the EMA: both dropped."""
    for rank in (0, 1):
        swap = _results(launched, rank)["z3_hpz"]["swap"]
        assert swap["secondaries"] > 0  # hpZ really partitioned a second time
        assert swap["restored"] and swap["loss_after"] == swap["loss_before"]
        assert abs(swap["loss_in"] - swap["loss_before"]) > 1e-4
    for tag in ("eval_loss", "ema/eval_loss"):
        hpz, zero0 = (tensorboard_scalars(launched / n, tag)[SAVE_EVERY] for n in ("z3_hpz", "z0"))
        assert hpz == pytest.approx(zero0, abs=1e-6), tag


@pytest.mark.multiprocess
def test_resumed_zero3_run_has_the_uninterrupted_runs_ema_bit_for_bit(launched):
    from beit3.engine.ema import ema_state_dict

    assert _results(launched)["z3_part2"]["start"] == SAVE_EVERY
    straight, resumed = (ema_state_dict(_tag(launched / n, STEPS)) for n in ("z3", "z3_resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for rank in (0, 1):  # the files of each rank, not only their concatenation
        a, b = (
            torch.load(_tag(launched / n, STEPS) / f"ema_rank{rank:05d}.pt") for n in ("z3", "z3_resumed")
        )
        assert a["updates"] == b["updates"] == STEPS
        assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])


@pytest.mark.multiprocess
def test_a_one_rank_zero3_ema_resumed_on_two_ranks_takes_each_ranks_share(launched):
    """Each rank's loaded EMA is its ZeRO-3 partition of the saved whole: ceil(N / 2) elements from there."""
    from beit3.engine.ema import ema_state_dict

    assert _results(launched)["from_one_rank"]["start"] == SAVE_EVERY
    saved = ema_state_dict(_tag(launched / "one_rank_z3", SAVE_EVERY))
    for rank in (0, 1):
        loaded = torch.load(launched / "one_rank_z3" / f"ema_loaded_rank{rank}.pt")
        assert sorted(loaded) == sorted(saved)
        for name, full in saved.items():
            half = math.ceil(full.numel() / 2)
            assert torch.equal(loaded[name], full.reshape(-1)[rank * half : (rank + 1) * half]), name


@pytest.mark.multiprocess
def test_a_two_rank_zero3_ema_resumed_on_one_rank_is_rebuilt_exactly(launched, tmp_path):
    from beit3.engine.ema import ema_state_dict

    run = tmp_path / "z3_on_one_rank"
    shutil.copytree(launched / "z3", run)
    shutil.rmtree(_tag(run, STEPS))  # resume from step 3 (the pointer is repaired)
    (run / "checkpoints" / "best.json").unlink(missing_ok=True)
    spec = {"name": "z3_2to1", "output_dir": str(run), "ds_config": "zero3_fp32.json", "steps": STEPS,
            "overrides": _overrides(2, PERSIST_BIASES)}  # fmt: skip
    trainer = build(spec)
    assert trainer.step == SAVE_EVERY and trainer.gas == 2  # the global batch kept on one rank
    saved = ema_state_dict(_tag(launched / "z3", SAVE_EVERY))
    assert all(torch.equal(ema_slot(trainer.ema, k).ema, v.reshape(-1)) for k, v in saved.items())
    assert trainer.fit().exit_reason == "finished"


if __name__ == "__main__":
    sys.exit(main())
