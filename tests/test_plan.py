"""The capacity planner ``beit3-plan`` (beit3.pretrain.plan): its memory model against the bench's measured
figures, its refusal of a setting that does not fit, its byte model on a hand-computed case, and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from beit3.engine.metrics import DEVICE_MEMORY, NVLINK_BANDWIDTH, PEAK_FLOPS
from beit3.model import get_config
from beit3.model.flops import Pass, checkpoint_recompute_flops
from beit3.pretrain import plan as planner
from beit3.pretrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import memory_at_scale  # noqa: E402  (bench/memory_at_scale.py)

RESULTS = ROOT / "bench" / "results" / "memory_at_scale.json"
GIANT = ROOT / "pretrain" / "recipes" / "giant.toml"
ZERO3 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 24}


def test_the_bench_uses_the_planners_memory_model():
    """One memory model: the bench imports it (no second copy)."""
    assert memory_at_scale.model_state_bytes is planner.model_state_bytes
    assert memory_at_scale.activation_bytes is planner.activation_bytes
    assert memory_at_scale.MARGIN == planner.MARGIN


def test_memory_table_is_at_the_giant_recipes_text_lengths():
    result = json.loads(RESULTS.read_text())
    data = load_recipe(GIANT).data
    assert (result["text_len"], result["pair_text_len"]) == (data.text_max_len, data.pair_text_max_len)
    assert result["batch"] == {"images": 8, "texts": 8, "pairs": 8}


@pytest.mark.parametrize("ckpt", ["none", "all", "attention", "ffn"])
def test_memory_estimate_agrees_with_bench_memory_at_scale(ckpt):
    """The planner's per-GPU memory for the bench's setting (giant, ZeRO-3 bf16, 256 GPUs, 8+8+8 at the
    recipe's lengths): model states equal, activations and total within 2% of the measured figures; for
    every layer checkpointed whole, or its attention or FFN branch only."""
    result = json.loads(RESULTS.read_text())
    part = ckpt if ckpt in ("attention", "ffn") else None
    p = planner.plan(
        GIANT,
        gpus=result["gpus"],
        ds_config=ROOT / result["ds_config"],
        checkpointing="all" if part else ckpt,
        checkpointing_part=part,
        overrides=[
            f"data.text_max_len={result['text_len']}",
            f"data.pair_text_max_len={result['pair_text_len']}",
        ],
    )
    bench = result["configs"][ckpt]
    assert sum(p.states.values()) / planner.GIB == pytest.approx(bench["model_states_gib"], rel=1e-9)
    assert p.activations / planner.GIB == pytest.approx(bench["activation_gib"], rel=0.02)
    assert p.memory / planner.GIB == pytest.approx(bench["total_gib"], rel=0.02)
    assert p.fits == bench["fits"]


def test_activation_model_agrees_with_the_measured_parts():
    """Per layer, per checkpointed layer and outside the layers, the bench's measured bytes and the per-token
    model agree (same synthetic batch, so the same masked counts)."""
    measured = json.loads(RESULTS.read_text())["activation_model"]["measured"]
    cfg = get_config("beit3_giant_patch14_224")
    result = json.loads(RESULTS.read_text())
    modelled = memory_at_scale.modelled_activations(
        cfg, (8, 8, 8), result["text_len"], result["pair_text_len"]
    )
    for part in ("base", "layer", "checkpointed_layer", "attention", "ffn"):
        assert getattr(modelled, part) == pytest.approx(measured[part], rel=0.02), part


@pytest.mark.slow  # 10-30 s on 2 shared cores: four forwards of two small presets
@pytest.mark.parametrize(
    "name, batch, text_len, pair_len",
    [("beit3_tiny_paper_patch16_64", (2, 2, 2), 16, 8), ("beit3_tiny_patch16_64", (2, 3, 1), 32, 16)],
)
def test_activation_model_agrees_with_a_fresh_measurement(name, batch, text_len, pair_len):
    """Other widths, both layouts, another mix: the model tracks what autograd saves in today's code."""
    measured = memory_at_scale.measured_activations("cpu", batch, text_len, pair_len, name)
    modelled = memory_at_scale.modelled_activations(get_config(name), batch, text_len, pair_len)
    for part in ("base", "layer", "checkpointed_layer", "attention", "ffn"):
        assert getattr(modelled, part) == pytest.approx(getattr(measured, part), rel=0.02), part


def test_activation_bytes_adds_one_recomputed_layer_when_checkpointing():
    act = planner.ActivationModel(base=100.0, layer=10.0, checkpointed_layer=1.0)
    assert planner.activation_bytes(act, 4, 0) == 140.0
    assert planner.activation_bytes(act, 4, 4) == 100.0 + 4 * 1.0 + 10.0
    assert planner.activation_bytes(act, 4, 2) == 100.0 + 2 * 10.0 + 2 * 1.0 + 10.0


def test_activation_bytes_of_recomputed_branches():
    """A layer recomputing one branch keeps its input and the other branch's bytes; the backward holds one
    recomputed branch at a time."""
    act = planner.ActivationModel(base=100.0, layer=10.0, checkpointed_layer=1.0, attention=4.0, ffn=6.0)
    assert planner.activation_bytes(act, 4, 4, "attention") == 100.0 + 4 * (1.0 + 6.0) + 4.0
    assert planner.activation_bytes(act, 4, 4, "ffn") == 100.0 + 4 * (1.0 + 4.0) + 6.0
    assert planner.activation_bytes(act, 4, 2, "ffn") == 100.0 + 2 * 10.0 + 2 * (1.0 + 4.0) + 6.0
    assert planner.activation_bytes(act, 4, 0, "ffn") == planner.activation_bytes(act, 4, 0) == 140.0
    assert planner.activation_bytes(act, 4, 4, "layer") == planner.activation_bytes(act, 4, 4)


def test_the_rows_a_head_sees_are_the_objectives_fixed_size_gathers():
    """K per sequence: the count rounded up to 8, at most the sequence length (masked_positions)."""
    from beit3.pretrain.objective import masked_positions

    select = torch.zeros(3, 20, dtype=torch.bool)
    select[:, :9] = True
    assert masked_positions(select)[0].numel() == planner.gathered_rows(3, 9, 20) == 3 * 16
    assert planner.gathered_rows(3, 19.2, 20) == 3 * 20
    assert planner.gathered_rows(0, 9, 20) == planner.gathered_rows(3, 0, 20) == 0


def test_model_states_per_stage_by_hand():
    """1e9 parameters on 10 GPUs, bf16 with fp32 gradient accumulation: 2 + 4 + 12 bytes per parameter,
    partitioned from stage 1 (optimizer), 2 (gradients), 3 (weights); buckets at the JSON's sizes."""
    n = 10**9
    base = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    z = {"reduce_bucket_size": 1e6, "allgather_bucket_size": 1e6}
    s0 = planner.model_state_bytes(n, 10, {**base, "zero_optimization": {"stage": 0, **z}})
    assert sum(s0.values()) == 18 * n + 4e6
    s1 = planner.model_state_bytes(n, 10, {**base, "zero_optimization": {"stage": 1, **z}})
    assert sum(s1.values()) == 2 * n + 4 * n + 1.2 * n + 2e6 + 4e6
    s2 = planner.model_state_bytes(n, 10, {**base, "zero_optimization": {"stage": 2, **z}})
    assert sum(s2.values()) == 2 * n + 0.4 * n + 1.2 * n + 2e6 + 4e6
    z3 = {"stage": 3, "reduce_bucket_size": 1e6, "stage3_max_live_parameters": 1e8}
    z3 |= {"stage3_prefetch_bucket_size": 1e7, "zero_hpz_partition_size": 8}
    s3 = planner.model_state_bytes(n, 10, {**base, "zero_optimization": z3})
    assert sum(s3.values()) == pytest.approx(1.8 * n + 2e8 + 2e7 + 4e6 + 2 * n / 8)
    # 3e8 persistent parameters: a whole bf16 copy on every GPU; the gathered working set excludes them
    s3p = planner.model_state_bytes(
        n, 10, {**base, "zero_optimization": {**z3, "stage3_max_live_parameters": 1e9}}, 3 * 10**8
    )
    assert (
        s3p["persistent parameters (bf16, whole)"] == 6e8
        and s3p["gathered parameters (max live, bf16)"] == 1.4e9
    )


def test_persistent_parameters_are_the_tensors_under_the_threshold():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(100, 100))  # 100+10, 10000+100
    z = {"stage": 3, "stage3_param_persistence_threshold": 1000}
    assert planner.persistent_parameters(model, {"zero_optimization": z}) == 100 + 10 + 100
    assert (
        planner.persistent_parameters(model, {"zero_optimization": {**z, "model_persistence_threshold": 150}})
        == 110
    )
    assert planner.persistent_parameters(model, {"zero_optimization": {**z, "stage": 2}}) == 0


def test_byte_model_by_hand():
    """1e9 bf16 parameters (2 GB), 16 GPUs in 2 nodes of 8, 400 Gb/s (50 GB/s) per node, NVLink 300 GB/s.

    A ring collective moves 15/16 of 2 GB = 1.875 GB through each GPU and each node's interfaces.
    ZeRO-3, one pass: forward gather + backward gather + reduce-scatter = 3 x 1.875 GB at 50 GB/s = 0.1125 s.
    With hpZ 8 the backward gather stays in the node: 7/8 of 2 GB = 1.75 GB over NVLink = 5.83 ms.
    """
    n, node, nvlink = 10**9, 400e9 / 8, 300e9
    c3 = planner.collectives(n, ZERO3, 16)
    assert [(c.count, c.group, c.per_gpu()) for c in c3] == [(1, 16, 1.875e9)] * 3
    times = [planner.collective_seconds(c, 8, node, nvlink) for c in c3]
    assert sum(times) == pytest.approx(0.1125)

    hpz = {**ZERO3, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}
    fwd, bwd, rs = planner.collectives(n, hpz, 16)
    assert bwd.group == 8 and bwd.per_gpu() == 1.75e9 and not planner.crosses_nodes(bwd, 8)
    assert planner.collective_seconds(bwd, 8, node, nvlink) == pytest.approx(1.75e9 / 300e9)
    assert planner.crosses_nodes(fwd, 8) and planner.crosses_nodes(rs, 8)

    three = planner.collectives(n, ZERO3, 16, passes=3, micro_batches=2)
    assert [c.count for c in three] == [6, 6, 2]
    measured = planner.collectives(n, ZERO3, 16, micro_batches=2, gathered_x=1.5)  # 1.5x per micro-batch
    assert [c.count for c in measured] == [1.5, 1.5, 2]
    # ZeRO-1/2 all-reduce their gradients (DeepSpeed 0.19.8, bench/results/zero_comm.md): 2 x 1.875 GB per
    # reduction, per micro-batch in stage 2, once per step in stage 1; then the updated weights are gathered.
    z2 = {**ZERO3, "zero_optimization": {"stage": 2}}
    assert [(c.count, c.per_gpu()) for c in planner.collectives(n, z2, 16, micro_batches=2)] == [
        (2, 7.5e9),
        (1, 1.875e9),
    ]
    z1 = {**ZERO3, "zero_optimization": {"stage": 1}}
    assert [(c.count, c.per_gpu()) for c in planner.collectives(n, z1, 16, micro_batches=2)] == [
        (1, 3.75e9),
        (1, 1.875e9),
    ]
    z0 = {**ZERO3, "zero_optimization": {"stage": 0}}
    (allreduce,) = planner.collectives(n, z0, 16)
    assert allreduce.per_gpu() == 2 * 1.875e9
    fwd, bwd, rs = planner.collectives(n, ZERO3, 16, persistent=2 * 10**8)  # 0.2e9 never gathered
    assert (fwd.per_gpu(), bwd.per_gpu(), rs.per_gpu()) == (1.5e9, 1.5e9, 1.875e9)
    one_node = planner.collectives(n, ZERO3, 8)[0]  # 7/8 of 2 GB over NVLink only
    assert planner.collective_seconds(one_node, 8, node, nvlink) == pytest.approx(1.75e9 / 300e9)


def test_step_time_is_compute_plus_the_communication_overlap_does_not_hide():
    p = planner.plan(GIANT, checkpointing="none", mfu=0.45, overlap=0.5)
    assert p.compute_s == pytest.approx(p.model_work / (0.45 * PEAK_FLOPS["A100"]))
    assert p.exposed_comm_s == pytest.approx(max(0.0, p.comm_s - 0.5 * p.compute_s))
    assert p.step_s == pytest.approx(p.compute_s + p.exposed_comm_s)
    assert p.days == pytest.approx(p.step_s * 1_000_000 / 86400)
    assert round(p.model_work / 1e12, 1) == 35.6  # docs/performance.md: 35.57 TFLOP per GPU and step
    ckpt = planner.plan(GIANT, checkpointing="all", mfu=0.45, overlap=0.5)
    # The layers' forward (what torch recomputes: checkpoint_recompute_flops), under a third of the model
    # FLOPs: the heads and the patch projection are not recomputed, nor the first layer's last fc2 matmul
    # (it has no stochastic depth, so early stopping skips it).
    cfg = get_config("beit3_giant_patch14_224")
    passes = [Pass(8, image=True), Pass(8, text_len=128), Pass(8, image=True, text_len=64)]
    assert ckpt.recompute_work == checkpoint_recompute_flops(cfg, passes, range(40), "layer", True)
    assert 0.3 * ckpt.model_work < ckpt.recompute_work < ckpt.model_work / 3
    assert ckpt.compute_s == pytest.approx(
        (ckpt.model_work + ckpt.recompute_work) / (0.45 * PEAK_FLOPS["A100"])
    )


def test_a_recomputed_branch_costs_its_forward_and_saves_part_of_the_memory():
    """Attention-only and FFN-only checkpointing of every giant layer: recompute and memory between none
    and whole layers, each recomputing what checkpoint_recompute_flops says."""
    cfg = get_config("beit3_giant_patch14_224")
    passes = [Pass(8, image=True), Pass(8, text_len=128), Pass(8, image=True, text_len=64)]
    plans = {
        "none": planner.plan(GIANT, checkpointing="none"),
        "layer": planner.plan(GIANT, checkpointing="all"),
    }
    for part in ("attention", "ffn"):
        p = plans[part] = planner.plan(GIANT, checkpointing="all", checkpointing_part=part)
        assert p.recompute_work == checkpoint_recompute_flops(cfg, passes, range(40), part, True)
        assert p.checkpoint_part == part and p.model_work == plans["none"].model_work
    work = {k: p.recompute_work for k, p in plans.items()}
    memory = {k: p.activations for k, p in plans.items()}
    assert work["none"] == 0 < min(work["attention"], work["ffn"])
    assert max(work["attention"], work["ffn"]) < work["layer"]
    assert memory["none"] > max(memory["attention"], memory["ffn"])
    assert min(memory["attention"], memory["ffn"]) > memory["layer"]


def test_every_planned_gpu_has_a_peak_and_an_nvlink_bandwidth():
    for gpu in DEVICE_MEMORY:
        assert planner.gpu_family(gpu) in PEAK_FLOPS and planner.gpu_family(gpu) in NVLINK_BANDWIDTH


def test_cli_end_to_end(capsys):
    """The acceptance setting: giant, 256 A100 40 GB, 400 Gb/s per node, the default ZeRO config, 45% MFU."""
    rc = planner.main(["--gpu", "A100-40GB", "--gpus", "256", "--gbps", "400", "--mfu", "0.45", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["steps"] == 1_000_000 and out["gpus"] == 256
    assert out["ds_config"] == str(Path(planner._shown(planner.DEFAULT_DS_CONFIG)))
    assert out["days"] == pytest.approx(out["step_s"] * 1_000_000 / 86400)
    assert planner.main(["--checkpointing", "none", "--passes", "3"]) == 0
    text = capsys.readouterr().out
    assert "wall clock for 1,000,000 steps" in text and "x3" in text and "fits" in text
    assert planner.main(["--gathered-x", "1.2"]) == 0
    assert "all-gather, forward x0.6" in capsys.readouterr().out
    assert planner.main(["--checkpointing", "all", "--checkpointing-part", "ffn"]) == 0
    assert "activation checkpointing all (ffn only)" in capsys.readouterr().out
    assert planner.main(["--checkpointing-part", "mlp"]) == 2
    assert "grad_checkpointing_part='mlp': use one of 'layer', 'attention', 'ffn'" in capsys.readouterr().err


def test_refuses_a_setting_that_does_not_fit(tmp_path, capsys):
    """96 samples per GPU without checkpointing do not fit 40 GB: exit 2, one line naming the fix."""
    ds = tmp_path / "z3_96.json"
    ds.write_text(json.dumps({**ZERO3, "train_micro_batch_size_per_gpu": 96}))
    rc = planner.main(["--gpus", "64", "--ds-config", str(ds), "--checkpointing", "none"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("beit3-plan: error: ") and "does not fit the A100-40GB's 40 GiB" in err
    assert "use --checkpointing all" in err
    assert planner.main(["--gpus", "64", "--ds-config", str(ds), "--checkpointing", "all"]) == 0
    assert planner.main(["--gpus", "64", "--micro-batch", "96", "--checkpointing", "none"]) == 2
    assert "use --checkpointing all" in capsys.readouterr().err
    assert (
        planner.main(["--gpus", "64", "--micro-batch", "96", "--gpu", "H100-80GB", "--checkpointing", "none"])
        == 0
    )


def test_refuses_a_batch_that_does_not_divide(capsys):
    assert planner.main(["--gpus", "100", "--gpus-per-node", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("beit3-plan: error: train_batch_size 6144 is not divisible") and "100" in err


def test_the_docs_planner_table_is_what_the_planner_says_now():
    """docs/performance.md's table for the giant is bench/plan_table.py's output for the current code and
    configs (rerun the script when the model, the planner or a shipped config changes)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import plan_table

    table = plan_table.format_table(plan_table.run())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text()
    assert table in docs
