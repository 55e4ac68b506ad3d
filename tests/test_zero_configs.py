"""Every shipped ZeRO config trains the toy Multiway task on the ZeRO-0 trajectory (gloo ranks, fp32).

The configs' own ZeRO settings run as shipped (stage, buckets, persistence threshold, prefetch, hierarchical
partitioning); only the precision is set to fp32 (the trajectories then agree to 1e-6) and the batch to the
ZeRO-0 reference's. Hierarchical partitioning (``zero_hpz_partition_size``) runs on 4 ranks as 2 nodes of 2,
once as shipped and once with no parameter persistent (the toy's parameters are all under the shipped
persistence threshold, so only then does every gather go through the secondary, intra-node partition).
"""

import json

import pytest
from engine_helpers import DS_CONFIGS, read_losses, torchrun

pytestmark = pytest.mark.multiprocess
STEPS = 4
SHIPPED = sorted(p.name for p in DS_CONFIGS.glob("zero*.json"))
HPZ = [n for n in SHIPPED if json.loads((DS_CONFIGS / n).read_text())["zero_optimization"].get(
    "zero_hpz_partition_size", 1) > 1]  # fmt: skip
FP32 = {
    "bf16": None,
    "fp16": None,
    "data_types": None,
    "train_batch_size": None,
    "gradient_accumulation_steps": 1,
    "train_micro_batch_size_per_gpu": json.loads((DS_CONFIGS / "zero0_fp32.json").read_text())[
        "train_micro_batch_size_per_gpu"
    ],
}


def _launch(root, nproc: int, names: list[str], extra: dict, variants: dict | None = None) -> None:
    specs = [
        {"output_dir": str(root / "ref"), "ds_config": "zero0_fp32.json", "steps": STEPS, "save_every": 0}
    ]
    specs += [{"output_dir": str(root / n), "ds_config": n, "steps": STEPS, "save_every": 0,
               "overrides": {**FP32, **extra}} for n in names]  # fmt: skip
    for suffix, more in (variants or {}).items():
        specs += [{"output_dir": str(root / f"{n}{suffix}"), "ds_config": n, "steps": STEPS, "save_every": 0,
                   "overrides": {**FP32, **extra, **more}} for n in names]  # fmt: skip
    done = torchrun(specs, root / "results", nproc=nproc, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_configs2")
    _launch(root, 2, SHIPPED, {})
    return root


@pytest.fixture(scope="module")
def two_nodes_of_two(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero_configs4")
    _launch(root, 4, HPZ, {"zero_optimization.zero_hpz_partition_size": 2},
            {"_partitioned": {"zero_optimization.stage3_param_persistence_threshold": 0}})  # fmt: skip
    return root


def _assert_same_trajectory(root, name: str, ranks: int) -> None:
    for rank in range(ranks):
        ref, other = read_losses(root / "ref" / "losses", rank), read_losses(root / name / "losses", rank)
        assert sorted(ref) == sorted(other) == list(range(STEPS))
        assert max(abs(ref[i] - other[i]) for i in ref) <= 1e-6, (name, rank)


@pytest.mark.slow  # one 2-rank launch of every shipped ZeRO config (about 40 s)
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_zero_config_follows_the_zero0_trajectory(two_ranks, name):
    _assert_same_trajectory(two_ranks, name, 2)


@pytest.mark.slow  # one 4-rank launch (about 30 s)
@pytest.mark.parametrize("variant", ["", "_partitioned"])
@pytest.mark.parametrize("name", HPZ)
def test_hierarchical_partitioning_follows_the_zero0_trajectory_on_two_nodes(two_nodes_of_two, name, variant):
    _assert_same_trajectory(two_nodes_of_two, f"{name}{variant}", 4)


def test_the_giant_has_a_hierarchical_config_with_a_gpu_node_per_group():
    assert "zero3_bf16_hpz.json" in HPZ
    zero = json.loads((DS_CONFIGS / "zero3_bf16_hpz.json").read_text())["zero_optimization"]
    assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 8
