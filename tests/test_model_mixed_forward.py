"""``forward_mixed``: several sub-batches in one pass equal one ``forward`` per sub-batch; masks built once.

The one-pass path (layer by layer, each expert once on the packed tokens of all sub-batches, attention per
sub-batch) must give the outputs and gradients of the three separate forwards to fp32 rounding, in both
layouts (released: decoupled attention; paper: shared attention, VL experts in the top layer), with padded
texts, with stochastic depth off and on. Stochastic depth is compared exactly, not in distribution: the
one-pass path draws its per-sample masks before the layers, in the order the separate forwards draw them
(sub-batch by sub-batch, layer by layer, attention branch before FFN branch), so a fixed seed gives both
paths the same masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import beit3.model.layers as layers
from beit3.model import build_model
from beit3.model.beit3 import BEiT3

RELEASED, PAPER = "beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"
TINY = (RELEASED, PAPER)
VOCAB = 1000  # small heads: the tests are about the encoder


def _build(name: str, **overrides):
    return build_model(name, vocab_size=VOCAB, visual_vocab_size=64, **overrides)


def _text(gen: torch.Generator, n: int, length: int, padded: bool = True):
    ids = torch.randint(3, VOCAB, (n, length), generator=gen)
    pad = torch.zeros(n, length, dtype=torch.bool)
    if padded:
        pad[0, -2:] = True
        pad[-1, -1:] = True
    return ids, pad


def subbatches(seed: int = 0, padded: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Images (with masked patches), texts of 9 and pairs with texts of 5: different lengths everywhere."""
    gen = torch.Generator().manual_seed(seed)
    text, text_pad = _text(gen, 3, 9, padded)
    pair_text, pair_pad = _text(gen, 2, 5, padded)
    return {
        "image": {
            "image": torch.randn(4, 3, 64, 64, generator=gen),
            "image_mask": torch.rand(4, 16, generator=gen) < 0.4,
        },
        "text": {"text": text, "text_padding_mask": text_pad},
        "pair": {
            "image": torch.randn(2, 3, 64, 64, generator=gen),
            "text": pair_text,
            "text_padding_mask": pair_pad,
            "image_mask": torch.rand(2, 16, generator=gen) < 0.4,
        },
    }


def _loss(model, hidden: dict[str, torch.Tensor]) -> torch.Tensor:
    """A loss that reaches every output position and both heads."""
    total = 0
    for h in hidden.values():
        total = total + h.square().mean() + model.mlm_head(h[:, -2:]).logsumexp(-1).mean()
        total = total + model.mim_head(h[:, 1:3]).logsumexp(-1).mean()
    return total


def _run(model, batch, mixed: bool, seed: int = 7):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the drop-path draws
    if mixed:
        hidden = model.forward_mixed(batch)
    else:  # today's path: one forward per sub-batch, images, texts, pairs
        hidden = {key: model(**inputs) for key, inputs in batch.items()}
    _loss(model, hidden).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: h.detach() for k, h in hidden.items()}, grads


def _assert_same(a: tuple, b: tuple, exact: bool = False) -> None:
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-5}
    (ha, ga), (hb, gb) = a, b
    assert ha.keys() == hb.keys()
    for k in ha:
        torch.testing.assert_close(hb[k], ha[k], **tol, msg=k)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=tol["rtol"] * 10, atol=tol["atol"] * 10, msg=n)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_one_pass_equals_one_forward_per_subbatch(name, drop_path):
    torch.manual_seed(0)
    model = _build(name, drop_path_rate=drop_path).train()
    batch = subbatches()
    old, new = _run(model, batch, mixed=False), _run(model, batch, mixed=True)
    _assert_same(old, new)
    if drop_path:  # stochastic depth really dropped something, identically in both paths
        torch.manual_seed(8)
        assert not torch.allclose(model.forward_mixed(batch)["pair"], new[0]["pair"])


@pytest.mark.parametrize("name", TINY)
def test_any_subset_and_order_of_subbatches(name):
    torch.manual_seed(0)
    model = _build(name, drop_path_rate=0.2).train()
    full = subbatches()
    for keys in (("pair",), ("text", "image"), ("pair", "text"), ("image", "pair")):
        batch = {k: full[k] for k in keys}
        _assert_same(_run(model, batch, mixed=False), _run(model, batch, mixed=True))
    two_pairs = {"a": full["pair"], "b": {**full["pair"], "image": full["image"]["image"][:2]}}
    _assert_same(_run(model, two_pairs, mixed=False), _run(model, two_pairs, mixed=True))
    t = 17 + full["pair"]["text"].shape[1]
    causal = {**full["pair"], "attn_mask": torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)}
    with_attn_mask = {"text": full["text"], "caption": causal}
    _assert_same(_run(model, with_attn_mask, mixed=False), _run(model, with_attn_mask, mixed=True))


def _counting_modules(model) -> tuple[dict[str, list], dict[str, list]]:
    """Forward and backward calls of every parameterised module (the units ZeRO-3 gathers)."""
    forward: dict[str, list] = {}
    backward: dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Conv2d)):
            forward[name], backward[name] = [], []
            m.register_forward_hook(lambda mod, i, o, name=name: forward[name].append(1))
            m.register_full_backward_pre_hook(lambda mod, g, name=name: backward[name].append(1))
    return forward, backward


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("name", TINY)
def test_each_module_runs_once_in_the_forward_and_once_in_the_backward(name):
    """The point of the one pass: every parameterised module runs once per micro-batch in the forward and
    once in the backward (ZeRO-3 gathers its parameters once each), where the three separate forwards run
    shared modules up to three times."""
    torch.manual_seed(0)
    model = _build(name, drop_path_rate=0.1).train()
    forward, backward = _counting_modules(model)
    batch = subbatches()
    _loss(model, {k: model(**v) for k, v in batch.items()}).backward()
    heads = {"mlm_head", "mim_head"}  # _loss calls the heads per sub-batch; the objective calls them once
    separate = {n: len(c) for n, c in forward.items() if n not in heads}
    # experts: two of the three sub-batches (A: images and pairs); shared attention (paper): all three, and
    # the shared Sub-LN and out_proj twice more for a pair (its vision and text halves apart)
    assert max(separate.values()) == (4 if name == PAPER else 2)
    assert {n: len(c) for n, c in backward.items() if n not in heads} == separate
    for c in [*forward.values(), *backward.values()]:
        c.clear()
    _loss(model, model.forward_mixed(batch)).backward()
    once = {n: min(k, 1) for n, k in separate.items()}
    assert {n: len(c) for n, c in forward.items() if n not in heads} == once
    assert {n: len(c) for n, c in backward.items() if n not in heads} == once
    if name == PAPER:  # the vision-language expert of the top layer ran, on the pairs
        assert forward[f"beit3.encoder.layers.{model.cfg.depth - 1}.ffn.C.fc1"] == [1]


@pytest.mark.parametrize("name", TINY)
def test_activation_checkpointing_of_the_one_pass(name):
    torch.manual_seed(0)
    model = _build(name, drop_path_rate=0.3).train()
    batch = subbatches()
    plain = _run(model, batch, mixed=True)
    calls = []
    for layer in model.beit3.encoder.layers:
        original = layer.forward_packed

        def counted(*args, original=original, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        layer.forward_packed = counted
    model.set_grad_checkpointing(True)
    recomputed = _run(model, batch, mixed=True)
    assert len(calls) == 2 * model.cfg.depth  # every layer ran again in the backward: checkpointing was on
    _assert_same(plain, recomputed, exact=True)
    calls.clear()
    model.set_grad_checkpointing(True, layers=[0])
    _assert_same(plain, _run(model, batch, mixed=True), exact=True)
    assert len(calls) == model.cfg.depth + 1


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_one_pass_is_close_to_separate_forwards(name):
    torch.manual_seed(0)
    model = _build(name).train()
    batch = subbatches()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old = {k: model(**v).float() for k, v in batch.items()}
        new = {k: h.float() for k, h in model.forward_mixed(batch).items()}
    for k in old:
        assert ((new[k] - old[k]).norm() / old[k].norm()).item() < 1e-2, k


def test_bad_subbatches_are_refused_by_name():
    model = _build(RELEASED)
    with pytest.raises(ValueError, match="at least one"):
        model.forward_mixed({})
    with pytest.raises(ValueError, match=r"'x'.*unknown inputs \['text_labels'\]"):
        model.forward_mixed({"x": {"text": torch.zeros(1, 3, dtype=torch.long), "text_labels": None}})
    with pytest.raises(ValueError, match="'y': give an image, a text, or both"):
        model.forward_mixed({"y": {"text_padding_mask": None}})
    with pytest.raises(ValueError, match="'z': text_padding_mask must have the shape"):
        ids = torch.zeros(2, 3, dtype=torch.long)
        model.forward_mixed({"z": {"text": ids, "text_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}})


# ---- masks (issue 13 item 6) -----------------------------------------------------------------------------


def _old_attention_mask(pad, attn_mask, dtype=None):
    """The mask before the change: boolean (True = may attend), built even when nothing is padded."""
    allowed = None
    if pad is not None:
        allowed = ~pad[:, None, None, :]
    if attn_mask is not None:
        a = ~attn_mask.bool()[None, None]
        allowed = a if allowed is None else allowed & a
    return allowed


@pytest.fixture
def sdpa_masks(monkeypatch):
    """The attn_mask of every SDPA call in the model's layers."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", recording)
    return seen


@pytest.mark.parametrize("name", TINY)
def test_no_attention_mask_when_nothing_is_padded(name, sdpa_masks):
    """A padding mask that pads nothing gives SDPA attn_mask=None (its flash kernel is eligible), and the
    same outputs as the old boolean mask of all True."""
    torch.manual_seed(0)
    model = _build(name).eval()
    batch = subbatches(padded=False)
    with torch.no_grad():
        new = {k: model(**v) for k, v in batch.items()}
        mixed = model.forward_mixed(batch)
    assert sdpa_masks and all(m is None for m in sdpa_masks)
    sdpa_masks.clear()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(BEiT3, "_attention_mask", staticmethod(_old_attention_mask))
        mp.setattr("beit3.model.beit3._padding", lambda pad: pad.bool())
        old = {k: model(**v) for k, v in batch.items()}
    assert any(m is not None for m in sdpa_masks)
    for k in old:
        torch.testing.assert_close(new[k], old[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mixed[k], old[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_one_additive_mask_per_forward_equals_the_boolean_mask(name, sdpa_masks):
    """With padding (and a causal mask) the mask is built once per forward in the queries' dtype (every
    layer gets the same tensor, SDPA converts nothing per layer), and the outputs equal the old boolean
    mask's bit for bit."""
    torch.manual_seed(0)
    model = _build(name).eval()
    pair = subbatches()["pair"]
    t = 17 + pair["text"].shape[1]
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    cases = [pair, {**pair, "attn_mask": causal}, subbatches()["text"]]
    for inputs in cases:
        sdpa_masks.clear()
        with torch.no_grad():
            new = model(**inputs)
        assert len(sdpa_masks) == model.cfg.depth
        assert all(m is sdpa_masks[0] for m in sdpa_masks)
        assert sdpa_masks[0].dtype == torch.float32
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            mp.setattr(BEiT3, "_attention_mask", staticmethod(_old_attention_mask))
            old = model(**inputs)
        torch.testing.assert_close(new, old, rtol=0, atol=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sdpa_masks.clear()
        model(**pair)
        assert sdpa_masks[0].dtype == torch.bfloat16  # the queries' dtype under autocast: no cast per layer


def test_one_pass_builds_each_subbatchs_mask_once(sdpa_masks):
    torch.manual_seed(0)
    model = _build(PAPER).eval()
    batch = subbatches()
    batch["text"]["text_padding_mask"][:] = False  # this sub-batch pads nothing: no mask
    with torch.no_grad():
        model.forward_mixed(batch)
    depth = model.cfg.depth
    assert len(sdpa_masks) == 3 * depth
    image, text, pair = (sdpa_masks[i::3] for i in range(3))  # layer-major: image, text, pair per layer
    assert all(m is None for m in image + text)
    assert all(m is pair[0] for m in pair) and pair[0].shape == (2, 1, 1, 17 + 5)
