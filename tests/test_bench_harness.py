"""bench/train_step.py runs on CPU and reports consistent quantities (a harness check, not a timing test)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import train_step as bench  # noqa: E402


def test_bench_writes_a_row_per_checkpointing_setting(tmp_path):
    code = bench.main(["--model", "beit3_tiny_paper_patch16_64", "--images", "2", "--texts", "2",
                       "--pairs", "2", "--text-len", "16", "--pair-text-len", "8", "--precision", "fp32",
                       "--steps", "2", "--warmup", "1", "--grad-ckpt", "none", "all", "--device", "cpu",
                       "--name", "smoke", "--results-dir", str(tmp_path)])  # fmt: skip
    assert code == 0
    rows = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["grad_ckpt"] for r in rows] == ["none", "all"]
    for r in rows:
        assert r["step_time_s"] > 0 and r["mfu_pct"] is None  # no MFU without a known peak (CPU)
        assert abs(r["tokens_per_s"] / r["samples_per_s"] - (17 + 16 + 25) / 3) < 1e-6
        # the step = its forward+backward (timed inside it) + the optimizer step
        assert 0 < r["fwd_bwd_time_s"] <= r["step_time_s"] and r["optimizer_time_s"] >= 0
    # checkpointing keeps only each layer's input for backward
    assert rows[1]["activation_gib_per_sample"] < rows[0]["activation_gib_per_sample"]
    assert "| beit3_tiny_paper_patch16_64 |" in (tmp_path / "smoke.md").read_text()


def test_mfu_and_hfu_follow_the_peak_override(tmp_path):
    bench.main(["--images", "1", "--texts", "1", "--pairs", "1", "--text-len", "8", "--pair-text-len", "8",
                "--steps", "1", "--warmup", "0", "--device", "cpu", "--peak-flops", "1e12",
                "--grad-ckpt", "all", "--name", "peak", "--results-dir", str(tmp_path)])  # fmt: skip
    (row,) = json.loads((tmp_path / "peak.json").read_text())
    assert abs(row["mfu_pct"] - 100 * row["achieved_tflops"] / 1.0) < 1e-6
    # HFU adds what checkpointing recomputes (the objective's batch_stats): the layers' forward, under a
    # third of the step (the heads, most of this tiny model's FLOPs, and the patch projection are not)
    recompute = row["recompute_tflops_per_step"] / row["model_tflops_per_step"]
    assert abs(row["hfu_pct"] / row["mfu_pct"] - (1 + recompute)) < 1e-6
    assert 0 < recompute < 1 / 3


def test_compiled_layers_and_the_forward_backward_mfu(tmp_path):
    """--compile compiles every layer as training does (BEiT3Model.compile_layers); the forward+backward MFU
    leaves the optimizer step out."""
    bench.main(["--model", "beit3_tiny_paper_patch16_64", "--images", "1", "--texts", "1", "--pairs", "1",
                "--text-len", "8", "--pair-text-len", "8", "--steps", "1", "--warmup", "1", "--device", "cpu",
                "--peak-flops", "1e12", "--compile", "--compile-backend", "aot_eager", "--name", "compiled",
                "--results-dir", str(tmp_path)])  # fmt: skip
    (row,) = json.loads((tmp_path / "compiled.json").read_text())
    assert row["compile"] is True
    fb = row["model_tflops_per_step"] / row["fwd_bwd_time_s"] / 1.0
    assert abs(row["fwd_bwd_mfu_pct"] - 100 * fb) < 1e-6 and row["fwd_bwd_mfu_pct"] >= row["mfu_pct"]


def test_the_step_benchmark_imports_with_torch_alone():
    """bench/train_step.py runs on a GPU machine that has torch and nothing else of ours."""
    import subprocess

    folder = str(Path(bench.__file__).resolve().parent)
    missing = ("sentencepiece", "deepspeed", "webdataset", "tensorboard")
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in missing)
    code = f"import sys; {blocked}; sys.path.insert(0, {folder!r}); import train_step"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
