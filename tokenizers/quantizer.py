"""Normalised-EMA vector quantizer of VQ-KD (BEiT v2), with k-means init and dead-code restarts.

Vectors and codes live on the unit sphere: the nearest code by squared L2 distance is the one of highest
cosine similarity. The codebook is never trained by gradients: each training step moves every used code
towards the normalised mean of the vectors assigned to it (EMA, decay 0.99), with per-code counts and sums
all-reduced across ranks so every rank keeps an identical codebook. The encoder is trained through a
straight-through estimator and the commitment loss ``beta * mse(z, sg[z_q])``.

State-dict keys are the released ones: ``embedding.weight`` (the codebook), ``cluster_size`` (EMA usage)
and the release's unused leftovers ``embedding.cluster_size``, ``embedding.embed_avg``,
``embedding.initted`` (kept so released checkpoints load strictly; never read).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place when running distributed; identity otherwise."""
    if _distributed():
        dist.all_reduce(t)
    return t


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value everywhere, in place, when running distributed."""
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def _kmeans_pp_seeds(vectors: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on the sphere: each new seed drawn with probability ~ squared distance to the
    nearest seed so far (uniformly once every vector is a seed, e.g. when N < k)."""
    n = vectors.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    seeds = [first]
    nearest = (2 - 2 * (vectors @ vectors[first])).clamp(min=0) ** 2  # squared L2, squared again: D^2
    for _ in range(k - 1):
        weights = nearest.cpu() if nearest.sum() > 0 else torch.ones(n)
        pick = torch.multinomial(weights, 1, generator=generator).item()
        seeds.append(pick)
        nearest = torch.minimum(nearest, (2 - 2 * (vectors @ vectors[pick])).clamp(min=0) ** 2)
    return vectors[torch.tensor(seeds, device=vectors.device)].clone()


def kmeans_cosine(
    vectors: torch.Tensor, num_clusters: int, iters: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Spherical k-means with k-means++ seeding: (N, d) unit vectors -> (num_clusters, d) unit centroids.

    BEiT v2 seeds with random samples; k-means++ avoids the local optima where two centroids share a
    cluster (which would start training with dead codes). An empty cluster keeps its previous centroid.
    """
    centroids = _kmeans_pp_seeds(vectors, num_clusters, generator)
    for _ in range(iters):
        assign = (vectors @ centroids.t()).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=num_clusters)
        new = F.normalize(sums, dim=1)
        centroids = torch.where((counts > 0)[:, None], new, centroids)
    return centroids


class CodebookEMA(nn.Module):
    """The codebook (released module name ``embedding``); ``weight`` (K, d) holds unit vectors."""

    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        weight = F.normalize(torch.randn(num_codes, code_dim), dim=1)
        self.weight = nn.Parameter(weight, requires_grad=False)
        # Released leftovers: present in the checkpoints, never used by the quantizer.
        self.cluster_size = nn.Parameter(torch.zeros(num_codes), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.clone(), requires_grad=False)
        self.register_buffer("initted", torch.ones(1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight)


class NormEMAVectorQuantizer(nn.Module):
    """Nearest-code quantization of (B, N, d) vectors on the unit sphere; EMA codebook updates in training."""

    def __init__(self, num_codes: int, code_dim: int, beta: float = 1.0, decay: float = 0.99) -> None:
        super().__init__()
        self.num_codes, self.code_dim, self.beta, self.decay = num_codes, code_dim, beta, decay
        self.embedding = CodebookEMA(num_codes, code_dim)
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # EMA of per-code assignment counts

    @torch.no_grad()
    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest code ids (B, N) of vectors z (B, N, d), computed in fp32 after L2 normalisation."""
        flat = F.normalize(z.float().reshape(-1, self.code_dim), dim=1)
        return (flat @ self.embedding.weight.float().t()).argmax(dim=1).view(z.shape[:-1])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (z_q with straight-through gradient, commitment loss, code ids (B, N))."""
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, self.code_dim)
        # argmax of cosine == argmin of squared L2 on unit vectors.
        ids = (flat.detach() @ self.embedding.weight.t()).argmax(dim=1)
        z_q = self.embedding(ids).view_as(z)
        loss = self.beta * F.mse_loss(z, z_q.detach())
        with torch.no_grad():
            counts = all_reduce_sum(torch.bincount(ids, minlength=self.num_codes).float())
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            if self.training:
                self._ema_update(flat.detach(), ids, counts)
        z_q = z + (z_q - z).detach()
        return z_q, loss, ids.view(z.shape[:-1])

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.embedding.weight).index_add_(0, ids, flat)
        all_reduce_sum(sums)
        used = counts > 0  # unused codes stay exactly where they are
        means = F.normalize(sums[used] / counts[used, None], dim=1)
        new = self.embedding.weight[used] * self.decay + means * (1 - self.decay)
        self.embedding.weight[used] = F.normalize(new, dim=1)

    @torch.no_grad()
    def init_from_kmeans(self, z: torch.Tensor, iters: int = 10, seed: int = 0) -> None:
        """Set the codebook to spherical k-means centroids of rank 0's vectors z (..., d), then broadcast."""
        flat = F.normalize(z.detach().float().reshape(-1, self.code_dim), dim=1)
        g = torch.Generator().manual_seed(seed)
        codebook = kmeans_cosine(flat, self.num_codes, iters, g).to(self.embedding.weight)
        self.embedding.weight.copy_(broadcast_from_rank0(codebook.contiguous()))
        self.cluster_size.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float, seed: int = 0) -> int:
        """Re-seed codes with EMA usage below ``threshold`` from random vectors of z (rank 0's, broadcast).

        The restarted codes get a usage of ``threshold`` so they are not restarted again at once. Returns the
        number of restarted codes.
        """
        dead = self.cluster_size < threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return 0
        flat = F.normalize(z.detach().float().reshape(-1, self.code_dim), dim=1)
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(flat.shape[0], (num_dead,), generator=g).to(flat.device)
        # A little noise separates codes seeded from the same vector.
        noise = torch.randn(num_dead, self.code_dim, generator=g).to(flat) * 1e-3
        fresh = broadcast_from_rank0(F.normalize(flat[pick] + noise, dim=1).contiguous())
        self.embedding.weight[dead] = fresh.to(self.embedding.weight)
        self.cluster_size[dead] = threshold
        return num_dead
