"""NormEMA vector quantizer: nearest unit code, straight-through gradient, commitment loss, EMA updates,
k-means init and dead-code restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beit3.tokenizers.quantizer import NormEMAVectorQuantizer, kmeans_cosine


def _quantizer(num_codes=16, dim=4, decay=0.5, seed=0):
    torch.manual_seed(seed)
    return NormEMAVectorQuantizer(num_codes, dim, beta=1.0, decay=decay)


def test_codebook_is_unit_norm_and_ids_are_highest_cosine():
    q = _quantizer().eval()
    z = torch.randn(2, 5, 4)
    _, _, ids = q(z)
    assert torch.allclose(q.embedding.weight.norm(dim=1), torch.ones(16))
    cos = F.normalize(z, dim=-1) @ q.embedding.weight.t()
    assert torch.equal(ids, cos.argmax(-1)) and torch.equal(ids, q.lookup(z))


def test_straight_through_gradient_and_commitment_loss():
    q = _quantizer().eval()
    z = torch.randn(2, 5, 4, requires_grad=True)
    z_q, loss, ids = q(z)
    zn = F.normalize(z.detach(), dim=-1)
    codes = q.embedding.weight[ids]
    assert torch.allclose(z_q, codes, atol=1e-6)  # forward value is the code
    assert torch.allclose(loss, F.mse_loss(zn, codes))
    (z_q * torch.arange(4.0)).sum().backward()
    # The gradient passes z_q -> normalised z unchanged: compare with differentiating normalize directly.
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2, dim=-1) * torch.arange(4.0)).sum().backward()
    assert torch.allclose(z.grad, z2.grad, atol=1e-6)
    assert not q.embedding.weight.requires_grad


def test_ema_moves_used_codes_towards_their_vectors_and_keeps_unused_ones():
    q = _quantizer(decay=0.5).train()
    before = q.embedding.weight.clone()
    z = torch.randn(1, 8, 4)
    _, _, ids = q(z)
    used = torch.zeros(16, dtype=torch.bool)
    used[ids.unique()] = True
    after = q.embedding.weight
    assert torch.equal(after[~used], before[~used])
    zn = F.normalize(z[0], dim=-1)
    for code in ids.unique():
        mean = F.normalize(zn[ids[0] == code].sum(0), dim=0)
        expected = F.normalize(0.5 * before[code] + 0.5 * mean, dim=0)
        assert torch.allclose(after[code], expected, atol=1e-6)
        assert (after[code] @ mean) >= (before[code] @ mean) - 1e-6  # closer to its vectors
    assert torch.allclose(after.norm(dim=1), torch.ones(16), atol=1e-6)


def test_eval_does_not_move_the_codebook_but_tracks_usage():
    q = _quantizer(decay=0.5).eval()
    before = q.embedding.weight.clone()
    _, _, ids = q(torch.randn(1, 8, 4))
    assert torch.equal(q.embedding.weight, before)
    assert torch.allclose(q.cluster_size, 0.5 * torch.bincount(ids[0], minlength=16).float())


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    points = F.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 8, generator=g), dim=1)
    found = kmeans_cosine(points, 4, iters=10, generator=g)
    # Each true centre has a centroid within a small angle.
    assert (centres @ found.t()).max(dim=1).values.min() > 0.99


def test_kmeans_init_beats_random_codebook_fit():
    q = _quantizer(num_codes=8, dim=8)
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(8, 8, generator=g), dim=1)
    z = centres.repeat_interleave(20, 0) + 0.05 * torch.randn(160, 8, generator=g)
    fit_random = (F.normalize(z, dim=1) @ q.embedding.weight.t()).max(1).values.mean()
    q.init_from_kmeans(z)
    fit_kmeans = (F.normalize(z, dim=1) @ q.embedding.weight.t()).max(1).values.mean()
    assert fit_kmeans > 0.95 > fit_random
    assert torch.allclose(q.embedding.weight.norm(dim=1), torch.ones(8), atol=1e-6)


def test_dead_codes_are_reseeded_from_recent_vectors_only():
    q = _quantizer(num_codes=8, dim=4)
    q.cluster_size.copy_(torch.tensor([5.0, 0.0, 3.0, 0.0, 0.0, 2.0, 1.0, 0.0]))
    before = q.embedding.weight.clone()
    z = torch.randn(30, 4)
    n = q.restart_dead_codes(z, threshold=0.5)
    dead = torch.tensor([1, 3, 4, 7])
    alive = torch.tensor([0, 2, 5, 6])
    assert n == 4
    assert torch.equal(q.embedding.weight[alive], before[alive])
    # Every restarted code is (up to tiny noise) one of the recent vectors.
    sims = q.embedding.weight[dead] @ F.normalize(z, dim=1).t()
    assert sims.max(dim=1).values.min() > 0.999
    assert (q.cluster_size[dead] == 0.5).all()
    assert q.restart_dead_codes(z, threshold=0.5) == 0
