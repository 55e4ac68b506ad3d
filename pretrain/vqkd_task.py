"""VQ-KD tokenizer training as a task on the engine: the task module, its data streams and its evaluation.

The model (``beit3.tokenizers.vqkd.VQKD``) and its codebook care (spherical k-means init, dead-code restarts,
the all-reduced EMA) stay in ``beit3.tokenizers``; this module only says how the engine drives them:

* :class:`VQKDTask` follows ``beit3.engine.task``'s protocol. ``prepare_batch`` runs the frozen teacher
  under ``no_grad`` outside DeepSpeed (the teacher is not a submodule: never checkpointed, never wrapped),
  initialises the codebook by k-means on the first batch and re-seeds dead codes every ``restart_every``
  optimizer steps; ``forward`` returns the commitment + reconstruction loss and codebook-usage metrics. How
  far it has got (micro-batches seen, k-means done) is module state (``get_extra_state``), so it travels in
  the engine's checkpoints and a resumed run neither repeats the k-means nor shifts the restarts.
* :class:`CachedViews` (fixed views, teacher features computed once) and :class:`OnlineCrops` (fresh crops
  decoded by DataLoader workers, the teacher on every batch) are endless streams with ``state_dict`` /
  ``load_state_dict``: a resumed run draws exactly the batches the uninterrupted one would have.
* :func:`evaluate` measures reconstruction loss and code usage on fixed views, summed over ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from beit3.engine.workers import Workers, init_worker
from beit3.model import build_param_groups
from beit3.model.flops import transformer_flops
from beit3.tokenizers.images import load_rgb, random_resized_crop, to_tensor
from beit3.tokenizers.quantizer import all_reduce_sum, broadcast_from_rank0
from beit3.tokenizers.vqkd import VQKD, cosine_reconstruction_loss

AUTOCAST = ("none", "bf16")


def codebook_usage(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Used codes, their share of the codebook and the perplexity exp(H) of a code histogram (as tensors on
    the histogram's device, so that per-step metrics need no host sync)."""
    counts = counts.float()
    p = counts / counts.sum().clamp(min=1)
    entropy = -torch.where(p > 0, p * p.clamp(min=1e-30).log(), torch.zeros_like(p)).sum()
    used = (counts > 0).sum().float()
    return {"used_codes": used, "usage_pct": 100.0 * used / counts.numel(), "perplexity": entropy.exp()}


class VQKDTask(nn.Module):
    """The engine's view of VQ-KD training (``beit3.engine.task`` protocol).

    ``teacher`` maps images in [0, 1] to patch features; it is held outside the module tree. ``gas`` is the
    DeepSpeed config's gradient accumulation, so that ``restart_every`` counts optimizer steps.
    """

    def __init__(
        self,
        vqkd: VQKD,
        teacher: nn.Module | None,
        weight_decay: float,
        kmeans_init: bool = True,
        restart_every: int = 20,
        dead_fraction: float = 0.03,
        autocast: str = "none",
        gas: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if autocast not in AUTOCAST:
            raise ValueError(f"autocast={autocast!r}: use one of {', '.join(AUTOCAST)}")
        self.vqkd = vqkd
        self.__dict__["teacher"] = teacher  # frozen, outside DeepSpeed: not a submodule
        self.weight_decay, self.kmeans_init = weight_decay, kmeans_init
        self.restart_every, self.dead_fraction = restart_every, dead_fraction
        self.autocast, self.gas, self.seed = autocast, gas, seed
        self.micro_batches = 0  # micro-batches prepared in training mode (checkpointed: extra state)
        self.kmeans_done = not kmeans_init
        self.last_restarted = 0

    # ----- state that must survive a resume -----
    def get_extra_state(self) -> dict:
        return {"micro_batches": self.micro_batches, "kmeans_done": self.kmeans_done}

    def set_extra_state(self, state: dict) -> None:
        self.micro_batches = int(state["micro_batches"])
        self.kmeans_done = bool(state["kmeans_done"])

    # ----- the task protocol -----
    def prepare_batch(self, batch: dict, device: torch.device) -> dict:
        """Images to ``device``, teacher targets (cached, or computed here), then the codebook's care."""
        images = batch["images"].to(device, non_blocking=True)
        with torch.no_grad():
            if "targets" in batch:
                targets = batch["targets"].to(device, non_blocking=True)
            else:
                targets = self.teacher(images)
            if self.training:
                self._codebook_care(images)
        return {"images": images, "targets": targets}

    @torch.no_grad()
    def _codebook_care(self, images: torch.Tensor) -> None:
        """k-means on the first batch (rank 0's vectors, broadcast); dead-code restarts at the first
        micro-batch of every ``restart_every``-th optimizer step (rank 0's current encoder outputs)."""
        quantize = self.vqkd.quantize
        if not self.kmeans_done:
            quantize.init_from_kmeans(self._encode(images), seed=self.seed)
            self.kmeans_done = True
        step, first_micro = divmod(self.micro_batches, self.gas)
        self.last_restarted = 0
        if self.restart_every and step and first_micro == 0 and step % self.restart_every == 0:
            threshold = self.dead_fraction * float(quantize.cluster_size.mean())
            self.last_restarted = quantize.restart_dead_codes(self._encode(images), threshold, seed=step - 1)
        self.micro_batches += 1

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast == "bf16")

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast(images.device):
            return self.vqkd.encode(images)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Commitment + cosine reconstruction loss; code usage of the micro-batch over all ranks."""
        images, targets = batch["images"], batch["targets"]
        with self._autocast(images.device):
            out = self.vqkd(images, targets)
        counts = torch.bincount(out["ids"].flatten(), minlength=self.vqkd.cfg.codebook_size).float()
        usage = codebook_usage(all_reduce_sum(counts))
        metrics = {
            "loss/rec": out["loss_rec"].detach(),
            "loss/quant": out["loss_quant"].detach(),
            **{f"codebook/{k}": v for k, v in usage.items()},
            "codebook/restarted": float(self.last_restarted),
        }
        return out["loss"], metrics

    def param_groups(self) -> list[dict]:
        """AdamW groups (BEiT v2): no weight decay on biases, norms and the cls/position tables; the codebook
        is EMA-updated, never trained."""
        named = list(self.named_parameters())
        exempt = {name for name, _ in named if name.endswith(("cls_token", "pos_embed"))}
        groups = build_param_groups(named, depth=0, weight_decay=self.weight_decay, no_weight_decay=exempt)
        return sorted(groups, key=lambda g: g["weight_decay"] == 0.0)  # the decayed group first

    def batch_stats(self, batch: dict) -> dict:
        """Samples, code positions, and training FLOPs of encoder + decoder (6 N tokens + attention)."""
        n = int(batch["images"].shape[0])
        cfg = self.vqkd.cfg
        grid = (batch["images"].shape[-2] // cfg.patch_size) * (batch["images"].shape[-1] // cfg.patch_size)
        flops = 0.0
        for vit, dim, depth in (
            (self.vqkd.encoder, cfg.encoder_dim, cfg.encoder_depth),
            (self.vqkd.decoder, cfg.decoder_dim, cfg.decoder_depth),
        ):
            matrices = sum(p.numel() for p in vit.blocks.parameters() if p.ndim == 2)
            flops += transformer_flops(matrices, depth, dim, n, grid + 1)  # + CLS
        return {"samples": n, "tokens": n * grid, "flops": flops}


# ----- data streams -----


class CachedViews:
    """Fixed views with cached teacher features; endless batches drawn at random without replacement.

    The batch is ``{"images": (B, 3, S, S) in [0, 1], "targets": (B, h*w, dim)}`` on the CPU. An engine data
    source (:mod:`beit3.engine.data_source`) without counters.
    """

    counter_names: tuple[str, ...] = ()

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int) -> None:
        self.views, self.targets, self.batch_size, self.seed = views, targets, batch_size, seed
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        while True:
            picked = self.rng.choice(len(self.views), min(self.batch_size, len(self.views)), replace=False)
            idx = torch.from_numpy(picked)
            yield {"images": self.views[idx], "targets": self.targets[idx]}

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]

    def start_at(self, micro_batches: int) -> None:
        """Draw from a generator seeded by (seed, micro_batches): fresh batches, not the first ones again."""
        self.rng = np.random.default_rng([self.seed, int(micro_batches)])

    def counters(self) -> dict[str, float]:
        return {}


class RandomCrops(torch.utils.data.Dataset):
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


class EndlessShuffle(torch.utils.data.Sampler):
    """(epoch, index) keys forever from sample ``start`` on, a fresh seeded permutation each epoch."""

    def __init__(self, n: int, seed: int, start: int = 0) -> None:
        self.n, self.seed, self.start = n, seed, start

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        epoch, offset = divmod(self.start, self.n)
        while True:
            yield from ((epoch, int(i)) for i in self._order(epoch)[offset:])
            epoch, offset = epoch + 1, 0


class OnlineCrops:
    """Fresh random crops of ``paths`` decoded by DataLoader workers: ``{"images": (B, 3, S, S)}`` (the task
    runs the teacher). Its state is the number of samples handed out, so a resume continues the sequence. An
    engine data source (:mod:`beit3.engine.data_source`) without counters."""

    counter_names: tuple[str, ...] = ()

    def __init__(
        self,
        paths: list[Path],
        size: int,
        scale: tuple[float, float],
        batch_size: int,
        num_workers: int,
        seed: int,
    ) -> None:
        self.dataset = RandomCrops(paths, size, scale, seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.position = 0

    def __iter__(self):
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EndlessShuffle(len(self.dataset), self.seed, self.position),
            num_workers=self.num_workers,
            worker_init_fn=init_worker,
        )
        workers = Workers(loader)
        try:
            for images in workers:
                self.position += len(images)  # counted as handed out, not as prefetched by the workers
                yield {"images": images}
        finally:
            workers.close()

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def start_at(self, micro_batches: int) -> None:
        """Continue the sequence after ``micro_batches`` batches of this rank."""
        self.position = int(micro_batches) * self.batch_size

    def counters(self) -> dict[str, float]:
        return {}


@torch.no_grad()
def teacher_features(teacher: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Teacher features (N, h*w, dim) of fixed views, computed in chunks and kept on the CPU."""
    return torch.cat([teacher(chunk.to(device)).cpu() for chunk in images.split(64)])


# ----- evaluation -----


@torch.no_grad()
def evaluate(
    model: VQKD, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 128
) -> dict[str, float]:
    """Reconstruction loss and code usage over every rank's fixed views (eval mode: the codebook does not
    move). A collective when distributed: call it on every rank."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counts = torch.zeros(model.cfg.codebook_size, device=device)
    rec_sum, n = 0.0, 0
    for x, t in zip(images.split(batch_size), targets.split(batch_size)):
        x, t = x.to(device), t.to(device)
        grid = (x.shape[-2] // model.cfg.patch_size, x.shape[-1] // model.cfg.patch_size)
        ids = model.quantize.lookup(model.encode(x))
        rec = model.decode(model.quantize.embedding(ids), grid)
        rec_sum += float(cosine_reconstruction_loss(rec, t)) * len(x)
        n += len(x)
        counts += torch.bincount(ids.flatten(), minlength=counts.numel()).float()
    model.train(was_training)
    sums = all_reduce_sum(torch.tensor([rec_sum, float(n)], device=device, dtype=torch.float64))
    all_reduce_sum(counts)
    usage = {k: float(v) for k, v in codebook_usage(counts).items()}
    return {"loss_rec": float(sums[0] / sums[1].clamp(min=1)), **usage}


def ranks_agree(t: torch.Tensor) -> float:
    """Largest absolute difference between this rank's tensor and rank 0's (0.0 when not distributed);
    a collective when distributed."""
    ref = broadcast_from_rank0(t.detach().clone())
    diff = (t.detach() - ref).abs().max().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return float(diff)
