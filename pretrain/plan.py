"""Capacity planner (``beit3-plan``) and the per-GPU memory model it shares with ``bench/memory_at_scale.py``.

For a recipe (preset, batch mix, text lengths, checkpointing, steps), a GPU type, a cluster shape and a
DeepSpeed config, :func:`plan` projects per GPU and step (docs/performance.md, "Capacity planner"):

* **memory**: model states by ZeRO stage (:func:`model_state_bytes`: partitions and ZeRO's working buffers
  from the JSON) plus activations (:func:`activation_bytes` over an :class:`ActivationModel`: the bytes
  autograd saves per layer and outside the layers; :func:`estimate_activations` models them from the widths,
  the bench measures them), times :data:`MARGIN` for allocator fragmentation and workspaces;
* **compute**: the model's training FLOPs (``beit3.model.flops.training_flops`` at the recipe's padded text
  lengths) plus what activation checkpointing recomputes (``checkpoint_recompute_flops``: the forward of
  the checkpointed layers, or of their attention or FFN branch), executed at the stated utilisation ``--mfu``;
* **communication**: a byte model of ZeRO's collectives (:func:`collectives`), ring algorithms, the bytes
  that cross a node's network interfaces against the per-node bandwidth and the rest against NVLink;
* **step**: compute plus the communication that does not hide behind ``--overlap`` of the compute time;
  the wall clock is the step time times the recipe's steps.

A setting whose memory does not fit is refused: one line naming the fix, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from beit3.engine.config_io import ConfigError
from beit3.engine.ds_config import EngineConfigError, load_ds_config, precision_of
from beit3.engine.metrics import DEVICE_MEMORY, NVLINK_BANDWIDTH, PEAK_FLOPS
from beit3.model import build_model, count_parameters
from beit3.model.config import ModelConfig
from beit3.model.flops import Pass, checkpoint_recompute_flops, training_flops
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.objective import gather_width
from beit3.pretrain.recipe import (
    grad_checkpoint_layers,
    grad_checkpoint_part,
    load_recipe,
    micro_batch_split,
)

GIB = 2**30
# Planned memory = estimate x MARGIN: allocator fragmentation, CUDA context, NCCL buffers and kernel
# workspaces are in no estimate (the saved-tensor bytes are exact for what they count).
MARGIN = 1.15
# Forward passes through the backbone per micro-batch. Under ZeRO-3 every pass gathers every layer again.
# The objective ran three (images, texts, pairs one after another) until issue 13 item 1 made it one
# layer-major pass; `--passes 3` plans the old step.
PASSES_PER_MICRO_BATCH = 1
# Communication hides behind at most this fraction of the compute time: prefetched gathers and bucketed
# reduce-scatters overlap the layers, the first gather and the last bucket (and the optimizer step) do not.
OVERLAP = 0.8
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "giant.toml"
# The giant's default DeepSpeed config (slurm/pretrain_giant.sbatch's): ZeRO-3 with hpZ over a node's 8 GPUs.
DEFAULT_DS_CONFIG = ROOT / "ds_configs" / "zero3_bf16_hpz.json"


class PlanError(PretrainError, ValueError):
    """A planned setting that cannot run (it does not fit memory, or an impossible cluster); names the fix."""


# ---------------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class ActivationModel:
    """Saved-activation bytes of one micro-batch: outside the layers (embeddings, final norm, heads and
    their losses at the masked positions), per layer without checkpointing, per checkpointed layer (its
    input), and of ``layer`` what its attention branch (pre-LN to output projection, the layer's input
    included) and its FFN branch (final LN to ``fc2``, its input included) save: recomputing one branch
    keeps the other's bytes and the branch's input (0: not modelled)."""

    base: float
    layer: float
    checkpointed_layer: float
    attention: float = 0.0
    ffn: float = 0.0

    def per_layer(self, part: str) -> float:
        """Bytes a layer checkpointed with ``part`` (``"layer"``, ``"attention"``, ``"ffn"``) saves."""
        kept = {"layer": 0.0, "attention": self.ffn, "ffn": self.attention}[part]
        return self.checkpointed_layer + kept

    def recomputed(self, part: str) -> float:
        """Bytes of one recomputed part, live in the backward while its gradient is computed."""
        return {"layer": self.layer, "attention": self.attention, "ffn": self.ffn}[part]


def activation_bytes(act: ActivationModel, depth: int, checkpointed: int, part: str = "layer") -> float:
    """Peak activation bytes of a micro-batch with ``checkpointed`` of ``depth`` layers recomputed
    (``part`` of each): what the forward saves, plus, when any layer is checkpointed, the full activations
    of one recomputed part (its recompute in the backward is live while its gradient is computed)."""
    if not checkpointed:
        return act.base + depth * act.layer
    saved = (depth - checkpointed) * act.layer + checkpointed * act.per_layer(part)
    return act.base + saved + act.recomputed(part)


def estimate_activations(
    cfg: ModelConfig,
    images: int,
    texts: int,
    pairs: int,
    text_len: int,
    pair_text_len: int,
    predicted_text: float,
    predicted_patches: float,
    dtype_bytes: int = 2,
) -> ActivationModel:
    """The saved bytes of the Multiway layer, counted per token (checked against the measured bytes in
    ``tests/test_plan.py`` and ``bench/memory_at_scale.py``).

    The model runs a micro-batch in one pass of packed rows (``BEiT3.forward_mixed``). A layer saves, per
    token, 10 vectors of width d (the attention LayerNorm's input and output; q, k and v; each sequence's
    attention output and their packed copy, the sub-LN's input; the sub-LN's output; the FFN LayerNorm's
    input and output) and 3 of the FFN width (fc1's output, GELU's output, the sub-LN's output), in the
    activation dtype; for an image-text pair's tokens 3 more of width d (its vision and text rows lie in
    different expert groups, so its q, k and v are gathered into a copy for its attention); the attention's
    log-sum-exp (fp32 per head) and four LayerNorms' mean and rstd (fp32). A checkpointed layer keeps its
    input only. Of these the attention branch saves 8 vectors of width d (and the pair tokens' 3), the
    log-sum-exp and two LayerNorms' statistics; the FFN branch 2 of width d, the 3 of the FFN width and two
    LayerNorms' statistics. ``predicted_text`` / ``predicted_patches``: the rows each head is applied to,
    the objective's fixed-size gathers (:func:`gathered_rows`). Outside the
    layers: the final norm's input and statistics per token, the text ids, each image's pixels (the patch
    projection's weight gradient), and at each masked position the head's input, its index and the fp32
    log-softmax of the logits.
    """
    d, f, a = cfg.embed_dim, cfg.ffn_dim, dtype_bytes
    text_tokens = texts * text_len + pairs * pair_text_len
    tokens = (images + pairs) * cfg.num_vision_tokens + text_tokens
    per_token = a * (10 * d + 3 * f) + 4 * cfg.num_heads + 4 * 2 * 4
    pair_tokens = pairs * (cfg.num_vision_tokens + pair_text_len)
    pixels = (images + pairs) * a * cfg.in_chans * cfg.img_size**2
    heads = predicted_text * (4 * cfg.vocab_size + a * d + 8) + predicted_patches * (
        4 * cfg.visual_vocab_size + a * d + 8
    )
    base = tokens * (a * d + 8) + 8 * text_tokens + pixels + heads
    layer = tokens * per_token + pair_tokens * 3 * a * d
    ffn = tokens * (a * (2 * d + 3 * f) + 2 * 2 * 4)
    return ActivationModel(
        base=base, layer=layer, checkpointed_layer=tokens * a * d, attention=layer - ffn, ffn=ffn
    )


def gathered_rows(samples: int, per_row: float, length: int) -> int:
    """Rows a prediction head sees for ``samples`` sequences of ``length`` positions with ``per_row`` of
    them predicted: the objective gathers K rows per sequence, the largest count rounded up to 8 (at most
    ``length``; ``beit3.pretrain.objective.masked_positions``); the mean count stands for the largest."""
    if not samples or per_row <= 0:
        return 0
    return samples * gather_width([math.ceil(per_row)], length)


def _param_bytes(ds: dict) -> int:
    return 4 if precision_of(ds) == "fp32" else 2


def persistent_parameters(model, ds: dict) -> int:
    """Parameters ZeRO-3 never partitions away: each tensor under ``stage3_param_persistence_threshold``
    elements (DeepSpeed's default 1e5) while their sum stays under ``model_persistence_threshold``. They
    stay gathered on every GPU, so the forward and backward gathers skip them. 0 below stage 3."""
    z = ds.get("zero_optimization", {})
    if int(z.get("stage", 0)) < 3:
        return 0
    threshold = float(z.get("stage3_param_persistence_threshold", 1e5))
    budget = float(z.get("model_persistence_threshold", math.inf))
    total = 0
    for p in model.parameters():
        if p.numel() < threshold and total + p.numel() < budget:
            total += p.numel()
    return total


def model_state_bytes(params: int, gpus: int, ds: dict, persistent: int = 0) -> dict[str, float]:
    """Model states per GPU (bytes) under the DeepSpeed config ``ds``: partitions plus ZeRO's working set.

    Mixed precision keeps 16-bit weights, an fp32 master copy and two fp32 Adam moments (12 B/param);
    fp32 keeps the weights and two moments (8 B/param beside them). Gradients are accumulated in
    ``data_types.grad_accum_dtype`` (fp32: 4 B) or the weights' dtype. Stage 1 partitions the optimizer
    states over the GPUs, stage 2 the gradients too, stage 3 the weights too (plus its gathered-parameter
    working set, prefetch bucket and, with ZeRO++ ``zero_hpz_partition_size``, a secondary weight partition
    within the node, and a whole copy of the ``persistent`` parameters: :func:`persistent_parameters`).
    Buckets are DeepSpeed's defaults where the JSON does not set them.
    """
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    pb = _param_bytes(ds)
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    gb = 4 if accum == "fp32" or pb == 4 else 2
    opt = 8 if pb == 4 else 12
    dt = "fp32" if pb == 4 else "bf16" if precision_of(ds) == "bf16" else "fp16"
    gdt = "fp32" if gb == 4 else dt
    reduce_bucket = float(z.get("reduce_bucket_size", 5e8))
    rows: dict[str, float] = {}
    rows[f"{dt} parameter{' partition' if stage >= 3 else 's'}"] = pb * params / (gpus if stage >= 3 else 1)
    rows[f"gradient{' partition' if stage >= 2 else 's'} ({gdt})"] = gb * params / (gpus if stage >= 2 else 1)
    label = "fp32 Adam moments (8 B/param)" if pb == 4 else "fp32 master + Adam moments (12 B/param)"
    rows[label] = opt * params / (gpus if stage >= 1 else 1)
    if stage >= 3:
        live = float(z.get("stage3_max_live_parameters", 1e9))
        prefetch = float(z.get("stage3_prefetch_bucket_size", 5e7))
        if persistent:
            rows[f"persistent parameters ({dt}, whole)"] = pb * persistent
        rows[f"gathered parameters (max live, {dt})"] = pb * min(live, params - persistent)
        rows[f"prefetch bucket ({dt})"] = pb * prefetch
        hpz = int(z.get("zero_hpz_partition_size", 1))
        if hpz > 1:
            rows[f"secondary parameter partition (hpZ {hpz}, {dt})"] = pb * params / hpz
    elif stage >= 1:
        rows[f"all-gather bucket ({dt})"] = pb * float(z.get("allgather_bucket_size", 5e8))
    rows["reduce bucket (fp32 worst case)"] = 4 * reduce_bucket
    return rows


# ---------------------------------------------------------------------------------------------------------
# Communication


@dataclass(frozen=True)
class Collective:
    """``count`` ring collectives per step, each over ``bytes`` in all, in groups of ``group`` GPUs (a
    fractional count: a measured share of the modelled gathers)."""

    name: str
    bytes: float
    group: int
    count: float

    def per_gpu(self) -> float:
        """Bytes each GPU sends (and receives) per step: (n - 1) / n of the total per collective."""
        return self.count * self.bytes * (self.group - 1) / self.group


def collectives(
    params: int,
    ds: dict,
    gpus: int,
    passes: int = PASSES_PER_MICRO_BATCH,
    micro_batches: int = 1,
    persistent: int = 0,
    gathered_x: float | None = None,
) -> list[Collective]:
    """ZeRO's collectives of one optimizer step of ``micro_batches`` micro-batches of ``passes`` forward
    passes each.

    * stage 3: every pass all-gathers the weights in its forward and again in its backward (an upper bound:
      DeepSpeed keeps some within ``stage3_max_reuse_distance``); every micro-batch's backward
      reduce-scatters the gradients. With ``zero_hpz_partition_size`` h the backward gathers from the
      secondary partition, within groups of h GPUs. The ``persistent`` parameters are never gathered (their
      gradients are reduce-scattered with the rest). ``gathered_x``: the measured weight bytes gathered per
      micro-batch, as a multiple of the gathered weights' bytes (``bench/zero_comm.py``), instead of
      ``2 x passes``; half of it is counted in the forward, half in the backward. ZeRO++
      ``zero_quantized_weights`` sends the forward gathers in int8 (1 B/param), ``zero_quantized_gradients``
      the reduce-scatters in int4.
    * stage 1-2: an all-reduce of the gradients (reduce-scatter + all-gather in bytes: DeepSpeed 0.19.8
      all-reduces its gradient buckets, ``use_multi_rank_bucket_allreduce``, as bench/zero_comm.py measured),
      per micro-batch in stage 2 (reduced in the backward), once per step in stage 1, then one all-gather of
      the updated weights per step: 3x the weight bytes per step at one micro-batch.
    * stage 0: one all-reduce of the gradients per step.

    Gradients travel in ``communication_data_type`` if the JSON sets it, else in the weights' dtype.
    """
    z = ds.get("zero_optimization", {})
    stage = int(z.get("stage", 0))
    pb = _param_bytes(ds)
    comm = ds.get("communication_data_type")
    gb = {"fp32": 4, "fp16": 2, "bf16": 2}.get(str(comm).lower(), pb) if comm else pb
    weights, grads = params * pb, params * gb
    if stage >= 3:
        hpz = int(z.get("zero_hpz_partition_size", 1))
        gathered = params - persistent
        fwd = gathered * (1 if z.get("zero_quantized_weights") else pb)
        rs = params * 0.5 if z.get("zero_quantized_gradients") else grads
        n = passes * micro_batches if gathered_x is None else gathered_x / 2 * micro_batches
        return [
            Collective("parameter all-gather, forward", fwd, gpus, n),
            Collective(
                "parameter all-gather, backward", gathered * pb, min(hpz, gpus) if hpz > 1 else gpus, n
            ),
            Collective("gradient reduce-scatter", rs, gpus, micro_batches),
        ]
    reduce = Collective("gradient all-reduce", 2 * grads, gpus, micro_batches if stage == 2 else 1)
    return [reduce, Collective("updated parameter all-gather", weights, gpus, 1)] if stage >= 1 else [reduce]


def collective_seconds(c: Collective, gpus_per_node: int, node_bandwidth: float, nvlink: float) -> float:
    """Time of ``c`` with rings laid out node by node: a ring that spans nodes carries each GPU's
    (n - 1) / n share through every node's network interfaces (``node_bandwidth`` bytes/s per node, all
    its rings together) and through NVLink, whichever is slower; a group within one node uses NVLink only."""
    volume = c.per_gpu()
    if c.group <= 1:
        return 0.0
    if c.group > gpus_per_node:
        return volume / min(node_bandwidth, nvlink)
    return volume / nvlink


def crosses_nodes(c: Collective, gpus_per_node: int) -> bool:
    """Whether the collective's groups span more than one node."""
    return c.group > gpus_per_node


# ---------------------------------------------------------------------------------------------------------
# The plan


@dataclass
class Plan:
    """Everything :func:`plan` projects (bytes, seconds, FLOPs per GPU and optimizer step)."""

    model: str
    params: int
    gpu: str
    gpus: int
    gpus_per_node: int
    gbps: float
    ds_config: str
    stage: int
    precision: str
    checkpointed: int
    depth: int
    checkpoint_part: str
    micro_batch: dict
    micro_batches: int
    text_len: int
    pair_text_len: int
    passes: int
    mfu: float
    overlap: float
    steps: int
    states: dict[str, float] = field(default_factory=dict)
    activations: float = 0.0
    memory: float = 0.0
    memory_limit: float = 0.0
    model_work: float = 0.0
    recompute_work: float = 0.0
    compute_s: float = 0.0
    comm: list[dict] = field(default_factory=list)
    comm_s: float = 0.0
    exposed_comm_s: float = 0.0
    step_s: float = 0.0

    @property
    def fits(self) -> bool:
        return self.memory * MARGIN <= self.memory_limit

    @property
    def days(self) -> float:
        return self.step_s * self.steps / 86400

    @property
    def step_mfu(self) -> float:
        """Model FLOPs over the step time and the peak: the MFU the run would log."""
        return self.model_work / self.step_s / PEAK_FLOPS[gpu_family(self.gpu)]

    @property
    def inter_node_bytes(self) -> float:
        """Bytes through each node's network interfaces per step."""
        return sum(c["per_gpu_bytes"] for c in self.comm if c["crosses_nodes"])


def gpu_family(gpu: str) -> str:
    """The PEAK_FLOPS / NVLINK_BANDWIDTH key of a DEVICE_MEMORY variant (``A100-40GB`` -> ``A100``)."""
    return gpu.split("-")[0]


def checkpointed_layers(spec: str, depth: int) -> int:
    """Number of layers a recipe's ``grad_checkpointing`` value recomputes."""
    layers = grad_checkpoint_layers(spec, depth)
    return len(layers) if layers else 0


def plan(
    recipe_path: str | Path = DEFAULT_RECIPE,
    gpu: str = "A100-40GB",
    gpus: int = 256,
    gpus_per_node: int = 8,
    gbps: float = 400.0,
    ds_config: str | Path = DEFAULT_DS_CONFIG,
    checkpointing: str | None = None,
    checkpointing_part: str | None = None,
    mfu: float = 0.45,
    passes: int = PASSES_PER_MICRO_BATCH,
    overlap: float = OVERLAP,
    steps: int | None = None,
    overrides: list[str] | None = None,
    micro_batch: int | None = None,
    gathered_x: float | None = None,
) -> Plan:
    """Project memory and time per GPU and step; raises :class:`PlanError` (or the recipe's / DeepSpeed
    config's error) for a setting that cannot be planned. Memory that does not fit is reported in
    :attr:`Plan.fits`, not raised (:func:`main` refuses it)."""
    if gpu not in DEVICE_MEMORY:
        raise PlanError(f"unknown GPU {gpu!r}: use one of {', '.join(DEVICE_MEMORY)}")
    if gpus < 1 or gpus_per_node < 1 or (gpus > gpus_per_node and gpus % gpus_per_node):
        raise PlanError(f"--gpus {gpus} is not a whole number of nodes of {gpus_per_node}")
    if not 0 < mfu <= 1 or not 0 <= overlap <= 1 or passes < 1 or gbps <= 0 or (gathered_x or 0) < 0:
        raise PlanError(
            "--mfu must lie in (0, 1], --overlap in [0, 1], --passes >= 1, --gbps > 0 and --gathered-x >= 0"
        )
    recipe = load_recipe(recipe_path, overrides)
    global_batch = recipe.train.global_batch_size  # the recipe's, as beit3-pretrain keeps it
    batch_keys = {"train_batch_size": global_batch, "gradient_accumulation_steps": None}
    if micro_batch is not None:
        batch_keys["train_micro_batch_size_per_gpu"] = micro_batch
    ds = load_ds_config(ds_config, gpus, batch_keys)
    micro = int(ds["train_micro_batch_size_per_gpu"])
    micro_batches = int(ds["gradient_accumulation_steps"])
    split = micro_batch_split(recipe, micro)
    r = recipe.model
    meta = build_model(r.name, device="meta", **r.overrides)
    cfg = meta.cfg
    params = count_parameters(meta)["total"]
    persistent = persistent_parameters(meta, ds)
    spec = checkpointing if checkpointing is not None else r.grad_checkpointing
    part = grad_checkpoint_part(checkpointing_part or r.grad_checkpointing_part)
    layers = grad_checkpoint_layers(spec, cfg.depth) or []
    ckpt = len(layers)
    d = recipe.data
    text_len, pair_len = d.text_max_len, d.pair_text_max_len
    images, texts, pairs = split["images"], split["texts"], split["pairs"]
    patches = round(d.image_mask_ratio * cfg.num_patches) * images
    patches += round(d.pair_image_mask_ratio * cfg.num_patches) * pairs
    predicted_text = d.text_mask_ratio * text_len * texts + d.pair_text_mask_ratio * pair_len * pairs
    np_ = cfg.num_patches
    head_text = gathered_rows(texts, d.text_mask_ratio * text_len, text_len)
    head_text += gathered_rows(pairs, d.pair_text_mask_ratio * pair_len, pair_len)
    head_patches = gathered_rows(images, round(d.image_mask_ratio * np_), np_)
    head_patches += gathered_rows(pairs, round(d.pair_image_mask_ratio * np_), np_)
    act = estimate_activations(
        cfg, images, texts, pairs, text_len, pair_len, head_text, head_patches, _param_bytes(ds)
    )
    p = Plan(
        model=r.name,
        params=params,
        gpu=gpu,
        gpus=gpus,
        gpus_per_node=gpus_per_node,
        gbps=gbps,
        ds_config=_shown(ds_config),
        stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
        precision=precision_of(ds),
        checkpointed=ckpt,
        depth=cfg.depth,
        checkpoint_part=part,
        micro_batch=split,
        micro_batches=micro_batches,
        text_len=text_len,
        pair_text_len=pair_len,
        passes=passes,
        mfu=mfu,
        overlap=overlap,
        steps=steps if steps is not None else recipe.train.total_steps,
    )
    p.states = model_state_bytes(params, gpus, ds, persistent)
    p.activations = activation_bytes(act, cfg.depth, ckpt, part)
    p.memory = sum(p.states.values()) + p.activations
    p.memory_limit = DEVICE_MEMORY[gpu]
    passes_list = [Pass(images, image=True), Pass(texts, text_len=text_len), Pass(pairs, True, pair_len)]
    p.model_work = micro_batches * training_flops(cfg, passes_list, round(predicted_text), patches)
    drop_path = r.drop_path_rate > 0  # the recipe's rate, as beit3-pretrain builds the model
    recompute = checkpoint_recompute_flops(cfg, passes_list, layers, part, drop_path)
    p.recompute_work = micro_batches * recompute
    family = gpu_family(gpu)
    p.compute_s = (p.model_work + p.recompute_work) / (mfu * PEAK_FLOPS[family])
    node_bw, nvlink = gbps * 1e9 / 8, NVLINK_BANDWIDTH[family]
    for c in collectives(params, ds, gpus, passes, micro_batches, persistent, gathered_x):
        t = collective_seconds(c, gpus_per_node, node_bw, nvlink)
        p.comm.append(
            {
                "name": c.name,
                "count": c.count,
                "group": c.group,
                "per_gpu_bytes": c.per_gpu(),
                "crosses_nodes": crosses_nodes(c, gpus_per_node),
                "seconds": t,
            }
        )
    p.comm_s = sum(c["seconds"] for c in p.comm)
    p.exposed_comm_s = max(0.0, p.comm_s - overlap * p.compute_s)
    p.step_s = p.compute_s + p.exposed_comm_s
    return p


def _shown(path: str | Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def refusal(p: Plan, **settings) -> str:
    """The one-line reason a non-fitting plan is refused, naming the first change that makes it fit."""
    need = f"{p.memory * MARGIN / GIB:.1f} GiB per GPU (with the {MARGIN - 1:.0%} margin)"
    head = f"{need} does not fit the {p.gpu}'s {p.memory_limit / GIB:.0f} GiB"
    tries = []
    if p.checkpointed < p.depth:
        tries.append(("--checkpointing all", {"checkpointing": "all"}))
    if p.checkpoint_part != "layer":
        change = {"checkpointing": "all", "checkpointing_part": "layer"}
        tries.append(("--checkpointing all --checkpointing-part layer", change))
    if p.stage < 3:
        tries.append((f"--ds-config {_shown(DEFAULT_DS_CONFIG)}", {"ds_config": DEFAULT_DS_CONFIG}))
    for flag, change in tries:
        try:
            other = plan(**{**settings, **change})
        except (PretrainError, ConfigError, EngineConfigError):
            continue
        if other.fits:
            return f"{head}: use {flag} ({other.memory * MARGIN / GIB:.1f} GiB)"
    return f"{head}: use a GPU with more memory or a smaller --micro-batch"


def format_plan(p: Plan) -> str:
    """The planner's report: memory per GPU, then time per step and the wall clock."""
    mb = p.micro_batch
    nodes = max(1, p.gpus // p.gpus_per_node)
    fam = gpu_family(p.gpu)
    W = 70  # column of the figures
    ckpt = (
        "none" if not p.checkpointed else "all" if p.checkpointed == p.depth else f"{p.checkpointed} layers"
    )
    if p.checkpointed and p.checkpoint_part != "layer":
        ckpt += f" ({p.checkpoint_part} only)"
    lines = [
        f"{p.model}: {p.params / 1e9:.2f}B parameters, {p.steps:,} steps; "
        f"{p.micro_batches} micro-batch(es) per GPU and step of {mb['images']} images, "
        f"{mb['texts']} texts of {p.text_len}, {mb['pairs']} pairs of 257+{p.pair_text_len} tokens",
        f"{p.gpus} x {p.gpu} ({nodes} node(s) of {min(p.gpus, p.gpus_per_node)}, {p.gbps:g} Gb/s per node, "
        f"NVLink {NVLINK_BANDWIDTH[fam] / 1e9:.0f} GB/s); {p.ds_config} (ZeRO-{p.stage}, {p.precision}); "
        f"activation checkpointing {ckpt}; {p.passes} forward pass(es) per micro-batch",
        "",
        "memory per GPU".ljust(W + 5) + "GiB",
        *[f"  {k:<{W - 2}} {v / GIB:7.3f}" for k, v in p.states.items()],
        f"  {'activations (one micro-batch)':<{W - 2}} {p.activations / GIB:7.3f}",
        f"  {'total':<{W - 2}} {p.memory / GIB:7.3f}",
        f"  {f'total +{MARGIN - 1:.0%} (device: {p.memory_limit / GIB:.1f})':<{W - 2}} "
        f"{p.memory * MARGIN / GIB:7.3f}  {'fits' if p.fits else 'DOES NOT FIT'}",
        "",
        "time per step".ljust(W + 7) + "s",
        f"  compute: {p.model_work / 1e12:.2f} TFLOP model + {p.recompute_work / 1e12:.2f} recomputed, "
        f"at {p.mfu:.0%} of {PEAK_FLOPS[fam] / 1e12:.0f} TFLOP/s".ljust(W)
        + f" {p.compute_s:7.3f}",
        *[
            f"  {c['name']} x{c['count']:g} ({c['per_gpu_bytes'] / 1e9:.2f} GB per GPU, "
            f"{'inter-node' if c['crosses_nodes'] else 'NVLink'})".ljust(W)
            + f" {c['seconds']:7.3f}"
            for c in p.comm
        ],
        f"  communication exposed (hidden: {p.overlap:.0%} of compute)".ljust(W)
        + f" {p.exposed_comm_s:7.3f}",
        f"  step (MFU {p.step_mfu:.1%})".ljust(W) + f" {p.step_s:7.3f}",
        "",
        f"wall clock for {p.steps:,} steps: {p.days:.2f} days "
        f"({p.step_s * p.steps * p.gpus / 3600:,.0f} GPU-hours); "
        f"{p.inter_node_bytes / (p.params * 2):.2f}x the bf16 parameter bytes cross each node per step",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="beit3-plan", description="Per-GPU memory, step time and wall clock of a pretraining recipe."
    )
    p.add_argument("--config", type=Path, default=DEFAULT_RECIPE, help="pretraining recipe (default: giant)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    p.add_argument("--gpu", default="A100-40GB", choices=list(DEVICE_MEMORY))
    p.add_argument("--gpus", type=int, default=256)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gbps", type=float, default=400.0, help="inter-node bandwidth per node, Gb/s")
    p.add_argument("--ds-config", type=Path, default=DEFAULT_DS_CONFIG)
    p.add_argument("--checkpointing", default=None, help="none, all, every:N (default: the recipe's)")
    p.add_argument(
        "--checkpointing-part",
        default=None,
        help="what each checkpointed layer recomputes: layer, attention, ffn (default: the recipe's)",
    )
    p.add_argument("--mfu", type=float, default=0.45, help="utilisation of the executed FLOPs")
    p.add_argument(
        "--passes", type=int, default=PASSES_PER_MICRO_BATCH, help="forward passes per micro-batch"
    )
    p.add_argument("--overlap", type=float, default=OVERLAP, help="share of compute that hides communication")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's total_steps")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the DeepSpeed config's")
    p.add_argument(
        "--gathered-x",
        type=float,
        default=None,
        help="ZeRO-3: weight bytes gathered per micro-batch as measured by bench/zero_comm.py, as a multiple "
        "of the weights' bytes (default: 2 x passes)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = {
        "recipe_path": args.config,
        "gpu": args.gpu,
        "gpus": args.gpus,
        "gpus_per_node": args.gpus_per_node,
        "gbps": args.gbps,
        "ds_config": args.ds_config,
        "checkpointing": args.checkpointing,
        "checkpointing_part": args.checkpointing_part,
        "mfu": args.mfu,
        "passes": args.passes,
        "overlap": args.overlap,
        "steps": args.steps,
        "overrides": args.set,
        "micro_batch": args.micro_batch,
        "gathered_x": args.gathered_x,
    }
    try:
        p = plan(**settings)
        if not p.fits:
            raise PlanError(refusal(p, **settings))
    except (PretrainError, ConfigError, EngineConfigError) as err:
        print(f"beit3-plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {k: v for k, v in vars(p).items()}
        out.update(fits=p.fits, days=p.days, step_mfu=p.step_mfu, inter_node_bytes=p.inter_node_bytes)
        print(json.dumps(out, indent=2, default=float))
    else:
        print(format_plan(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
