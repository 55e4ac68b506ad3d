"""Specification of the engine on 2 ranks (gloo, OMP_NUM_THREADS=1); each launch a subprocess with a timeout.

Few launches, many runs: one torchrun process runs several Trainers in sequence (deepspeed.initialize is
cheap after the first). The toy task records every per-batch loss, so trajectories compare exactly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    DS_CONFIGS,
    ToyMultiwayTask,
    clean_env,
    read_loss_rows,
    read_losses,
    tensorboard_run,
    torchrun,
)

from beit3.engine.checkpoint import latest_checkpoint
from beit3.engine.consolidate import consolidate_checkpoint, verify_against_module

pytestmark = pytest.mark.multiprocess
HELPER = str(Path(__file__).with_name("engine_helpers.py"))
STEPS, SAVE_EVERY, KILL_AT_BATCH = 8, 3, 7  # killed in step 8, after the checkpoint of step 6
FP32_STAGES = {"z1": 1, "z2": 2}
BF16 = {"z3_bf16": "zero3_bf16.json", "z2_bf16": "zero2_bf16.json", "z1_bf16": "zero1_bf16.json"}
# bf16 runs use the fp32 reference's micro-batch so that their trajectories are comparable
SMALL_BATCH = {
    "train_batch_size": None,
    "train_micro_batch_size_per_gpu": json.loads((DS_CONFIGS / "zero0_fp32.json").read_text())[
        "train_micro_batch_size_per_gpu"
    ],
}


def _spec(root: Path, name: str, ds_config: str, steps: int = STEPS, **kw) -> dict:
    return {
        "output_dir": str(root / name),
        "ds_config": ds_config,
        "steps": steps,
        "save_every": SAVE_EVERY,
        **kw,
    }


def _assert_killed(proc: subprocess.CompletedProcess, results: Path, finished: int) -> None:
    """The launch failed after ``finished`` complete runs: its last run died mid-way (torchrun reports either
    rank 0's SIGKILL or rank 1's lost connection first, whichever it polls first)."""
    done = json.loads((results / "results_rank0.json").read_text()) if finished else []
    assert proc.returncode != 0 and len(done) == finished, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Launch 1: uninterrupted runs at every stage, then a stage-0 run killed by SIGKILL.
    Launch 2: resume it, then a stage-3 run killed the same way. Launch 3: resume that."""
    root = tmp_path_factory.mktemp("multirank")
    first = [_spec(root, "z0", "zero0_fp32.json"), _spec(root, "z3", "zero3_fp32.json")]
    first += [_spec(root, n, "zero0_fp32.json", 4, overrides={"zero_optimization.stage": s})
              for n, s in FP32_STAGES.items()]  # fmt: skip
    first += [_spec(root, n, f, 4, overrides=SMALL_BATCH) for n, f in BF16.items()]
    first.append(_spec(root, "z0_kill", "zero0_fp32.json", kill_at_batch=KILL_AT_BATCH))
    _assert_killed(torchrun(first, root / "launch1"), root / "launch1", len(first) - 1)
    second = [
        _spec(root, "z0_kill", "zero0_fp32.json"),
        _spec(root, "z3_kill", "zero3_fp32.json", kill_at_batch=7),
    ]
    _assert_killed(torchrun(second, root / "launch2"), root / "launch2", len(second) - 1)
    done = torchrun([_spec(root, "z3_kill", "zero3_fp32.json")], root / "launch3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.parametrize("rank", [0, 1])
def test_zero3_loss_trajectory_equals_zero0_on_mixed_batches(runs, rank):
    zero0, zero3 = read_losses(runs / "z0" / "losses", rank), read_losses(runs / "z3" / "losses", rank)
    assert sorted(zero0) == sorted(zero3) == list(range(STEPS))
    assert max(abs(zero0[i] - zero3[i]) for i in zero0) <= 1e-6


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.parametrize("name", sorted(FP32_STAGES))
def test_zero1_and_zero2_loss_trajectories_equal_zero0(runs, name):
    for rank in (0, 1):
        zero0, other = read_losses(runs / "z0" / "losses", rank), read_losses(runs / name / "losses", rank)
        assert sorted(other) == [0, 1, 2, 3]
        assert max(abs(zero0[i] - other[i]) for i in other) <= 1e-6


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.parametrize("name", sorted(BF16))
def test_bf16_runs_track_the_fp32_trajectory(runs, name):
    results = json.loads((runs / "launch1" / "results_rank0.json").read_text())
    assert {r["name"]: r["exit_reason"] for r in results}[name] == "finished"
    zero0, bf16 = read_losses(runs / "z0" / "losses", 0), read_losses(runs / name / "losses", 0)
    assert sorted(bf16) == [0, 1, 2, 3] and max(abs(zero0[i] - bf16[i]) for i in bf16) < 0.1


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.parametrize("stage", [0, 3])
def test_run_killed_by_sigkill_resumes_with_identical_losses(runs, stage):
    for rank in (0, 1):
        straight = read_losses(runs / f"z{stage}" / "losses", rank)
        rows = read_loss_rows(runs / f"z{stage}_kill" / "losses", rank)
        assert {i for i, _ in rows} == set(range(STEPS))
        assert [i for i, _ in rows].count(6) == 2  # run before the kill and again after the resume
        assert all(loss == straight[i] for i, loss in rows), "dropout RNG or data state not restored"
    assert latest_checkpoint(runs / f"z{stage}_kill").name == f"step{STEPS:08d}"


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
def test_two_rank_zero3_checkpoint_consolidates_to_the_zero0_weights(runs):
    zero3, zero0 = consolidate_checkpoint(runs / "z3"), consolidate_checkpoint(runs / "z0")
    module = ToyMultiwayTask()
    module.load_state_dict(zero0)
    verify_against_module(zero3, module, atol=1e-6)
    assert latest_checkpoint(runs / "z3").name == f"step{STEPS:08d}"


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
@pytest.mark.parametrize("name", ["z1_bf16", "z2_bf16"])
def test_two_rank_bf16_shards_consolidate_to_masters_that_round_to_the_saved_weights(runs, name):
    """Fragments of both ranks' fp32 partitions reassemble in order: rounded to bf16 they are the module."""
    tag_dir = latest_checkpoint(runs / name)
    masters = consolidate_checkpoint(tag_dir)
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert masters.keys() == module.keys()
    assert all(torch.equal(masters[k].bfloat16(), module[k]) for k in module)
    assert any(not torch.equal(v, v.bfloat16().float()) for v in masters.values())


def test_checkpoint_holds_per_rank_data_and_rng_states(runs):
    tag_dir = latest_checkpoint(runs / "z3")
    states = [torch.load(tag_dir / f"trainer_rank{r:05d}.pt", weights_only=False) for r in (0, 1)]
    assert [s["data"] for s in states] == [{"index": STEPS}] * 2
    assert not torch.equal(states[0]["rng"]["torch"], states[1]["rng"]["torch"])
    assert json.loads((tag_dir / "complete.json").read_text())["world_size"] == 2


@pytest.mark.slow  # shares the 3-launch fixture (about 35 s)
def test_rank0_alone_writes_tensorboard_with_counters_summed_over_ranks(runs):
    events = list((runs / "z0" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = tensorboard_run(runs / "z0")
    # ToyData counts (i + 1) // 3 + rank on each rank; at the last batch (i = 7): 2 + 3.
    assert list(scalars["data/skipped/corrupt"].values())[-1] == 5.0
    zero0 = [read_losses(runs / "z0" / "losses", r) for r in (0, 1)]
    expected = sum(losses[i] for losses in zero0 for i in (6, 7)) / 4
    assert list(scalars["loss/total"].values())[-1] == pytest.approx(expected, rel=1e-6)
    # Reported by rank 1 on odd batches only: averaged over the micro-batches that reported it.
    assert list(scalars["debug/rank1_odd_index"].values()) == [1.0, 3.0, 5.0, 7.0]


def test_sigusr1_on_one_srun_rank_saves_on_all_and_exits_75(tmp_path):
    """Two processes started as a Slurm step starts them (SLURM_PROCID, ...); USR1 reaches rank 1 only."""
    spec = {"output_dir": str(tmp_path / "run"), "ds_config": "zero3_fp32.json", "steps": 100000}
    job = str(50000 + os.getpid() % 10000)
    procs = []
    for rank in (0, 1):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS="2", SLURM_JOB_ID=job,
                         MASTER_ADDR="127.0.0.1")  # fmt: skip
        cmd = [sys.executable, HELPER, "--runs", json.dumps([spec]), "--results", str(tmp_path)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    losses = tmp_path / "run" / "losses_rank1.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not losses.exists() or len(losses.read_text().splitlines()) < 3):
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [75, 75], procs[0].stdout.read()[-3000:]
    results = [json.loads((tmp_path / f"results_rank{r}.json").read_text())[0] for r in (0, 1)]
    assert {r["exit_reason"] for r in results} == {"preempted"} and results[0]["step"] == results[1]["step"]
    assert latest_checkpoint(tmp_path / "run").name == f"step{results[0]['step']:08d}"
