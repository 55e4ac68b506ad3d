"""bench/gpu_giant.py, the prepared GPU measurement, end to end on CPU with a tiny preset.

It runs as on the GPU machine: the project not installed (the editable finder removed, so the script maps the
repository's folders itself) and DeepSpeed, webdataset, SentencePiece, TensorBoard and Pillow unimportable.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_giant.py"
BLOCKED = ("deepspeed", "webdataset", "sentencepiece", "tensorboard", "PIL")
# Runs the script with BLOCKED unimportable and without the editable install of beit3.
RUNNER = """
import runpy, sys
for name in {blocked!r}:
    sys.modules[name] = None
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.path_hooks[:] = [h for h in sys.path_hooks if "Editable" not in repr(h)]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.path_importer_cache.clear()
sys.argv = ["bench/gpu_giant.py", *{argv!r}]
try:
    runpy.run_path({script!r}, run_name={run_name!r})
    code = 0
except SystemExit as e:
    code = e.code
print("BEIT3_PATH", list(sys.modules["beit3"].__path__))
print("LOADED_BLOCKED", sorted(n for n in {blocked!r} if sys.modules.get(n) is not None))
sys.exit(code)
"""


def _run(argv: list[str], blocked=BLOCKED, run_name="__main__", timeout=600) -> subprocess.CompletedProcess:
    code = RUNNER.format(blocked=tuple(blocked), argv=argv, script=str(SCRIPT), run_name=run_name)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _module():
    spec = importlib.util.spec_from_file_location("gpu_giant", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.slow
def test_cpu_run_end_to_end_without_the_install_or_the_blocked_modules(tmp_path):
    # One checkpointing setting (the attention branch of every layer: the recompute path) in both modes,
    # eager and compiled (each compiled setting costs about a minute of CPU inductor compilation in a fresh
    # CI); the default list of four is checked by test_budget_guard_skips_with_a_note.
    argv = ["--preset", "beit3_tiny_patch16_64", "--device", "cpu", "--steps", "2", "--out", str(tmp_path),
            "--grad-ckpt", "all:attention"]  # fmt: skip
    proc = _run(argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"BEIT3_PATH {[str(ROOT)]}" in proc.stdout  # mapped by the script, not the editable install
    assert "LOADED_BLOCKED []" in proc.stdout

    record = json.loads((tmp_path / "gpu_giant.json").read_text())
    text = (tmp_path / "gpu_giant.md").read_text()
    assert record["command"].startswith("python bench/gpu_giant.py --preset beit3_tiny_patch16_64")
    for key in ("device", "torch", "cuda", "python"):
        assert key in record["environment"]
    assert record["peak_tflops"] is None and "no PEAK_FLOPS entry" in record["peak_source"]
    b = record["batch"]
    assert (b["images"], b["texts"], b["pairs"]) == (8, 8, 8)  # 24 per GPU, split 1:1:1 as the recipe
    assert b["masked_patches"] > 0 and b["masked_text"] > 0 and b["model_tflop"] > 0
    assert record["model"]["drop_path_rate"] == pytest.approx(0.1)  # the recipe's stochastic depth
    assert record["optimizer"]["bf16-master"].startswith("bf16 weights")

    configs = {(c["compile"], c["grad_ckpt"]): c for c in record["configs"]}
    specs = ("all:attention",)
    assert list(configs) == [(compiled, spec) for compiled in (False, True) for spec in specs]
    mod = _module()
    for (compiled, spec), c in configs.items():
        assert c["status"] == "ok", c["notes"]
        assert c["timed_steps"] == 2
        layers, part = mod.checkpoint_setting(spec, 2)
        assert c["checkpointed_layers"] == len(layers or []) and c["checkpoint_part"] == part
        assert (c["recompute_flops"] > 0) == (layers is not None)  # the objective's own figure
        for key in (
            "step_s",
            "fwd_bwd_s",
            "optimizer_s",
            "first_step_s",
            "achieved_fwd_bwd_tflops",
            "samples_per_s",
            "tokens_per_s",
            "last_loss",
        ):
            assert _finite(c[key]) and c[key] > 0, (key, c[key])
        steps = [a + o for a, o in zip(c["fwd_bwd_times_s"], c["optimizer_times_s"])]
        assert c["step_s"] == pytest.approx(statistics.median(steps))
        assert c["fwd_bwd_mfu_pct"] is None  # no peak for a CPU
        if compiled:
            assert _finite(c["compile_s"]) and c["compile_s"] >= 0
            assert 1 <= c["graphs"] < record["compile"]["recompile_limit"]  # layers share graphs
            assert c["graph_breaks"] == 0
        assert c["label"] in text or c["precision"] in text
    for compiled in (False, True):  # the first configuration of each mode is profiled
        ops = configs[(compiled, specs[0])]["sdpa_observed"]["ops"]
        for sub in ("image", "text", "pair"):
            assert ops[sub]["forward"], (compiled, sub, ops)
    probe = record["sdpa_probe"]
    assert {p["sub_batch"] for p in probe} == {"image", "text", "pair"}
    assert all(p["runs_alone"]["MATH"] == "yes" for p in probe)
    assert "| precision | compiled | checkpointing |" in text and "Device: **" in text


def test_budget_guard_skips_with_a_note(tmp_path):
    argv = ["--preset", "beit3_tiny_patch16_64", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]
    proc = _run(argv + ["--name", "spent"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "spent.json").read_text())
    assert record["configs"] and all(c["status"] == "skipped" for c in record["configs"])
    # By default: no checkpointing, the recipe's, every layer's attention branch, every layer; both modes.
    specs = dict.fromkeys(["none", record["settings"]["grad_checkpointing"], "all:attention", "all"])
    configs = [(c["compile"], c["grad_ckpt"]) for c in record["configs"]]
    assert configs == [(compiled, spec) for compiled in (False, True) for spec in specs]
    assert all(c["notes"][0].startswith("skipped: ") for c in record["configs"])
    assert "skipped: " in (tmp_path / "spent.md").read_text()


def test_imports_need_torch_alone():
    """Importing the script loads nothing of the blocked modules, nor numpy."""
    proc = _run([], blocked=(*BLOCKED, "numpy"), run_name="gpu_giant", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED_BLOCKED []" in proc.stdout


def test_checkpointing_grammar_matches_the_recipe_reader():
    from beit3.pretrain.recipe import grad_checkpoint_layers

    mod = _module()
    settings = mod.read_settings()
    assert mod.checkpoint_setting(settings["grad_checkpointing"], 40)  # the recipe's reads
    for spec in ("none", "all", "every:1", "every:3", "every:40"):
        assert mod.checkpoint_layers(spec, 40) == grad_checkpoint_layers(spec, 40), spec
        for part in ("attention", "ffn"):  # the recipe's grad_checkpointing_part, as a suffix
            assert mod.checkpoint_setting(f"{spec}:{part}", 40) == (grad_checkpoint_layers(spec, 40), part)
        assert mod.checkpoint_setting(spec, 40) == (grad_checkpoint_layers(spec, 40), "layer")
    with pytest.raises(ValueError):
        mod.checkpoint_layers("every:0", 40)
    with pytest.raises(ValueError):
        mod.checkpoint_setting("all:mlp", 40)
    # the recipe's [model] grad_checkpointing with its grad_checkpointing_part, in the script's names
    named = mod._recipe_checkpointing
    assert named({"grad_checkpointing": "every:2", "grad_checkpointing_part": "ffn"}) == "every:2:ffn"
    assert named({"grad_checkpointing": "all", "grad_checkpointing_part": "layer"}) == "all"
    assert named({"grad_checkpointing": "none", "grad_checkpointing_part": "ffn"}) == "none"
    assert named({}) == "none"


def test_settings_and_constants_are_the_projects():
    from beit3.pretrain.data.config import PretrainDataConfig
    from beit3.tokenizers.text import BOS_ID, EOS_ID, FIRST_ORDINARY_ID

    mod = _module()
    assert (mod.BOS_ID, mod.EOS_ID, mod.FIRST_ORDINARY_ID) == (BOS_ID, EOS_ID, FIRST_ORDINARY_ID)
    assert mod.MASK_ID_64K == 64000 + 1  # len(spm) + 1 for a 64,000-piece model (tokenizers.text)
    default = PretrainDataConfig.__dataclass_fields__["pair_image_mask_prob"].default
    assert default == mod.PAIR_IMAGE_MASK_PROB
    s = mod.read_settings()
    assert s["preset"] == "beit3_giant_patch14_224"
    assert s["batch"] == {"images": 8, "texts": 8, "pairs": 8}
    assert (s["text_len"], s["pair_text_len"]) == (128, 64)
    assert s["gradient_clipping"] == 3.0


def test_giant_batch_has_the_recipes_masking():
    from beit3.model import get_config
    from beit3.tokenizers.masking import num_masking_patches

    mod = _module()
    s = mod.read_settings()
    cfg = get_config(s["preset"])
    batch = mod.synthetic_batch(cfg, s, 8, 8, 8, 128, 64)
    per_image = num_masking_patches((cfg.grid_size, cfg.grid_size), s["image_mask_ratio"])
    assert batch["image"]["image_mask"].sum(1).tolist() == [per_image] * 8
    pair_masked = batch["pair"]["image_mask"].any(1)
    assert int(pair_masked.sum()) == 4  # separate masking: half the pairs mask the image, half the text
    assert (batch["pair"]["text_labels"].ne(-100).any(1) == ~pair_masked).all()
    assert batch["text"]["text_labels"].ne(-100).sum(1).tolist() == [round(0.15 * 126)] * 8
    assert batch["image"]["image"].abs().max() <= 1 and batch["image"]["image"].std() > 0.3  # not zeros
    text = batch["text"]["text"]
    assert int(text.max()) < cfg.vocab_size and (text[:, 0] == 0).all() and (text[:, -1] == 2).all()


def test_figures():
    mod = _module()
    f = mod.figures(1e12, [0.5, 0.4, 0.6], [0.1, 0.1, 0.2], peak=1e13, recompute=0.25e12)
    assert f["fwd_bwd_s"] == 0.5 and f["optimizer_s"] == 0.1 and f["step_s"] == pytest.approx(0.6)
    assert f["fwd_bwd_mfu_pct"] == pytest.approx(20.0)
    assert f["step_mfu_pct"] == pytest.approx(100 * 1e12 / 0.6 / 1e13)
    assert f["fwd_bwd_hfu_pct"] == pytest.approx(20.0 * 1.25)


@pytest.mark.slow
def test_compiled_giant_layers_share_three_graphs():
    """The giant's 40 layers, compiled as the script compiles them (stochastic depth 0.1 on), trace into 3
    graphs (layer 0 without drop path, the rest, the vision-language layers) without a graph break: far under
    the recompile limit, so none falls back to eager. On the meta device, the encoder pass only."""
    import torch

    from beit3.model import build_model
    from beit3.pretrain.objective import _model_inputs

    mod = _module()
    s = mod.read_settings()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = build_model(s["preset"], device="meta", drop_path_rate=0.1).to(torch.bfloat16).train()
    batch = mod.synthetic_batch(model.cfg, s, 8, 8, 8, 128, 64)
    inputs = {k: {n: t.to("meta") for n, t in _model_inputs(batch[k]).items()} for k in batch}
    inputs = {
        k: {n: (t.to(torch.bfloat16) if n == "image" else t) for n, t in v.items()} for k, v in inputs.items()
    }
    for sub in inputs.values():
        sub.pop("text_padding_mask", None)  # nothing padded (prepare_batch drops it)
    mod.compile_layers(model, "aot_eager")
    hidden = model.forward_mixed(inputs)
    assert hidden["pair"].shape == (8, model.cfg.num_vision_tokens + 64, model.cfg.embed_dim)
    assert mod.dynamo_counts() == {"graphs": 3, "frames_compiled": 3, "graph_breaks": 0}
    torch._dynamo.reset()
