"""The giant's pretraining step on one GPU, prepared for a machine with only torch and CUDA (issue 13 item 9).

Run from the repository root (the project need not be installed; no DeepSpeed, webdataset, SentencePiece or
TensorBoard is imported)::

    python bench/gpu_giant.py --out bench/results            # one H100/H200: at most 8 minutes
    python bench/gpu_giant.py --preset beit3_tiny_patch16_64 --device cpu --steps 2   # the CPU check, seconds

What it measures, for the preset and batch of ``pretrain/recipes/giant.toml`` (beit3_giant_patch14_224; one
GPU's micro-batch of ``ds_configs/zero3_bf16_hpz.json``, 24 = 8 images + 8 texts + 8 pairs split as the
recipe's ``[batch]``; texts of ``text_max_len`` = 128 and pair captions of ``pair_text_max_len`` = 64
tokens, none padded; the recipe's masking ratios, pair masking and stochastic depth):

* the training step of :class:`beit3.pretrain.objective.MaskedDataModeling` (one pass per micro-batch through
  ``forward_mixed``, logits at masked positions, one backward), then the optimizer step, in each
  configuration: eager and ``torch.compile``'d (each layer's ``forward_packed``, so the 40 layers share a few
  compiled graphs), activation checkpointing ``none``, the recipe's ``[model] grad_checkpointing`` (with its
  ``grad_checkpointing_part``), ``all:attention`` (every layer's attention branch recomputed) and ``all``
  (full recomputation, for comparison);
* precision ``bf16-master`` (default; as DeepSpeed's bf16 mode: bf16 weights and gradients, fp32 master
  weights, gradients copied to fp32, clipped to the DeepSpeed config's ``gradient_clipping``, a plain torch
  ``AdamW(fused=True)`` on the masters, weights copied back) or ``autocast`` (fp32 weights, bf16 autocast,
  clipping and fused AdamW on the weights);
* per configuration: forward+backward time and optimizer time (each synchronised, median after warm-up) and
  their sum, forward+backward MFU and step MFU (model FLOPs of the task's ``batch_stats``, i.e.
  ``beit3.model.flops``, over the device's ``PEAK_FLOPS`` of ``beit3.engine.metrics``), HFU with the
  recomputed forward, peak memory (``max_memory_allocated`` / ``max_memory_reserved`` over the timed steps),
  compile time (first step minus the median step), compiled graphs, graph breaks;
* which SDPA backend each sub-batch's attention used: the aten attention ops a profiled forward+backward ran
  (by sequence length), beside the dispatcher's choice (``torch._fused_sdp_choice``) and which backends run
  that sub-batch's shapes alone (``sdpa_kernel``), with no mask (as measured: nothing is padded) and with the
  padding mask a padded batch would bring.

Inputs are synthetic but realistic: random normalised images, random ordinary token ids with BOS/EOS and
BERT-style corruption (80% ``<mask>``, 10% random, 10% kept), exact-count random patch masks, random
visual-token codes as MIM targets: the frozen visual tokenizer, the loader and the host-to-device copy are not
part of the measured step. A time budget (``--budget-s``, default 450 s from the start of ``main``, so that
imports and the last write stay inside 8 minutes) skips what no longer fits, with a note; results are
rewritten after every configuration, so a killed run leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import platform
import re
import statistics
import sys
import time
import tomllib
import traceback
import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("beit3") is None:  # not installed: map the repository's folders as beit3.*
    import types

    _pkg = types.ModuleType("beit3")
    _pkg.__path__ = [str(ROOT)]
    sys.modules["beit3"] = _pkg

from beit3.engine.metrics import PEAK_FLOPS, device_peak_flops  # noqa: E402
from beit3.model import build_model, count_parameters  # noqa: E402
from beit3.model.beit3 import CHECKPOINT_PARTS, BEiT3, BEiT3Model, checkpointed_layers  # noqa: E402
from beit3.pretrain.objective import MaskedDataModeling  # noqa: E402
from beit3.tokenizers.ids import BOS_ID, EOS_ID, FIRST_ORDINARY_ID  # noqa: E402
from beit3.tokenizers.masking import bert_corruption  # noqa: E402

RECIPE = ROOT / "pretrain/recipes/giant.toml"
DS_CONFIG = ROOT / "ds_configs/zero3_bf16_hpz.json"
# <mask> of a 64,000-piece model (len(spm) + 1 in beit3.tokenizers.text, which needs SentencePiece to say it);
# tests/test_bench_gpu_giant.py checks it.
MASK_ID_64K = 64001
PAIR_IMAGE_MASK_PROB = 0.5  # PretrainDataConfig's default (the recipe does not set it)
SUBBATCHES = ("image", "text", "pair")
# aten attention op (forward) -> SDPA backend
SDPA_OPS = {
    "_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION (cpu)",
    "_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
    "_scaled_dot_product_attention_math": "MATH",
}
PRECISIONS = ("bf16-master", "autocast")
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)


# ---- recipe ----------------------------------------------------------------------------------------------
def checkpoint_setting(spec: str, depth: int) -> tuple[list[int] | None, str]:
    """A configuration's checkpointing ``LAYERS[:PART]`` -> (recomputed layer indices or None, part):
    ``LAYERS`` as ``[model] grad_checkpointing``, ``PART`` one of ``CHECKPOINT_PARTS`` (``[model]
    grad_checkpointing_part``; default ``layer``): ``all:attention`` recomputes every layer's attention."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail in CHECKPOINT_PARTS:
        return checkpoint_layers(head, depth), tail
    return checkpoint_layers(spec, depth), "layer"


def checkpoint_layers(spec: str, depth: int) -> list[int] | None:
    """``[model] grad_checkpointing`` -> recomputed layer indices (None: off): the model's grammar."""
    return checkpointed_layers(spec, depth)


def _recipe_checkpointing(model: dict) -> str:
    """The recipe's ``grad_checkpointing`` with its ``grad_checkpointing_part`` as this script names it."""
    spec, part = model.get("grad_checkpointing", "none"), model.get("grad_checkpointing_part", "layer")
    return spec if spec == "none" or part == "layer" else f"{spec}:{part}"


def read_settings(recipe: Path = RECIPE, ds_config: Path = DS_CONFIG) -> dict:
    """What the measurement takes from the recipe and the DeepSpeed config (stdlib readers only)."""
    r = tomllib.loads(recipe.read_text())
    ds = json.loads(ds_config.read_text())
    model, data, mix, train = r["model"], r["data"], r.get("batch", {}), r.get("train", {})
    per_gpu = int(ds["train_micro_batch_size_per_gpu"])
    parts = {k: int(mix.get(k, 1)) for k in ("images", "texts", "pairs")}
    unit = sum(parts.values())
    return {
        "recipe": str(recipe.relative_to(ROOT)) if recipe.is_relative_to(ROOT) else str(recipe),
        "ds_config": str(ds_config.relative_to(ROOT)) if ds_config.is_relative_to(ROOT) else str(ds_config),
        "preset": model["name"],
        "drop_path_rate": float(model.get("drop_path_rate", 0.0)),
        "grad_checkpointing": _recipe_checkpointing(model),
        "batch": {k: v * per_gpu // unit for k, v in parts.items()},
        "text_len": int(data["text_max_len"]),
        "pair_text_len": int(data["pair_text_max_len"]),
        "image_mask_ratio": float(data["image_mask_ratio"]),
        "text_mask_ratio": float(data["text_mask_ratio"]),
        "pair_text_mask_ratio": float(data["pair_text_mask_ratio"]),
        "pair_image_mask_ratio": float(data.get("pair_image_mask_ratio", data["image_mask_ratio"])),
        "pair_masking": data.get("pair_masking", "separate"),
        "pair_image_mask_prob": float(data.get("pair_image_mask_prob", PAIR_IMAGE_MASK_PROB)),
        "lr": float(train.get("lr", 1e-3)),
        "betas": tuple(train.get("betas", (0.9, 0.98))),
        "eps": float(train.get("eps", 1e-6)),
        "weight_decay": float(train.get("weight_decay", 0.05)),
        "gradient_clipping": float(ds.get("gradient_clipping", 0.0)),
    }


# ---- synthetic batch -------------------------------------------------------------------------------------
def synthetic_batch(cfg, s: dict, images: int, texts: int, pairs: int, text_len: int, pair_len: int, seed=0):
    """A CPU micro-batch with the data pipeline's contract (codes instead of tokenizer views)."""
    g = torch.Generator().manual_seed(seed)
    n_patch = cfg.num_patches
    mask_id = min(MASK_ID_64K, cfg.vocab_size - 1)
    high = min(MASK_ID_64K, cfg.vocab_size)  # ordinary pieces: [FIRST_ORDINARY_ID, <mask>)

    def patch_masks(n: int, ratio: float, on: torch.Tensor) -> torch.Tensor:
        k = int(math.floor(ratio * n_patch + 0.5))
        order = torch.rand(n, n_patch, generator=g).argsort(dim=1)
        mask = torch.zeros(n, n_patch, dtype=torch.bool)
        mask.scatter_(1, order[:, :k], True)
        return mask & on[:, None]

    def images_of(n: int) -> dict:
        img = (torch.rand(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) - 0.5) / 0.5
        return {
            "image": img,
            "image_codes": torch.randint(0, cfg.visual_vocab_size, (n, n_patch), generator=g),
        }

    def texts_of(n: int, length: int, ratio: float, on: torch.Tensor) -> dict:
        ids = torch.randint(FIRST_ORDINARY_ID, high, (n, length), generator=g)
        ids[:, 0], ids[:, -1] = BOS_ID, EOS_ID
        labels = torch.full_like(ids, -100)
        masked = ids.clone()
        k = max(1, int(math.floor(ratio * (length - 2) + 0.5)))
        for row in range(n):
            if not on[row]:
                continue
            chosen = 1 + torch.randperm(length - 2, generator=g)[:k]
            labels[row, chosen] = ids[row, chosen]
            to_mask, to_random = bert_corruption(torch.rand(k, generator=g))  # BERT's 80/10/10
            masked[row, chosen[to_mask]] = mask_id
            rand = chosen[to_random]
            masked[row, rand] = torch.randint(FIRST_ORDINARY_ID, high, (len(rand),), generator=g)
        return {
            "text": masked,
            "text_padding_mask": torch.zeros(n, length, dtype=torch.bool),
            "text_labels": labels,
        }

    batch = {}
    if images:
        batch["image"] = {**images_of(images)}
        batch["image"]["image_mask"] = patch_masks(
            images, s["image_mask_ratio"], torch.ones(images, dtype=torch.bool)
        )
    if texts:
        batch["text"] = texts_of(texts, text_len, s["text_mask_ratio"], torch.ones(texts, dtype=torch.bool))
    if pairs:
        if s["pair_masking"] == "joint":
            img_on = txt_on = torch.ones(pairs, dtype=torch.bool)
        else:  # "separate": each pair masks its image (probability pair_image_mask_prob) or its text
            img_on = torch.zeros(pairs, dtype=torch.bool)
            img_on[torch.randperm(pairs, generator=g)[: round(s["pair_image_mask_prob"] * pairs)]] = True
            txt_on = ~img_on
        pair = images_of(pairs)
        pair["image_mask"] = patch_masks(pairs, s["pair_image_mask_ratio"], img_on)
        pair.update(texts_of(pairs, pair_len, s["pair_text_mask_ratio"], txt_on))
        batch["pair"] = pair
    return batch


# ---- precision and optimizer -----------------------------------------------------------------------------
class Optimizer:
    """The optimizer step of a precision: ``bf16-master`` (DeepSpeed's bf16 mode in plain torch) or
    ``autocast``; gradient clipping to the DeepSpeed config's value on device (no host sync)."""

    def __init__(self, task: MaskedDataModeling, precision: str, s: dict, fused: bool) -> None:
        self.precision, self.clip = precision, s["gradient_clipping"]
        self.params = [p for g in task.param_groups() for p in g["params"]]
        kw = {"lr": s["lr"], "betas": s["betas"], "eps": s["eps"], "fused": fused}
        if precision == "bf16-master":
            groups, self.masters = [], []
            for g in task.param_groups():
                masters = [p.detach().float().clone() for p in g["params"]]
                for m in masters:
                    m.grad = torch.zeros_like(
                        m
                    )  # the fp32 gradient buffer (DeepSpeed's grad_accum_dtype fp32)
                self.masters += masters
                groups.append({**g, "params": masters})
            self.opt = torch.optim.AdamW(groups, **kw)
            self.describe = (
                "bf16 weights and gradients; gradients copied to fp32 master gradients, clipped "
                f"(clip_grad_norm_ {self.clip}, foreach), torch.optim.AdamW(fused={fused}) on the fp32 "
                "masters, weights copied back to bf16"
            )
        else:
            self.opt = torch.optim.AdamW(task.param_groups(), **kw)
            self.describe = (
                f"fp32 weights and gradients under bf16 autocast; clip_grad_norm_ {self.clip} (foreach), "
                f"torch.optim.AdamW(fused={fused})"
            )

    @torch.no_grad()
    def step(self) -> None:
        if self.precision == "bf16-master":
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch._foreach_copy_([m.grad for m in self.masters], grads)
            targets = self.masters
        else:
            targets = self.params
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(targets, self.clip, foreach=True)
        self.opt.step()
        if self.precision == "bf16-master":
            torch._foreach_copy_(self.params, self.masters)
        for p in self.params:
            p.grad = None


# ---- compile ---------------------------------------------------------------------------------------------
def _set_recompile_limit(n: int) -> str:
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, n)
    return name


def compile_layers(model, backend: str) -> None:
    """``torch.compile`` each layer's ``forward_packed`` (``BEiT3Model.compile_layers``, what ``[model]
    compile = "layers"`` does in training): stochastic depth comes in as tensors, so layers of one structure
    share their compiled graphs. The recompile limit stays the one ``--recompile-limit`` set."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    limit = getattr(config, name)
    model.compile_layers(backend)
    setattr(config, name, limit)


def uncompile_layers(model) -> None:
    model.compile_layers(None)


def dynamo_counts() -> dict:
    stats = BEiT3Model.compile_stats()
    return {
        "graphs": stats["graphs"],
        "frames_compiled": stats["frames"],
        "graph_breaks": stats["graph_breaks"],
    }


# ---- SDPA ------------------------------------------------------------------------------------------------
def seq_lengths(cfg, batch: dict) -> dict[str, tuple[int, int]]:
    """Sub-batch -> (samples, positions of one sequence)."""
    out = {}
    for key in SUBBATCHES:
        if key in batch:
            b = batch[key]
            n = (b["image"] if "image" in b else b["text"]).shape[0]
            out[key] = (
                n,
                (cfg.num_vision_tokens if "image" in b else 0) + (b["text"].shape[1] if "text" in b else 0),
            )
    return out


def sdpa_probe(cfg, shapes: dict, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Per sub-batch and mask: the dispatcher's choice and which backends run its attention alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads, hd = cfg.num_heads, cfg.embed_dim // cfg.num_heads
    backends = [
        b
        for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
        if hasattr(SDPBackend, b)
    ]
    rows = []
    for key, (n, t) in shapes.items():
        variants = [("none (as measured: nothing padded)", None)]
        if key != "image":
            text = t - (cfg.num_vision_tokens if key == "pair" else 0)
            pad = torch.zeros(n, t, dtype=torch.bool, device=device)
            pad[:, t - text // 4 :] = True  # the last quarter of the text padded
            variants.append(("padding mask (a padded batch)", BEiT3._attention_mask(pad, None, dtype)))
        for label, mask in variants:
            q, k, v = (
                torch.randn(n, heads, t, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
            )
            row = {"sub_batch": key, "shape": [n, heads, t, hd], "mask": label, "runs_alone": {}}
            try:
                row["dispatcher_choice"] = SDPBackend(torch._fused_sdp_choice(q, k, v, mask, 0.0, False)).name
            except Exception as e:  # private API: record why not
                row["dispatcher_choice"] = f"unknown ({type(e).__name__})"
            for name in backends:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with sdpa_kernel([getattr(SDPBackend, name)]):
                            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                            out.float().sum().backward()
                        row["runs_alone"][name] = "yes"
                    except RuntimeError as e:
                        why = (
                            "; ".join(str(w.message).split("\n")[0] for w in caught) or str(e).split("\n")[0]
                        )
                        row["runs_alone"][name] = f"no: {why[:100]}"
            rows.append(row)
    return rows


def observed_sdpa(run_fwd_bwd, shapes: dict, device: torch.device) -> dict:
    """The aten attention ops one profiled forward+backward ran, per sub-batch (matched by sequence length),
    and the attention kernels the GPU ran."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        run_fwd_bwd()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    by_len: dict[int, list[str]] = {}
    for key, (_, t) in shapes.items():
        by_len.setdefault(t, []).append(key)
    found = {key: {"forward": {}, "backward": {}, "gpu_kernels": set()} for key in shapes}
    kernels = set()
    for e in prof.events():
        name = e.name.removeprefix("aten::")
        base = name.removesuffix("_backward")
        if base in SDPA_OPS and e.input_shapes and len(e.input_shapes[0]) == 4:
            for key in by_len.get(e.input_shapes[0][2], []):
                part = found[key]["backward" if name != base else "forward"]
                part[SDPA_OPS[base]] = part.get(SDPA_OPS[base], 0) + 1
                found[key]["gpu_kernels"] |= _kernels_below(e)
        for k in [e.name] + [k.name for k in getattr(e, "kernels", None) or []]:
            if device.type == "cuda" and "aten::" not in k and ATTENTION_KERNEL.search(k):
                kernels.add(k[:120])
    for part in found.values():
        part["gpu_kernels"] = sorted(part["gpu_kernels"])[:6]
    ambiguous = [keys for keys in by_len.values() if len(keys) > 1]
    return {"ops": found, "gpu_attention_kernels": sorted(kernels)[:12], "ambiguous_lengths": ambiguous}


def _kernels_below(event) -> set[str]:
    """Names of the device kernels an op and the ops under it launched (profiler events)."""
    names = {k.name[:120] for k in getattr(event, "kernels", None) or []}
    for child in getattr(event, "cpu_children", None) or []:
        names |= _kernels_below(child)
    return names


# ---- one configuration -----------------------------------------------------------------------------------
def figures(
    flops: float, fwd_bwd: list[float], opt: list[float], peak: float | None, recompute: float = 0.0
) -> dict:
    """Medians and the MFU/HFU figures of one configuration's timed steps; ``recompute``: the FLOPs
    activation checkpointing runs again (the task's ``batch_stats`` ``recompute_flops``)."""
    fb = statistics.median(fwd_bwd)
    op = statistics.median(opt)
    step = statistics.median([a + b for a, b in zip(fwd_bwd, opt)])
    hw = flops + recompute

    def pct(f, t):
        return 100.0 * f / t / peak if peak else None

    return {
        "fwd_bwd_s": fb,
        "optimizer_s": op,
        "step_s": step,
        "achieved_fwd_bwd_tflops": flops / fb / 1e12,
        "fwd_bwd_mfu_pct": pct(flops, fb),
        "step_mfu_pct": pct(flops, step),
        "fwd_bwd_hfu_pct": pct(hw, fb),
    }


def measure(task, opt, batch, stats, cfg_row: dict, args, deadline: float, device: torch.device) -> dict:
    """Warm up, time ``args.steps`` steps (fwd+bwd and optimizer each synchronised), peak memory."""
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg_row["precision"] == "autocast")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def fwd_bwd():
        with amp:
            loss, _ = task(batch)
        loss.backward()
        return loss

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    if cuda:
        cfg_row["memory_before_gib"] = torch.cuda.memory_allocated(device) / 2**30
    first = []
    for i in range(max(1, args.warmup)):
        t_fb, loss = timed(fwd_bwd)
        t_op, _ = timed(opt.step)
        first.append(t_fb + t_op)
        if time.perf_counter() > deadline:
            cfg_row["notes"].append(f"budget reached after {i + 1} warm-up steps")
            break
    cfg_row["first_step_s"] = first[0]
    cfg_row["warmup_steps_s"] = first
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    fb_times, op_times = [], []
    for i in range(args.steps):
        t_fb, loss = timed(fwd_bwd)
        t_op, _ = timed(opt.step)
        fb_times.append(t_fb)
        op_times.append(t_op)
        if time.perf_counter() + t_fb + t_op > deadline and i + 1 < args.steps:
            cfg_row["notes"].append(f"budget: timed {i + 1} of {args.steps} steps")
            break
    cfg_row["last_loss"] = float(loss.detach())
    cfg_row["timed_steps"] = len(fb_times)
    cfg_row["fwd_bwd_times_s"] = fb_times
    cfg_row["optimizer_times_s"] = op_times
    cfg_row.update(
        figures(stats["flops"], fb_times, op_times, cfg_row["peak_flops"], cfg_row["recompute_flops"])
    )
    cfg_row["compile_s"] = max(0.0, first[0] - cfg_row["step_s"]) if cfg_row["compile"] else None
    cfg_row["samples_per_s"] = stats["samples"] / cfg_row["step_s"]
    cfg_row["tokens_per_s"] = stats["tokens"] / cfg_row["step_s"]
    if cuda:
        cfg_row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        cfg_row["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return fwd_bwd


# ---- results ---------------------------------------------------------------------------------------------
def _fmt(v, digits=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_results(record: dict, out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"
    js.write_text(json.dumps(record, indent=2) + "\n")
    md.write_text(markdown(record))
    return js, md


def markdown(r: dict) -> str:
    b, env = r["batch"], r["environment"]
    lines = [
        "# bench/gpu_giant.py: the giant's pretraining step on one device",
        "",
        f"Command: `{r['command']}` ({r['date_utc']}, "
        f"{r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget)",
        "",
        f"Device: **{env['device']}**; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
        f"Triton {env['triton']}, Python {env['python']}; peak {_fmt(r['peak_tflops'])} TFLOP/s "
        f"({r['peak_source']})",
        "",
        f"Model: `{r['model']['preset']}` ({r['model']['params_total'] / 1e9:.3f}B parameters, "
        f"{r['model']['depth']} layers, drop path {r['model']['drop_path_rate']}); "
        f"recipe `{r['settings']['recipe']}`, "
        f"DeepSpeed config `{r['settings']['ds_config']}`",
        "",
        f"Micro-batch: {b['images']} images + {b['texts']} texts of {b['text_len']} + {b['pairs']} pairs "
        f"with captions of {b['pair_text_len']} (no padding); {b['masked_patches']} masked patches, "
        f"{b['masked_text']} masked text tokens; {b['tokens']} tokens, **{b['model_tflop']:.3f} TFLOP** "
        "per step (model FLOPs, the task's batch_stats)",
        "",
        "| precision | compiled | checkpointing | status | step s | fwd+bwd s | optimizer s | fwd+bwd MFU % "
        "| step MFU % | fwd+bwd HFU % | fwd+bwd TFLOP/s | samples/s | peak alloc GiB | peak reserved GiB "
        "| compile s | graphs | graph breaks | SDPA forward (image / text / pair) |",
        "|" + "---|" * 18,
    ]
    for c in r["configs"]:
        sdpa = c.get("sdpa_observed")
        seen = "not profiled"
        if sdpa:
            seen = " / ".join(
                ", ".join(sdpa["ops"][k]["forward"]) or "none seen" for k in SUBBATCHES if k in sdpa["ops"]
            )
        compiled = f"{c['compile_backend']}" if c["compile"] else "eager"
        cells = [
            c["precision"],
            compiled,
            c["grad_ckpt"],
            c["status"],
            *(
                _fmt(c.get(k))
                for k in (
                    "step_s",
                    "fwd_bwd_s",
                    "optimizer_s",
                    "fwd_bwd_mfu_pct",
                    "step_mfu_pct",
                    "fwd_bwd_hfu_pct",
                    "achieved_fwd_bwd_tflops",
                    "samples_per_s",
                    "peak_allocated_gib",
                    "peak_reserved_gib",
                    "compile_s",
                    "graphs",
                    "graph_breaks",
                )
            ),
            seen,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    observed = [c for c in r["configs"] if c.get("sdpa_observed")]
    if observed:
        lines += ["", "SDPA ops run in one profiled forward+backward (calls over all layers):", ""]
        lines += [
            "| configuration | sub-batch | forward | backward | its GPU kernels |",
            "|---|---|---|---|---|",
        ]
        for c in observed:
            for key, part in c["sdpa_observed"]["ops"].items():
                fwd, bwd = (
                    ", ".join(f"{k} x{v}" for k, v in part[d].items()) or "-" for d in ("forward", "backward")
                )
                kernels = ", ".join(f"`{k}`" for k in part["gpu_kernels"]) or "-"
                lines.append(f"| {c['label']} | {key} | {fwd} | {bwd} | {kernels} |")
    lines += ["", "SDPA backends per sub-batch (attention shapes (B, H, T, head dim) in bf16):", ""]
    lines += ["| sub-batch | shape | mask | dispatcher's choice | runs alone |", "|---|---|---|---|---|"]
    for p in r["sdpa_probe"]:
        alone = "; ".join(f"{k}: {v}" for k, v in p["runs_alone"].items())
        lines.append(
            f"| {p['sub_batch']} | {tuple(p['shape'])} | {p['mask']} | {p['dispatcher_choice']} | {alone} |"
        )
    kernels = sorted(
        {k for c in r["configs"] for k in (c.get("sdpa_observed") or {}).get("gpu_attention_kernels", [])}
    )
    if kernels:
        lines += ["", "GPU attention kernels seen: " + ", ".join(f"`{k}`" for k in kernels)]
    lines += ["", "Method:", ""] + [f"- {m}" for m in r["method"]]
    notes = r["notes"] + [f"{c['label']}: {n}" for c in r["configs"] for n in c["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def summary(c: dict) -> str:
    """One console line for a configuration."""
    return (
        f"{c['label']}: {c['status']}; step {_fmt(c.get('step_s'))} s (fwd+bwd {_fmt(c.get('fwd_bwd_s'))}, "
        f"optimizer {_fmt(c.get('optimizer_s'))}), fwd+bwd MFU {_fmt(c.get('fwd_bwd_mfu_pct'))}%, "
        f"peak {_fmt(c.get('peak_allocated_gib'))} GiB, compile {_fmt(c.get('compile_s'))} s"
        + (f" [{'; '.join(c['notes'])}]" if c["notes"] else "")
    )


# ---- main ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    triton = importlib.util.find_spec("triton")
    env = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "triton": __import__("triton").__version__ if triton else None,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["memory_gib"] = props.total_memory / 2**30
        env["multiprocessors"] = props.multi_processor_count
    return env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_giant.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench/results", help="results folder")
    p.add_argument("--name", default="gpu_giant", help="results file stem")
    p.add_argument("--recipe", type=Path, default=RECIPE)
    p.add_argument("--ds-config", type=Path, default=DS_CONFIG, help="micro-batch size and gradient clipping")
    p.add_argument("--preset", default=None, help="model preset (default: the recipe's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["bf16-master"])
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument(
        "--grad-ckpt",
        nargs="+",
        default=None,
        help="checkpointing settings LAYERS[:PART]: none, all, every:N, with :attention or :ffn for that "
        "branch only (default: none, the recipe's, all:attention, all)",
    )
    p.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)",
    )
    p.add_argument(
        "--recompile-limit", type=int, default=8, help="dynamo's per-function limit (torch default 8)"
    )
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth (default: the recipe's)")
    p.add_argument("--text-len", type=int, default=None, help="default: the recipe's text_max_len")
    p.add_argument("--pair-text-len", type=int, default=None, help="default: the recipe's pair_text_max_len")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (at least 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 3 on CUDA, 1 on CPU)")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the measurements")
    p.add_argument("--compile-estimate-s", type=float, default=150.0, help="assumed cost of a first compile")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's peak FLOP/s")
    p.add_argument("--profile-all", action="store_true", help="profile SDPA in every configuration")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    args.steps = max(1, args.steps)
    if args.warmup is None:
        args.warmup = 3 if args.device.startswith("cuda") else 1
    deadline = t_start + args.budget_s
    device = torch.device(args.device)
    s = read_settings(args.recipe, args.ds_config)
    preset = args.preset or s["preset"]
    drop = s["drop_path_rate"] if args.drop_path is None else args.drop_path
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    limit_name = _set_recompile_limit(args.recompile_limit)
    notes = []
    torch.manual_seed(args.seed)
    meta = build_model(preset, device="meta", drop_path_rate=drop)
    cfg = meta.cfg
    text_len = min(args.text_len or s["text_len"], cfg.max_text_len)
    pair_len = min(args.pair_text_len or s["pair_text_len"], cfg.max_text_len)
    if (text_len, pair_len) != (args.text_len or s["text_len"], args.pair_text_len or s["pair_text_len"]):
        notes.append(f"text lengths cut to the preset's max_text_len {cfg.max_text_len}")
    mix = s["batch"]
    cpu_batch = synthetic_batch(
        cfg, s, mix["images"], mix["texts"], mix["pairs"], text_len, pair_len, args.seed
    )
    shapes = seq_lengths(cfg, cpu_batch)
    stats = MaskedDataModeling(meta).batch_stats(cpu_batch)  # host numbers only: the meta model will do
    peak = device_peak_flops(device, args.peak_flops)
    if args.peak_flops:
        peak_source = "--peak-flops"
    elif peak:
        key = next(k for k in PEAK_FLOPS if k in torch.cuda.get_device_name(device))
        peak_source = f"beit3.engine.metrics.PEAK_FLOPS[{key!r}]"
    else:
        peak_source = "no PEAK_FLOPS entry for this device: MFU not computed"
    # none, the recipe's choice, and full recomputation for comparison (one setting once)
    ckpts = args.grad_ckpt or list(dict.fromkeys(["none", s["grad_checkpointing"], "all:attention", "all"]))
    record = {
        "script": "bench/gpu_giant.py",
        "command": " ".join(["python", "bench/gpu_giant.py", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": args.budget_s,
        "elapsed_s": 0.0,
        "environment": environment(device),
        "peak_tflops": peak / 1e12 if peak else None,
        "peak_source": peak_source,
        "settings": {**s, "betas": list(s["betas"])},
        "model": {
            "preset": preset,
            "depth": cfg.depth,
            "drop_path_rate": drop,
            "params_total": count_parameters(meta)["total"],
        },
        "batch": {
            **mix,
            "text_len": text_len,
            "pair_text_len": pair_len,
            "masked_patches": sum(
                int(b["image_mask"].sum()) for b in cpu_batch.values() if "image_mask" in b
            ),
            "masked_text": sum(
                int(b["text_labels"].ne(-100).sum()) for b in cpu_batch.values() if "text_labels" in b
            ),
            "sequence_lengths": {k: t for k, (_, t) in shapes.items()},
            "samples": stats["samples"],
            "tokens": stats["tokens"],
            "model_tflop": stats["flops"] / 1e12,
            "batch_stats": stats,
        },
        "compile": {
            "backend": backend,
            "scope": "each layer's forward_packed",
            limit_name: args.recompile_limit,
        },
        "method": [
            "step = forward+backward (MaskedDataModeling over forward_mixed: one pass per micro-batch) then "
            "the optimizer step, each timed between torch.cuda.synchronize calls; medians over the timed "
            f"steps after {args.warmup} warm-up steps",
            "MFU = model FLOPs (task.batch_stats, beit3.model.flops; recomputation not counted) / time / "
            "peak; HFU adds the task's batch_stats recompute_flops (what eager torch recomputes for the "
            "configuration's checkpointed layers and part; under torch.compile an estimate)",
            "inputs synthetic: normalised random images, random ordinary ids with BOS/EOS and BERT "
            "corruption, exact-count random patch masks at the recipe's ratios (the block shape does not "
            "change the cost: mask tokens are substituted), random visual-token codes as targets; the frozen "
            "visual tokenizer, the loader and the host-to-device copy are outside the measured step; the "
            "batch lives on the device",
            "compiled: torch.compile(dynamic=False) of every layer's forward_packed "
            "(BEiT3Model.compile_layers, as [model] compile = 'layers'); stochastic depth's masks and keep "
            "probability come in as tensors so layers share graphs; compile s = first step - median step; "
            "dynamo state reset before each compiled configuration",
            "SDPA observed: aten attention ops in one profiled forward+backward, matched to sub-batches by "
            "sequence length; 'runs alone': forward+backward under torch.nn.attention.sdpa_kernel([backend])",
            "peak memory: torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps "
            "(weights, gradients, optimizer states and activations)",
        ],
        "sdpa_probe": [],
        "configs": [],
        "notes": notes,
    }

    def save():
        record["elapsed_s"] = time.perf_counter() - t_start
        write_results(record, args.out, args.name)

    print(
        f"{record['environment']['device']}: {preset}, {stats['flops'] / 1e12:.4g} TFLOP per step", flush=True
    )
    record["sdpa_probe"] = sdpa_probe(cfg, shapes, torch.bfloat16, device)
    save()
    last_cost = {"eager": None, "compiled": None}
    for precision in args.precision:
        torch.manual_seed(args.seed)
        model = build_model(preset, device=device, drop_path_rate=drop)
        task = MaskedDataModeling(model, weight_decay=s["weight_decay"]).to(device)
        if precision == "bf16-master":
            task.to(torch.bfloat16)
        task.train()
        opt = Optimizer(task, precision, s, fused=device.type == "cuda")
        record.setdefault("optimizer", {})[precision] = opt.describe
        batch = task.prepare_batch(cpu_batch, device)
        profiled = set()
        for mode in args.modes:
            for spec in ckpts:
                row = {
                    "label": f"{precision} / {mode} / checkpointing {spec}",
                    "precision": precision,
                    "compile": mode == "compiled",
                    "compile_backend": backend if mode == "compiled" else None,
                    "grad_ckpt": spec,
                    "status": "ok",
                    "peak_flops": peak,
                    "notes": [],
                }
                record["configs"].append(row)
                left = deadline - time.perf_counter()
                estimate = last_cost[mode] or (args.compile_estimate_s if mode == "compiled" else 0.0)
                if left < estimate:
                    row["status"] = "skipped"
                    row["notes"].append(
                        f"skipped: {left:.0f} s of the budget left, about {estimate:.0f} s needed"
                    )
                    save()
                    print(summary(row), flush=True)
                    continue
                t0 = time.perf_counter()
                layers, part = checkpoint_setting(spec, cfg.depth)
                model.set_grad_checkpointing(layers is not None, layers, part=part)
                row["checkpointed_layers"] = len(layers or [])
                row["checkpoint_part"] = part
                # what eager torch recomputes for this setting (the objective's own figure)
                row["recompute_flops"] = task.batch_stats(cpu_batch).get("recompute_flops", 0.0)
                if mode == "compiled":
                    torch._dynamo.reset()
                    from torch._dynamo.utils import counters

                    counters.clear()
                    compile_layers(model, backend)
                else:
                    uncompile_layers(model)
                try:
                    run_fwd_bwd = measure(task, opt, batch, stats, row, args, deadline, device)
                    if mode == "compiled":
                        row.update(dynamo_counts())
                        if row["graphs"] >= args.recompile_limit:
                            row["notes"].append(
                                f"{row['graphs']} graphs reached the recompile limit: later layers may "
                                "run eager"
                            )
                    if (args.profile_all or mode not in profiled) and time.perf_counter() < deadline:
                        row["sdpa_observed"] = observed_sdpa(run_fwd_bwd, shapes, device)
                        profiled.add(mode)
                        for p in task.parameters():
                            p.grad = None
                except torch.cuda.OutOfMemoryError as e:
                    row["status"] = "out of memory"
                    row["notes"].append(str(e).split("\n")[0][:200])
                    for p in task.parameters():
                        p.grad = None
                except Exception as e:  # one configuration failing must not lose the others
                    traceback.print_exc()
                    row["status"] = "error"
                    row["notes"].append(
                        f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                    )
                    for p in task.parameters():
                        p.grad = None
                # the next configuration of this mode: the same work, a compile from a warm cache
                last_cost[mode] = time.perf_counter() - t0 - 0.5 * (row.get("compile_s") or 0.0)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                save()
                print(summary(row), flush=True)
        del task, model, opt, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print(f"wrote {args.out / (args.name + '.md')} and .json in {record['elapsed_s']:.1f} s")
    return 0 if all(c["status"] in ("ok", "skipped") for c in record["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
