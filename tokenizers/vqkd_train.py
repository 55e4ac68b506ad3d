"""Training a VQ-KD tokenizer against a frozen teacher (plain PyTorch; DDP on gloo/NCCL for several ranks).

The recipe follows BEiT v2 (TOKENIZER.md): AdamW betas (0.9, 0.99), weight decay 1e-4, linear warmup then
cosine decay to ``min_lr``, loss = commitment + cosine reconstruction of the teacher's patch features.
Additions that make small runs reliable: spherical k-means codebook init on the first batch (rank 0,
broadcast), dead-code restarts from current encoder outputs, codebook usage metrics.

Two data modes. Cached (small sets, the CPU demo and tests): fixed views (a centred crop plus seeded random
crops per file), teacher features computed once and kept in memory. Online (``online=True``, ImageNet-size
sets): DataLoader workers decode fresh random crops and the teacher runs on every batch. Each rank reads a
disjoint shard of the views (cached) or of the files (online).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from beit3.tokenizers.images import find_images, fixed_views, load_rgb, random_resized_crop, to_tensor
from beit3.tokenizers.quantizer import all_reduce_sum, broadcast_from_rank0
from beit3.tokenizers.teachers import build_teacher
from beit3.tokenizers.vqkd import (
    VQKD,
    build_vqkd,
    cosine_reconstruction_loss,
    get_vqkd_config,
    save_vqkd_checkpoint,
)


class TrainConfigError(ValueError):
    """A training configuration that cannot work; the message names the fix."""


@dataclass
class VQKDTrainConfig:
    """Everything a run needs; ``overrides`` change the named tokenizer config (e.g. codebook_size)."""

    data: list[str]
    output_dir: str
    name: str = "vqkd_tiny_patch16_64"
    overrides: dict = field(default_factory=dict)
    teacher: str = "mobilenet_v2"
    teacher_weights: str | None = None
    steps: int = 200
    batch_size: int = 32  # per rank
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    views_per_image: int = 4  # cached mode: fixed views per image (a centred one + random crops)
    online: bool = False  # fresh random crops every step and the teacher on every batch (large datasets)
    precision: str = "fp32"  # "bf16": autocast the ViTs (task layers, quantizer and loss stay fp32)
    num_workers: int = 4  # online mode: DataLoader workers decoding images
    eval_images: int = 256  # online mode: centred views of this many images measure progress
    crop_scale: tuple[float, float] = (0.08, 1.0)
    kmeans_init: bool = True
    restart_every: int = 20  # steps between dead-code restarts (0: never)
    dead_fraction: float = 0.03  # a code is dead below this fraction of the mean EMA usage per code
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`TrainConfigError` naming the fix for values that cannot work."""
        if self.precision not in ("fp32", "bf16"):
            raise TrainConfigError(f"precision={self.precision!r}: use fp32 or bf16")
        get_vqkd_config(self.name, **self.overrides)
        for key in ("steps", "batch_size", "views_per_image", "log_every"):
            if getattr(self, key) < 1:
                raise TrainConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise TrainConfigError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps})")
        if not 0 < self.min_lr <= self.lr:
            raise TrainConfigError(f"min_lr={self.min_lr} must be in (0, lr={self.lr}]")


def lr_at(step: int, cfg: VQKDTrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, cosine to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Used codes, their share of the codebook, and the perplexity exp(H) of the code histogram."""
    total = counts.sum().clamp(min=1)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    used = int((counts > 0).sum())
    return {
        "used_codes": used,
        "usage_pct": 100.0 * used / counts.numel(),
        "perplexity": float(entropy.exp()),
    }


@torch.no_grad()
def evaluate(
    model: VQKD, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 128
) -> dict[str, float]:
    """Reconstruction loss and code usage over a fixed set (eval mode; the codebook does not move)."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.cfg.codebook_size)
    rec_sum, n = 0.0, 0
    device = next(model.parameters()).device
    for x, t in zip(images.split(batch_size), targets.split(batch_size)):
        x, t = x.to(device), t.to(device)
        z = model.encode(x)
        ids = model.quantize.lookup(z)
        z_q = model.quantize.embedding(ids)
        rec = model.decode(z_q, (x.shape[-2] // model.cfg.patch_size, x.shape[-1] // model.cfg.patch_size))
        rec_sum += float(cosine_reconstruction_loss(rec, t)) * len(x)
        n += len(x)
        counts += torch.bincount(ids.flatten().cpu(), minlength=counts.numel()).float()
    model.train(was_training)
    return {"loss_rec": rec_sum / max(n, 1), **codebook_usage(counts)}


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class CachedViews:
    """Fixed views with cached teacher features; batches drawn at random without replacement."""

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
        self.views, self.targets = views, targets
        self.rng = np.random.default_rng(seed)

    def next(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of images (B, 3, S, S) in [0, 1] and their teacher features (B, h*w, dim) on ``device``."""
        idx = torch.from_numpy(
            self.rng.choice(len(self.views), min(batch_size, len(self.views)), replace=False)
        )
        return self.views[idx].to(device), self.targets[idx].to(device)


class _RandomCrops(torch.utils.data.Dataset):
    """Item ``(epoch, i)``: a random-resized crop of file ``i`` drawn from a generator seeded by
    (seed, epoch, i), so a run gives the same crops whatever the number of workers."""

    def __init__(self, paths: list[Path], size: int, scale: tuple[float, float], seed: int) -> None:
        self.paths, self.size, self.scale, self.seed = paths, size, scale, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        rng = np.random.default_rng((self.seed, epoch, i))
        return to_tensor(random_resized_crop(load_rgb(self.paths[i]), self.size, rng, self.scale))


class _EndlessShuffle(torch.utils.data.Sampler):
    """(epoch, index) keys forever, a fresh seeded permutation each epoch: one DataLoader (and one set of
    workers) serves the whole run however small the dataset."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self):
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            yield from ((epoch, int(i)) for i in torch.randperm(self.n, generator=g))
            epoch += 1


class OnlineCrops:
    """Random crops decoded by DataLoader workers; the teacher runs on every batch (large datasets)."""

    def __init__(self, paths, size, cfg: VQKDTrainConfig, teacher: torch.nn.Module, seed: int) -> None:
        data = _RandomCrops(paths, size, cfg.crop_scale, seed)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=cfg.batch_size,
            sampler=_EndlessShuffle(len(data), seed),
            num_workers=cfg.num_workers,
        )
        self._iter = iter(loader)
        self.teacher = teacher

    def next(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of images (B, 3, S, S) in [0, 1] and their teacher features (B, h*w, dim) on ``device``."""
        x = next(self._iter).to(device, non_blocking=True)
        return x, self.teacher(x)


@torch.no_grad()
def teacher_features(teacher: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Teacher features (N, h*w, dim) of fixed views, computed in chunks and kept on the CPU."""
    return torch.cat([teacher(chunk.to(device)).cpu() for chunk in images.split(64)])


def ranks_agree(t: torch.Tensor) -> float:
    """Largest absolute difference between this rank's tensor and rank 0's (0.0 when not distributed)."""
    ref = broadcast_from_rank0(t.detach().clone())
    diff = (t - ref).abs().max().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _batches(cfg: VQKDTrainConfig, model: VQKD, rank: int, world: int, device: torch.device):
    """(batch source, eval views, eval targets) for this rank."""
    teacher = build_teacher(cfg.teacher, cfg.teacher_weights).to(device)
    if teacher.dim != model.cfg.teacher_dim:
        raise TrainConfigError(
            f"teacher {cfg.teacher} gives {teacher.dim}-d features but {cfg.name} reconstructs "
            f"{model.cfg.teacher_dim}: pass --set teacher_dim={teacher.dim}"
        )
    size = model.cfg.img_size
    paths = find_images(cfg.data)
    if cfg.online:
        shard = paths[rank::world]
        if not shard:
            raise TrainConfigError(f"{world} ranks but only {len(paths)} images")
        eval_views = fixed_views(shard[: cfg.eval_images], size, 1, cfg.seed)
        source = OnlineCrops(shard, size, cfg, teacher, cfg.seed + 1000 * rank)
    else:
        views = fixed_views(paths, size, cfg.views_per_image, cfg.seed, cfg.crop_scale)[rank::world]
        if len(views) == 0:
            raise TrainConfigError(
                f"{world} ranks but only {len(paths)} images: add images or views_per_image"
            )
        eval_views = views
        source = None
    eval_targets = teacher_features(teacher, eval_views, device)
    if source is None:
        source = CachedViews(eval_views, eval_targets, cfg.seed + 1000 * rank)
    return source, eval_views, eval_targets


def build_optimizer(model: VQKD, cfg: VQKDTrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: group 0 decays, group 1 (biases, norms, tables) does not."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # BEiT v2 exempts biases, LayerNorm and the cls/position tables from weight decay.
    exempt = [p.ndim < 2 or n.endswith(("cls_token", "pos_embed")) for n, p in named]
    decay = [p for (_, p), e in zip(named, exempt) if not e]
    no_decay = [p for (_, p), e in zip(named, exempt) if e]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def train(cfg: VQKDTrainConfig) -> dict:
    """Run training; rank 0 writes ``checkpoint.pth`` ({"model": sd}), TensorBoard logs and ``summary.json``.

    Returns the summary: evaluation (reconstruction loss, used codes, perplexity) on this rank's evaluation
    views before and after training, and the codebook difference across ranks (0 when they agree).
    """
    cfg.validate()
    rank, world, device = _setup_distributed()
    out_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    model = build_vqkd(cfg.name, seed=cfg.seed, **cfg.overrides).to(device)
    source, eval_views, eval_targets = _batches(cfg, model, rank, world, device)
    before = evaluate(model, eval_views, eval_targets)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    opt = build_optimizer(model, cfg)
    params = [p for g in opt.param_groups for p in g["params"]]
    writer = SummaryWriter(str(out_dir / "tb")) if rank == 0 else None
    window = torch.zeros(model.cfg.codebook_size, device=device)
    t0 = time.time()
    for step in range(cfg.steps):
        x, t = source.next(cfg.batch_size, device)
        if step == 0 and cfg.kmeans_init:
            with torch.no_grad():
                model.quantize.init_from_kmeans(model.encode(x), seed=cfg.seed)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            out = ddp(x, t)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        window += all_reduce_sum(torch.bincount(out["ids"].flatten(), minlength=window.numel()).float())
        restarted = 0
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < cfg.steps:
            threshold = cfg.dead_fraction * float(model.quantize.cluster_size.mean())
            restarted = model.quantize.restart_dead_codes(out["z"], threshold, seed=step)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            _log(writer, step + 1, out, window, restarted, lr_at(step, cfg), time.time() - t0, rank)
            window.zero_()
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and rank == 0:
            save_vqkd_checkpoint(model, out_dir / "checkpoint.pth", step=step + 1, overrides=cfg.overrides)
    after = evaluate(model, eval_views, eval_targets)
    summary = {
        "config": asdict(cfg),
        "world_size": world,
        "before": before,
        "after": after,
        "codebook_rank_max_diff": ranks_agree(model.quantize.embedding.weight),
        "train_seconds": time.time() - t0,
    }
    if rank == 0:
        save_vqkd_checkpoint(model, out_dir / "checkpoint.pth", step=cfg.steps, overrides=cfg.overrides)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        writer.close()
    return summary


def _log(writer, step, out, window, restarted, lr, elapsed, rank) -> None:
    usage = codebook_usage(window.cpu())
    scalars = {
        "loss/total": float(out["loss"].detach()),
        "loss/rec": float(out["loss_rec"].detach()),
        "loss/quant": float(out["loss_quant"].detach()),
        "codebook/used_codes": usage["used_codes"],
        "codebook/usage_pct": usage["usage_pct"],
        "codebook/perplexity": usage["perplexity"],
        "codebook/restarted": restarted,
        "optim/lr": lr,
    }
    if rank != 0:
        return
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    print(
        f"step {step} loss {scalars['loss/total']:.4f} rec {scalars['loss/rec']:.4f} "
        f"used {usage['used_codes']} ppl {usage['perplexity']:.1f} restarted {restarted} "
        f"lr {lr:.2e} {elapsed:.1f}s",
        flush=True,
    )
