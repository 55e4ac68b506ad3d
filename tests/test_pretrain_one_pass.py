"""The objective's one pass per micro-batch equals the three-pass step it replaced (issue 13 item 1).

``MaskedDataModeling.forward`` encodes images, texts and pairs together (``forward_mixed``) and calls each
head once. The three-pass computation (one ``model(...)`` per sub-batch, each head once per term) lives
only in ``bench/three_pass.py``, as the reference for this test and the benchmark: loss, every metric and
every gradient must agree to fp32 rounding, in both layouts, with separate and joint pair masking, padded
texts, stochastic depth off and on (same seed: the one pass draws the same per-sample masks) and
activation checkpointing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from beit3.model import build_model
from beit3.pretrain.objective import MaskedDataModeling, ObjectiveConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from three_pass import ThreePassObjective  # noqa: E402  (bench/three_pass.py: the reference, not shipped)

VOCAB, CODES = 100, 32


def make_batch(seed: int, joint: bool, padded: bool = True) -> dict:
    """A prepared micro-batch (codes in place of tokenizer views): 3 images, 4 texts of 9, 3 pairs of 6."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int, length: int, ratio: float) -> dict:
        ids = torch.randint(4, VOCAB, (n, length), generator=g)
        pad = torch.zeros(n, length, dtype=torch.bool)
        if padded:
            pad[0, -3:] = True
            pad[-1, -1] = True
        chosen = (torch.rand(n, length, generator=g) < ratio) & ~pad
        chosen[:, 1] = True
        labels = torch.where(chosen, ids, -100)
        return {"text": torch.where(chosen, 3, ids), "text_padding_mask": pad, "text_labels": labels}

    def image(n: int) -> dict:
        return {
            "image": torch.randn(n, 3, 64, 64, generator=g),
            "image_mask": torch.rand(n, 16, generator=g) < 0.4,
            "image_codes": torch.randint(0, CODES, (n, 16), generator=g),
        }

    pair = {**image(3), **text(3, 6, 0.5)}
    if not joint:  # separate masking: each pair masks its image or its text
        masks_image = torch.tensor([True, False, False])
        pair["image_mask"] &= masks_image[:, None]
        pair["text_labels"][masks_image] = -100
    return {"image": image(3), "text": text(4, 9, 0.15), "pair": pair}


def three_pass(task: MaskedDataModeling, batch: dict):
    """The objective as it was: one forward per sub-batch, each head once per loss term."""
    return ThreePassObjective.forward(task, batch)


def _step(task, batch, fn, seed: int = 3):
    task.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the drop-path draws
    loss, metrics = fn(batch)
    loss.backward()
    return (
        loss.detach(),
        metrics,
        {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None},
    )


def _task(name: str, drop_path: float) -> MaskedDataModeling:
    torch.manual_seed(0)
    model = build_model(name, vocab_size=VOCAB, visual_vocab_size=CODES, drop_path_rate=drop_path)
    cfg = ObjectiveConfig(mlm_weight=0.5, vl_mim_weight=2.0, label_smoothing=0.1)
    return MaskedDataModeling(model, cfg=cfg).train()


def _assert_equal_steps(old, new):
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = old, new
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert metrics_a.keys() == metrics_b.keys()
    for k in metrics_a:
        torch.testing.assert_close(metrics_b[k], metrics_a[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"])
@pytest.mark.parametrize("joint", [False, True], ids=["separate", "joint"])
@pytest.mark.parametrize("drop_path", [0.0, 0.2])
def test_loss_metrics_and_every_gradient_equal_the_three_pass_step(name, joint, drop_path):
    task = _task(name, drop_path)
    batch = make_batch(1, joint)
    old = _step(task, batch, lambda b: three_pass(task, b))
    new = _step(task, batch, task)
    _assert_equal_steps(old, new)
    params = dict(task.named_parameters())
    assert new[2].keys() == params.keys()  # every parameter touched (ZeRO-3)


@pytest.mark.parametrize("name", ["beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"])
def test_with_activation_checkpointing(name):
    task = _task(name, 0.2)
    batch = make_batch(2, joint=False)
    old = _step(task, batch, lambda b: three_pass(task, b))
    task.model.set_grad_checkpointing(True)
    new = _step(task, batch, task)
    _assert_equal_steps(old, new)
    task.model.set_grad_checkpointing(True, layers=[1])
    _assert_equal_steps(old, _step(task, batch, task))


def test_unpadded_texts_lose_their_mask_on_the_host_and_keep_their_loss():
    """prepare_batch turns a padding mask that pads nothing into None (no SDPA mask on the device)."""
    task = _task("beit3_tiny_paper_patch16_64", 0.0)
    cpu = make_batch(3, joint=True, padded=False)
    prepared = task.prepare_batch(cpu, torch.device("cpu"))
    assert prepared["text"]["text_padding_mask"] is None and prepared["pair"]["text_padding_mask"] is None
    padded = task.prepare_batch(make_batch(3, joint=True), torch.device("cpu"))
    assert padded["text"]["text_padding_mask"].any()
    _assert_equal_steps(_step(task, cpu, lambda b: three_pass(task, b)), _step(task, prepared, task))


def test_a_micro_batch_of_one_kind_only():
    task = _task("beit3_tiny_patch16_64", 0.0)
    batch = make_batch(4, joint=True)
    loss, metrics = task({"text": batch["text"]})
    assert set(metrics) == {"loss/mlm", "acc/mlm"}
    with pytest.raises(ValueError, match="none of the sub-batches"):
        task({"stats": {}})
