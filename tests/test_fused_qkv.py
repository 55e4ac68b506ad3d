"""The paper layout's fused q/k/v projection: one GEMM that computes what three projections did, under the
three projections' key names wherever a checkpoint is written or read.

The reference throughout is the same model with the fused projection taken apart into three ``nn.Linear``
modules registered where the committed code registered them (``k_proj``, ``v_proj``, ``q_proj`` before
``out_proj``) and without the state-dict hooks: the shared-attention module as it was before fusion, whose
key names come from its module structure alone.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from engine_helpers import DS_CONFIGS, ToyData, full_parameters, single_rank  # noqa: F401  (a fixture)
from torch import nn

from beit3.model import WeightsFileError, build_model, count_parameters, load_checkpoint, save_checkpoint
from beit3.model.beit3 import BEiT3Model
from beit3.model.checkpoint import checkpoint_key_names, read_state_dict
from beit3.model.layers import Multiway
from beit3.model.params import build_param_groups
from beit3.model.qkv import QKV_DISK_ORDER, QKV_PARTS, FusedQKV
from beit3.model.registry import get_config, list_models

PAPER = "beit3_tiny_paper_patch16_64"
SMALL = {"vocab_size": 40, "max_text_positions": 20, "visual_vocab_size": 32}
PAPER_PRESETS = [n for n in list_models() if not get_config(n).decoupled_attention]
ATTN = "beit3.encoder.layers.0.self_attn."


def _paper(seed: int = 0, **overrides) -> BEiT3Model:
    torch.manual_seed(seed)
    return build_model(PAPER, **{**SMALL, **overrides})


def _unfused(model: BEiT3Model) -> BEiT3Model:
    """A copy of ``model`` whose shared attention holds three Linears with the fused rows, in the committed
    code's module order, and no key-mapping hooks (so its key names come from its modules)."""
    ref = copy.deepcopy(model)
    for layer in ref.beit3.encoder.layers:
        attn = layer.self_attn
        fused = attn.qkv_proj
        modules = OrderedDict()
        for name, module in attn._modules.items():
            if name != "qkv_proj":
                modules[name] = module
                continue
            for part in QKV_DISK_ORDER:
                i = QKV_PARTS.index(part)
                linear = nn.Linear(fused.dim, fused.dim, device=fused.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(fused.block(part))
                    linear.bias.copy_(fused.bias[i * fused.dim : (i + 1) * fused.dim])
                modules[part] = linear
        attn._modules = modules
        attn.qkv_proj = None  # the three-projection code path of SelfAttention
        attn._state_dict_hooks.clear()
        attn._load_state_dict_pre_hooks.clear()
    return ref


def _inputs(seed: int = 0, batch: int = 2, text_len: int = 5):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 64, 64, generator=g)
    text = torch.randint(3, 40, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[0, -2:] = True
    return image, text, pad


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- the computation --------------------------------------------------------------------------------------
def test_paper_layout_holds_one_fused_projection_and_released_layout_three_multiway_ones():
    paper = build_model(PAPER, device="meta")
    attn = paper.beit3.encoder.layers[0].self_attn
    assert isinstance(attn.qkv_proj, FusedQKV) and tuple(attn.qkv_proj.weight.shape) == (3 * 64, 64)
    assert not any(hasattr(attn, p) for p in QKV_PARTS)
    released = build_model("beit3_tiny_patch16_64", device="meta")
    attn = released.beit3.encoder.layers[0].self_attn
    assert attn.qkv_proj is None and all(isinstance(getattr(attn, p), Multiway) for p in QKV_PARTS)
    assert not any("qkv" in n for n, _ in released.named_parameters())


@pytest.mark.parametrize("mode", ["image", "text", "pair"])
def test_forward_and_gradients_equal_three_separate_projections(mode):
    model = _paper(drop_path_rate=0.0)
    ref = _unfused(model)
    image, text, pad = _inputs()
    kwargs = {"image": image} if mode == "image" else {"text": text, "text_padding_mask": pad}
    if mode == "pair":
        kwargs["image"] = image
    out, expected = model(**kwargs), ref(**kwargs)
    assert _max_diff(out, expected) <= 1e-6
    out.square().mean().backward()
    expected.square().mean().backward()
    for layer, ref_layer in zip(model.beit3.encoder.layers, ref.beit3.encoder.layers):
        fused = layer.self_attn.qkv_proj
        for i, part in enumerate(QKV_PARTS):
            lin = getattr(ref_layer.self_attn, part)
            rows = slice(i * fused.dim, (i + 1) * fused.dim)
            assert _max_diff(fused.weight.grad[rows], lin.weight.grad) <= 1e-6
            assert _max_diff(fused.bias.grad[rows], lin.bias.grad) <= 1e-6


def test_forward_mixed_equals_three_separate_projections():
    model = _paper(drop_path_rate=0.0)
    ref = _unfused(model)
    image, text, pad = _inputs()
    subbatches = {
        "image": {"image": image},
        "text": {"text": text, "text_padding_mask": pad},
        "pair": {"image": image, "text": text, "text_padding_mask": pad},
    }
    out, expected = model.forward_mixed(subbatches), ref.forward_mixed(subbatches)
    for name in subbatches:
        assert _max_diff(out[name], expected[name]) <= 1e-6, name
    sum(o.square().mean() for o in out.values()).backward()
    sum(o.square().mean() for o in expected.values()).backward()
    fused, lin = (
        model.beit3.encoder.layers[1].self_attn.qkv_proj,
        ref.beit3.encoder.layers[1].self_attn.v_proj,
    )
    assert _max_diff(fused.weight.grad[2 * 64 :], lin.weight.grad) <= 1e-6  # the v rows


@torch.no_grad()
def test_cached_decoding_equals_three_separate_projections():
    model = _paper().eval()
    ref = _unfused(model).eval()
    image, text, _ = _inputs()
    for m in (model, ref):
        m.cache = m.new_cache()
    first = [m(image=image, text=text[:, :1], cache=m.cache) for m in (model, ref)]
    assert _max_diff(*first) <= 1e-6
    for i in range(1, text.shape[1]):
        step = [m(text=text[:, i : i + 1], cache=m.cache) for m in (model, ref)]
        assert _max_diff(*step) <= 1e-6, i
    for layer in range(model.cfg.depth):
        assert _max_diff(model.cache.keys[layer], ref.cache.keys[layer]) <= 1e-6
        assert _max_diff(model.cache.values[layer], ref.cache.values[layer]) <= 1e-6


def test_queries_keys_and_values_are_views_of_one_gemm_output():
    attn = _paper().beit3.encoder.layers[0].self_attn
    x = torch.randn(2, 7, 64)
    q, k, v = attn._project(x, num_vision=3)
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([q, k, v], dim=-1), attn.qkv_proj(x))


# --- key names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_state_dict_keys_are_the_committed_names_in_their_order(name):
    model = build_model(name, device="meta")
    keys = list(model.state_dict())
    assert keys == list(_unfused(model).state_dict())
    assert not [k for k in keys if "qkv" in k]
    attn = [k[len(ATTN) :] for k in keys if k.startswith(ATTN)]
    assert attn[:6] == ["k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "q_proj.weight",
                        "q_proj.bias"]  # fmt: skip
    assert [n for n, _ in model.named_parameters() if n.startswith(ATTN)][:2] == [
        ATTN + "qkv_proj.weight",
        ATTN + "qkv_proj.bias",
    ]


def test_state_dict_tensors_are_the_fused_rows_without_copies():
    model = _paper()
    sd = model.state_dict()
    fused = model.beit3.encoder.layers[0].self_attn.qkv_proj
    for i, part in enumerate(QKV_PARTS):
        assert torch.equal(sd[f"{ATTN}{part}.weight"], fused.weight[i * 64 : (i + 1) * 64])
        assert (
            sd[f"{ATTN}{part}.weight"].untyped_storage().data_ptr()
            == fused.weight.untyped_storage().data_ptr()
        )
        assert torch.equal(sd[f"{ATTN}{part}.bias"], fused.bias[i * 64 : (i + 1) * 64])


def test_a_dict_of_parameter_names_maps_to_the_checkpoint_names():
    model = _paper()
    params = {n: p.detach() for n, p in model.named_parameters()}  # DeepSpeed's names (ZeRO shards)
    mapped = checkpoint_key_names(params)
    sd = model.state_dict()
    assert list(mapped) == list(sd) and all(torch.equal(mapped[k], sd[k]) for k in sd)
    assert checkpoint_key_names(sd) is sd  # nothing to map: the same dict
    # both names present (a bf16 consolidation: fp32 masters by parameter name beside the module's state)
    both = {**sd, ATTN + "qkv_proj.weight": params[ATTN + "qkv_proj.weight"] + 1.0}
    assert torch.equal(checkpoint_key_names(both)[ATTN + "k_proj.weight"], sd[ATTN + "k_proj.weight"] + 1.0)
    assert set(checkpoint_key_names(both)) == set(sd)


# --- loading and saving -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_then_load_round_trips_bit_for_bit(tmp_path, suffix):
    src, dst = _paper(0), _paper(1)
    path = save_checkpoint(src, tmp_path / f"ckpt{suffix}")
    keys, want = list(read_state_dict(path)), list(src.state_dict())
    assert keys == want if suffix == ".pth" else sorted(keys) == sorted(want)  # safetensors sorts keys
    report = load_checkpoint(dst, path)
    assert not report.missing and not report.unexpected
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), name


def test_an_old_format_dict_loads_strictly():
    src = _paper(0)
    old = _unfused(src).state_dict()  # written by three separate projections
    dst = _paper(1)
    assert str(dst.load_state_dict(old, strict=True)) == "<All keys matched successfully>"
    for (name, a), (_, b) in zip(src.named_parameters(), dst.named_parameters()):
        assert torch.equal(a, b), name
    dst = _paper(2)
    assert not load_checkpoint(dst, {"model": old}).missing
    assert torch.equal(dst.beit3.encoder.layers[2].self_attn.qkv_proj.weight,
                       src.beit3.encoder.layers[2].self_attn.qkv_proj.weight)  # fmt: skip


def test_missing_and_misshapen_projections_are_named_under_their_own_keys():
    sd = _paper(0).state_dict()
    del sd[ATTN + "q_proj.bias"]
    with pytest.raises(WeightsFileError, match=r"missing \(1\): " + ATTN + r"q_proj\.bias"):
        load_checkpoint(_paper(1), sd)
    dst = _paper(1)
    before = dst.beit3.encoder.layers[0].self_attn.qkv_proj.bias.detach().clone()
    result = dst.load_state_dict(sd, strict=False)
    assert result.missing_keys == [ATTN + "q_proj.bias"] and not result.unexpected_keys
    loaded = dst.beit3.encoder.layers[0].self_attn.qkv_proj.bias
    kv = torch.cat([sd[ATTN + "k_proj.bias"], sd[ATTN + "v_proj.bias"]])
    assert torch.equal(loaded[:64], before[:64]) and torch.equal(loaded[64:], kv)  # q keeps its rows
    sd = _paper(0).state_dict()
    sd[ATTN + "k_proj.weight"] = torch.zeros(8, 64)
    with pytest.raises(
        WeightsFileError, match=ATTN + r"k_proj\.weight: checkpoint \(8, 64\) vs model \(64, 64\)"
    ):
        load_checkpoint(_paper(1), sd)
    with pytest.raises(RuntimeError, match=r"size mismatch for " + ATTN + r"k_proj\.weight"):
        _paper(1).load_state_dict(sd)


def test_finetune_reload_report_names_the_projections(tmp_path):
    from beit3.finetune.configurations import build_encoder, full_model_keys
    from beit3.finetune.reload import load_pretrained
    from beit3.finetune.tasks.base import FinetuneTask

    path = save_checkpoint(_paper(0), tmp_path / "paper.pth")
    task = FinetuneTask(build_encoder(PAPER, "dual", **SMALL))
    report = load_pretrained(task, path, full_model_keys(PAPER, **SMALL))
    assert {ATTN + f"{p}.{s}" for p in QKV_PARTS for s in ("weight", "bias")} <= set(report.loaded)
    assert not [k for k in report.loaded + report.unused + report.fresh if "qkv" in k]
    assert report.fresh == []


# --- optimizer conventions, counts, init ------------------------------------------------------------------
def _assignments(model: nn.Module, fused_to_parts: bool) -> dict[str, tuple[float, float]]:
    """Old key -> (lr scale, weight decay) of the released finetuning conventions (layer decay 0.65)."""
    named = list(model.named_parameters())
    groups = build_param_groups(named, depth=model.cfg.depth, weight_decay=0.05, layer_decay=0.65,
                                head_lr_scale=20.0, head_prefixes=("mlm_head",),
                                no_weight_decay=model.no_weight_decay())  # fmt: skip
    of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    out = {}
    for name, p in named:
        if fused_to_parts and ".qkv_proj." in name:
            for part in QKV_PARTS:
                out[name.replace("qkv_proj", part)] = of[id(p)]
        else:
            out[name] = of[id(p)]
    return out


def test_param_groups_assign_what_the_three_projections_had():
    model = _paper()
    fused, old = _assignments(model, True), _assignments(_unfused(model), False)
    assert fused == old
    assert fused[ATTN + "v_proj.weight"] == (0.65**model.cfg.depth, 0.05)
    assert fused[ATTN + "v_proj.bias"] == (0.65**model.cfg.depth, 0.0)


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_parameter_counts_are_unchanged(name):
    model = build_model(name, device="meta")
    ref = _unfused(model)
    for matrices_only in (False, True):
        assert count_parameters(model, matrices_only) == count_parameters(ref, matrices_only)


@pytest.mark.parametrize("init", ["beit", "magneto"])
def test_init_draws_what_three_separate_linears_drew(init):
    """Same seed, same draws: the fused rows are initialised block by block in the three modules' order."""
    model = _paper(init=init)
    ref = _unfused(model)
    torch.manual_seed(5)
    model.init_weights()
    torch.manual_seed(5)
    ref.init_weights()
    sd, expected = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sd[k], expected[k]) for k in expected)


def test_magneto_gain_scales_the_value_rows_only():
    model = _paper(init="magneto", depth=4)
    fused = model.beit3.encoder.layers[3].self_attn.qkv_proj
    xavier_std = math.sqrt(2.0 / (64 + 64))  # fans of one (D, D) block, not of the (3D, D) matrix
    gain = math.sqrt(math.log(2 * 4))
    assert fused.block("q_proj").std().item() == pytest.approx(xavier_std, rel=0.1)
    assert fused.block("k_proj").std().item() == pytest.approx(xavier_std, rel=0.1)
    assert fused.block("v_proj").std().item() == pytest.approx(xavier_std * gain, rel=0.1)


def test_beit_init_leaves_the_fused_rows_at_the_plain_truncated_normal():
    model = _paper(depth=4)
    for layer_id, layer in enumerate(model.beit3.encoder.layers, start=1):
        fused = layer.self_attn.qkv_proj
        for part in QKV_PARTS:  # not divided like out_proj: truncated at 2 sigma, std 0.88 sigma
            assert fused.block(part).std().item() == pytest.approx(0.02 * 0.88, rel=0.1)
        assert fused.bias.eq(0).all()
        out_std = layer.self_attn.out_proj.weight.std().item()
        assert out_std == pytest.approx(0.02 * 0.88 / math.sqrt(2 * layer_id), rel=0.1)


# --- ZeRO-3: training checkpoints, consolidation, export ------------------------------------------------
class _PaperTask(nn.Module):
    """The engine's task protocol over the tiny paper-layout model (under ``model.``, as pretraining's task):
    every sub-batch kind and both heads, so that each step touches every parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = build_model(PAPER, **SMALL)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        image, text, mask = batch["image"], batch["text"], batch["image_mask"]
        h = self.model.forward_mixed({"image": {"image": image, "image_mask": mask}, "text": {"text": text},
                                      "pair": {"image": image, "text": text}})  # fmt: skip
        loss = (
            self.model.mim_head(h["image"][:, 1:]).float().logsumexp(-1).mean()
            + self.model.mlm_head(h["text"]).float().logsumexp(-1).mean()
            + h["pair"].float().square().mean()
        )
        return loss, {"loss/total": loss.detach()}

    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def param_groups(self) -> list[dict]:
        return build_param_groups(self.named_parameters(), depth=self.model.cfg.depth, weight_decay=0.05)

    def batch_stats(self, batch: dict) -> dict:
        return {"samples": 3 * batch["text"].shape[0], "tokens": 1, "flops": 1.0}


class _PaperData(ToyData):
    """ToyData's resumable stream, each batch an image, a text and a patch mask drawn from its index."""

    def _batches(self):
        while True:
            g = torch.Generator().manual_seed(self.index)
            m = self.micro_batch
            batch = {"image": torch.randn(m, 3, 64, 64, generator=g),
                     "text": torch.randint(3, 40, (m, 5), generator=g),
                     "image_mask": torch.rand(m, 16, generator=g) < 0.4, "index": self.index}  # fmt: skip
            self.index += 1
            yield batch


def _zero3_trainer(out, steps: int):
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.launch import init_distributed
    from beit3.engine.trainer import Trainer, TrainerConfig

    dist = init_distributed()
    task = _PaperTask()
    ds = load_ds_config(
        DS_CONFIGS / "zero3_fp32.json", dist.world_size, {"train_micro_batch_size_per_gpu": 2}
    )
    cfg = TrainerConfig(output_dir=str(out), total_steps=steps, log_every=1, save_every=0, lr=1e-3,
                        warmup_steps=1, shutdown_at_end=False,
                        run_info={"model": task.model.cfg.to_dict()})  # fmt: skip
    return Trainer(task, _PaperData(2, rank=dist.rank), ds, cfg, dist)


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning")
def test_a_zero3_checkpoint_exports_and_resumes_under_the_projection_names(tmp_path, single_rank):  # noqa: F811
    from beit3.engine.consolidate import consolidate_checkpoint
    from beit3.pretrain.export import export_run

    trainer = _zero3_trainer(tmp_path, 2)
    assert trainer.fit().exit_reason == "finished"
    live = full_parameters(trainer)  # gathered, under the parameters' (fused) names
    raw = consolidate_checkpoint(tmp_path)  # DeepSpeed's per-parameter names: the engine maps nothing
    assert "model." + ATTN + "qkv_proj.weight" in raw
    out = export_run(tmp_path, tmp_path / "model.pth")
    sd = torch.load(out, map_location="cpu", weights_only=True)["model"]
    assert set(sd) == set(build_model(PAPER, device="meta", **SMALL).state_dict())  # (in ZeRO's order)
    assert ATTN + "v_proj.bias" in sd and not [k for k in sd if "qkv" in k]
    model = build_model(PAPER, **SMALL)
    load_checkpoint(model, out, strict=True)
    for name, p in model.named_parameters():
        assert torch.equal(p, live["model." + name]), name
    # The ZeRO-3 module state holds empty placeholders under the projection names; a resume loads them.
    resumed = _zero3_trainer(tmp_path, 3)
    assert resumed.fit().exit_reason == "finished" and resumed.step == 3


def test_the_benchmark_compares_both_variants_on_the_same_function(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "fused_qkv.py"
    spec = importlib.util.spec_from_file_location("bench_fused_qkv", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "fused_qkv.md"
    args = ["--dim", "64", "--heads", "2", "--layers", "1", "--img-size", "32", "--batch", "1",
            "--text-len", "4", "--steps", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| attention", "| model"))]
    assert len(rows) == 2 and all(float(r.split("|")[-2]) <= 1e-6 for r in rows)  # same outputs
