"""bench/zero_comm.py counts what DeepSpeed communicates per optimizer step (2 gloo ranks, a tiny preset)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import zero_comm  # noqa: E402

pytestmark = pytest.mark.multiprocess


@pytest.mark.slow  # one 2-rank launch, two configs (about 40 s)
def test_zero3_gathers_every_parameter_and_zero0_gathers_none(tmp_path):
    code = zero_comm.main(["--model", "beit3_tiny_paper_patch16_64", "--depth", "2", "--img-size", "64",
                           "--configs", "zero0_fp32.json", "zero3_fp32.json", "--steps", "2",
                           "--reuse", "none", "--results-dir", str(tmp_path), "--name", "smoke"])  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "smoke.json").read_text())
    rows = {r["ds_config"]: r for r in result["rows"]}
    z0, z3 = rows["zero0_fp32.json"], rows["zero3_fp32.json"]
    # ZeRO-0: one gradient all-reduce of every parameter, nothing gathered
    assert z0["gathered_x"] == 0 and z0["gather_calls"] == 0
    assert z0["reduced_x"] == pytest.approx(1.0, abs=1e-3) and z0["wire_x"] == pytest.approx(2.0, abs=2e-3)
    # ZeRO-3 releasing after every use: every parameter gathered in the forward and again in the backward
    # (the persistent ones once), every gradient reduce-scattered once
    assert z3["gathered_x"] >= 1.0 - 1e-6 and z3["gather_calls"] >= 1
    assert set(z3["param_gathers"].values()) <= {1.0, 2.0} and 2.0 in z3["param_gathers"].values()
    assert z3["ops"]["reduce_scatter_tensor"]["bytes"] == pytest.approx(z3["param_bytes"], rel=1e-3)
    assert z3["giant"]["gathered_x_params"] >= 1.0 - 1e-6
    for row in (z0, z3):
        assert row["steps_measured"] == 2 and row["ranks"] == 2 and row["dtype"] == "float32"
        assert row["other_ranks_gathered_x"] == [pytest.approx(row["gathered_x"])]
        # DeepSpeed's comms logger saw the same calls; an all-gather's message is the local shard
        for op, counted in row["ops"].items():
            calls, msg_bytes = row["comms_logger"][op]
            assert calls == counted["calls"], op
            world = 2 if op.startswith("all_gather") else 1
            assert msg_bytes * world == pytest.approx(counted["bytes"], rel=1e-6), op
    md = (tmp_path / "smoke.md").read_text()
    assert "| zero3_fp32.json | 2 | float32 |" in md and "Command: `python bench/zero_comm.py" in md
    assert result["versions"]["deepspeed"] and "gloo" in result["device"]
