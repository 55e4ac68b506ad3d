"""Resume on another number of ranks (2 -> 1 and 1 -> 2) at ZeRO-1/2/3 in bf16 and fp32 (engine/reshard.py).

Three launches, each running many Trainers in one process: 1 rank trains the 1 -> 2 sources, 2 ranks train
the 2 -> 1 sources and resume the 1 -> 2 ones, 1 rank resumes the 2 -> 1 ones. Every run dumps, on every
rank, the full fp32 master weight, AdamW moments and step of each parameter through DeepSpeed's own
accessors (``safe_get_full_*``): after training (what was saved) and right after the resume (what was
loaded). Run as a script: ``python tests/test_resume_world_size.py --runs '<json>' --results DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import DS_CONFIGS, ToyData, ToyMultiwayTask

SCRIPT = str(Path(__file__).resolve())
STEPS = 2  # trained before the change of world size; the resumed run trains one more
STAGES = (0, 1, 2, 3)  # 0 keeps whole states and loads as it is; 1-3 go through the universal format
PRECISIONS = ("fp32", "bf16")
DIRECTIONS = {"2to1": (2, 1), "1to2": (1, 2)}
MICRO = 2
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _ds_file(stage: int, precision: str) -> str:
    """The shipped config of that precision (zero3_*: stage set by override; bf16 with fp32 accumulation)."""
    return f"zero{0 if stage == 0 else 3}_{precision}.json"


def _overrides(stage: int, source_world: int) -> dict:
    """Micro-batch 2 and a global batch of 4 on the source's world size (gas 2 on 1 rank, 1 on 2 ranks).

    The resume passes the same overrides (as a requeue passes the same config): on the other world size they
    give another global batch, and the trainer re-derives the accumulation steps to keep the checkpoint's.
    """
    return {
        "zero_optimization.stage": stage,
        "train_batch_size": None,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 4 // (MICRO * source_world),
    }


# ----- the script side (runs under torchrun) -----
def dump_states(trainer) -> dict:
    """Collective: every parameter's full fp32 master, moments and module weight, and the optimizer steps."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from engine_helpers import base_optimizer, full_parameters

    module = full_parameters(trainer)
    base = base_optimizer(trainer)
    steps = sorted({float(s["step"]) for s in base.state.values() if "step" in s})
    gas = trainer.engine.gradient_accumulation_steps()
    if trainer.engine.zero_optimization_stage() == 0:
        # No ZeRO: every rank's base optimizer holds the whole fp32 masters and moments.
        flat = [p for group in base.param_groups for p in group["params"]]
        params = {}
        for i, p in enumerate(flat):
            params[f"group_param{i}"] = {k: base.state[p][k].detach().float().clone() for k in STATE_KEYS[1:]}
            params[f"group_param{i}"]["fp32"] = p.detach().float().clone()
        return {"params": params, "module": module, "steps": steps, "gas": gas}
    optimizer = trainer.engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and BF16_Optimizer link each parameter to its moments once, right after the first group's
        # first step, when the other groups have no state yet (DeepSpeed 0.19.8, several groups): link again.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    params = {}
    for name, param in trainer.engine.module.named_parameters():
        params[name] = {
            "fp32": safe_get_full_fp32_param(param).detach().float().cpu().clone(),
            "exp_avg": safe_get_full_optimizer_state(param, "exp_avg").detach().float().cpu().clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(param, "exp_avg_sq").detach().float().cpu().clone(),
        }
    return {"params": params, "module": module, "steps": steps, "gas": gas}


def run_spec(spec: dict, dist) -> dict:
    from beit3.engine.ds_config import EngineConfigError, load_ds_config
    from beit3.engine.trainer import Trainer, TrainerConfig

    torch.manual_seed(0)
    task = ToyMultiwayTask(dropout=0.0)
    ds = load_ds_config(DS_CONFIGS / spec["ds_config"], dist.world_size, spec["overrides"])
    data = ToyData(ds["train_micro_batch_size_per_gpu"], rank=dist.rank)
    cfg = TrainerConfig(
        output_dir=spec["output_dir"],
        total_steps=spec["steps"],
        log_every=1,
        save_every=0,
        lr=1e-2,
        warmup_steps=0,
        schedule="constant",
        tensorboard=False,
        shutdown_at_end=False,
    )
    try:
        trainer = Trainer(task, data, ds, cfg, dist)
    except EngineConfigError as err:
        return {"name": spec["name"], "error": str(err)}
    out = {"name": spec["name"], "gas": trainer.gas, "ds_config": trainer.ds_config, "start": trainer.step}
    if spec["phase"] == "resume":
        states = dump_states(trainer)  # what the resume loaded, before any step
        if dist.rank == 0:
            torch.save(states, Path(spec["output_dir"]) / "loaded.pt")
    result = trainer.fit()
    out.update(step=result.step, exit_reason=result.exit_reason, loss=result.last_metrics.get("loss/total"))
    if spec["phase"] == "train":
        states = dump_states(trainer)  # what the final checkpoint holds
        if dist.rank == 0:
            torch.save(states, Path(spec["output_dir"]) / "saved.pt")
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
def _launch(nproc: int, specs: list[dict], results: Path) -> None:
    from engine_helpers import torchrun

    proc = torchrun(specs, results, nproc, SCRIPT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _combos() -> list[tuple[int, str, str]]:
    return [(s, p, d) for d in DIRECTIONS for p in PRECISIONS for s in STAGES]


def _name(stage: int, precision: str, direction: str) -> str:
    return f"z{stage}_{precision}_{direction}"


def _spec(root: Path, name: str, precision: str, stage: int, source_world: int, phase: str) -> dict:
    spec = {"name": name, "output_dir": str(root / name), "ds_config": _ds_file(stage, precision),
            "overrides": _overrides(stage, source_world), "phase": phase,
            "steps": STEPS if phase == "train" else STEPS + 1}  # fmt: skip
    return spec


def _snapshot(tag_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tag_dir.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reshard")
    sources = {1: [], 2: []}
    resumes = {1: [], 2: []}
    for stage, precision, direction in _combos():
        before, after = DIRECTIONS[direction]
        name = _name(stage, precision, direction)
        sources[before].append(_spec(root, name, precision, stage, before, "train"))
        resumes[after].append(_spec(root, name, precision, stage, before, "resume"))
    # A global batch that 2 ranks cannot keep: micro 2 x gas 1 on 1 rank.
    impossible = {**_overrides(1, 1), "gradient_accumulation_steps": 1}
    sources[1].append({**_spec(root, "impossible_1to2", "fp32", 1, 1, "train"), "overrides": impossible})
    resumes[2].append({**_spec(root, "impossible_1to2", "fp32", 1, 1, "resume"), "overrides": impossible})
    _launch(1, sources[1], root / "launch1")
    _launch(2, sources[2] + resumes[2], root / "launch2")
    snapshots = {s["name"]: _snapshot(Path(s["output_dir"]) / "checkpoints" / f"step{STEPS:08d}")
                 for s in sources[2]}  # fmt: skip
    _launch(1, resumes[1], root / "launch3")
    for name, before in snapshots.items():
        assert _snapshot(root / name / "checkpoints" / f"step{STEPS:08d}") == before, (
            f"{name}: source changed"
        )
    return root


def _results(root: Path, launch: str) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((root / launch / "results_rank0.json").read_text())}


def _max_diffs(saved: dict, loaded: dict) -> dict[str, float]:
    diffs = {}
    for key in STATE_KEYS:
        diffs[key] = max((saved["params"][n][key] - loaded["params"][n][key]).abs().max().item()
                         for n in saved["params"])  # fmt: skip
    diffs["module"] = max(
        (saved["module"][n] - loaded["module"][n]).abs().max().item() for n in saved["module"]
    )
    return diffs


@pytest.mark.slow  # three launches of 17 short runs in all (about 70 s on 2 cores)
@pytest.mark.multiprocess
@pytest.mark.parametrize(("stage", "precision", "direction"), _combos())
def test_resume_on_another_world_size_restores_weights_and_moments_exactly(
    resharded, stage, precision, direction
):
    name = _name(stage, precision, direction)
    before, after = DIRECTIONS[direction]
    run = resharded / name
    saved, loaded = torch.load(run / "saved.pt"), torch.load(run / "loaded.pt")
    assert sorted(saved["params"]) == sorted(loaded["params"])
    diffs = _max_diffs(saved, loaded)
    print(f"{name}: max |diff| {diffs}")
    assert diffs == dict.fromkeys(diffs, 0.0), diffs
    assert saved["steps"] == [float(STEPS)] and loaded["steps"] == [float(STEPS)]
    # The global batch is kept: 2 micro-batches of 2 on 1 rank, 1 on each of 2 ranks.
    assert (saved["gas"], loaded["gas"]) == (4 // (MICRO * before), 4 // (MICRO * after))
    tag_dir = run / "checkpoints" / f"step{STEPS:08d}"
    # ZeRO shards were converted once, beside the untouched source; stage 0 loads as it is.
    assert (tag_dir / "universal" / "universal_complete.json").is_file() == (stage > 0)
    assert not list(tag_dir.glob(".universal.tmp*"))
    resumed = _results(resharded, "launch2" if after == 2 else "launch3")[name]
    assert resumed["start"] == STEPS and resumed["exit_reason"] == "finished" and resumed["step"] == STEPS + 1
    assert resumed["ds_config"]["train_batch_size"] == 4 and "checkpoint" not in resumed["ds_config"]
    assert latest_tag(run) == f"step{STEPS + 1:08d}"


def latest_tag(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.mark.slow  # shares the three launches
@pytest.mark.multiprocess
def test_a_global_batch_the_new_world_size_cannot_keep_is_a_config_error(resharded):
    result = _results(resharded, "launch2")["impossible_1to2"]
    assert "cannot keep the global batch (train_batch_size) 2" in result["error"]
    assert "train_micro_batch_size_per_gpu to a divisor of 1" in result["error"]
    assert not (resharded / "impossible_1to2" / "checkpoints" / f"step{STEPS:08d}" / "universal").exists()


@pytest.mark.slow  # shares the three launches
@pytest.mark.multiprocess
def test_resharded_master_weights_equal_the_consolidated_source(resharded):
    """engine/consolidate.py reads the original shards independently of DeepSpeed's converter."""
    from beit3.engine.consolidate import consolidate_checkpoint

    for stage, precision, direction in _combos():
        run = resharded / _name(stage, precision, direction)
        consolidated = consolidate_checkpoint(run / "checkpoints" / f"step{STEPS:08d}")
        loaded = torch.load(run / "loaded.pt")
        # Stage 0 consolidates to the module's weights as trained (bf16 ones for bf16).
        loaded = {n: v.float() for n, v in loaded["module"].items()} if stage == 0 else {
            n: states["fp32"] for n, states in loaded["params"].items()}  # fmt: skip
        assert sorted(consolidated) == sorted(loaded)
        assert all(torch.equal(consolidated[n], loaded[n]) for n in loaded), run.name


@pytest.mark.slow  # shares the three launches
@pytest.mark.multiprocess
def test_a_half_written_conversion_is_never_used_and_a_complete_one_is_reused(resharded, tmp_path):
    """Leftovers of a conversion killed mid-way (a temp dir, a universal/ without marker) are redone."""
    import shutil

    from beit3.engine.checkpoint import CheckpointError, CheckpointManager
    from beit3.engine.reshard import UNIVERSAL_MARKER, convert_to_universal, is_converted

    source = resharded / _name(3, "bf16", "2to1") / "checkpoints" / f"step{STEPS:08d}"
    tag_dir = tmp_path / "checkpoints" / source.name
    shutil.copytree(source, tag_dir, ignore=shutil.ignore_patterns("universal"))
    (tag_dir / ".universal.tmp999").mkdir()
    (tag_dir / ".universal.tmp999" / "zero").mkdir()
    (tag_dir / "universal" / "zero").mkdir(parents=True)  # no marker: damaged (our rename follows it)
    assert not is_converted(tag_dir)

    class OneRankEngine:  # what CheckpointManager.load asks before loading anything
        def zero_optimization_stage(self):
            return 3

        def load_universal_checkpoint(self):
            return True

    with pytest.raises(CheckpointError, match="ZeRO shards of 2 ranks"):
        CheckpointManager(tmp_path, 0, 1).load(OneRankEngine(), tag_dir)
    out = convert_to_universal(tag_dir)
    assert is_converted(tag_dir) and not list(tag_dir.glob(".universal.tmp*"))
    assert not (tag_dir / "latest_universal").exists()  # the converter's pointer is not left behind
    assert sorted(p.name for p in (out / "zero").iterdir() if p.is_dir()) == sorted(
        torch.load(resharded / _name(3, "bf16", "2to1") / "saved.pt")["params"]
    )
    marker = (out / UNIVERSAL_MARKER).stat().st_mtime_ns
    assert convert_to_universal(tag_dir) == out and (out / UNIVERSAL_MARKER).stat().st_mtime_ns == marker


# ----- the pure parts, without ranks -----
def _resolved(stage: int, micro: int, gas: int, world: int) -> dict:
    from beit3.engine.ds_config import load_ds_config

    overrides = {"zero_optimization.stage": stage, "train_batch_size": None,
                 "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas}  # fmt: skip
    return load_ds_config(DS_CONFIGS / "zero3_fp32.json", world, overrides)


def _marker(tmp_path: Path, world: int, ds_config: dict) -> Path:
    tag_dir = tmp_path / "checkpoints" / "step00000010"
    tag_dir.mkdir(parents=True)
    (tag_dir / "complete.json").write_text(
        json.dumps({"step": 10, "world_size": world, "ds_config": ds_config})
    )
    return tag_dir


def test_keep_global_batch_rederives_accumulation_or_names_the_fix():
    from beit3.engine.ds_config import EngineConfigError, keep_global_batch

    on_64 = _resolved(3, 24, 1, 64)  # global 1536
    assert keep_global_batch(on_64, 1536, 32)["gradient_accumulation_steps"] == 2
    assert keep_global_batch(on_64, 1536, 16)["gradient_accumulation_steps"] == 4
    assert on_64["gradient_accumulation_steps"] == 1  # a copy
    with pytest.raises(EngineConfigError) as err:
        keep_global_batch(on_64, 1536, 48)  # 1536 / 24 = 64 micro-batches: 48 ranks cannot share them
    assert "cannot keep the global batch (train_batch_size) 1536" in str(err.value)
    assert "resume on a number of ranks that divides 64" in str(err.value)
    assert "set train_micro_batch_size_per_gpu to a divisor of 32" in str(err.value)


def test_plan_resume_converts_only_zero_shards_of_another_world_size(tmp_path):
    from beit3.engine.ds_config import EngineConfigError
    from beit3.engine.reshard import plan_resume

    saved = _resolved(2, 2, 1, 4)  # global 8 on 4 ranks
    tag_dir = _marker(tmp_path, 4, saved)
    assert plan_resume(None, saved, 4) is None
    same = plan_resume(tag_dir, saved, 4)
    assert not same.universal and same.ds_config == saved and same.init_config == saved
    fewer = plan_resume(tag_dir, _resolved(2, 2, 1, 2), 2)  # the same config on 2 ranks: global 4
    assert fewer.universal and fewer.ds_config["gradient_accumulation_steps"] == 2
    assert fewer.ds_config["train_batch_size"] == 8 and "checkpoint" not in fewer.ds_config
    assert fewer.init_config["checkpoint"] == {"load_universal": True}
    with pytest.raises(EngineConfigError, match="zero_optimization.stage=2"):
        plan_resume(tag_dir, _resolved(3, 2, 1, 2), 2)
    stage0 = _marker(tmp_path / "z0", 4, _resolved(0, 2, 1, 4))
    plan = plan_resume(stage0, _resolved(0, 2, 1, 2), 2)
    assert not plan.universal and plan.ds_config["gradient_accumulation_steps"] == 2


if __name__ == "__main__":
    sys.exit(main())
