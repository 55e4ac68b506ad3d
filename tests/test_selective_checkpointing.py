"""Selective activation checkpointing: a chosen layer recomputes all of itself, its attention branch or
its FFN branch in the backward (``set_grad_checkpointing(part=...)``).

Every choice must give the gradients of no checkpointing (both forwards, stochastic depth on), save fewer
activation bytes in the expected order (none > attention-only, FFN-only > whole layer), and recompute the
FLOPs ``beit3.model.flops.checkpoint_recompute_flops`` says (torch's FLOP counter: with minus without).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from beit3.model import build_model
from beit3.model.beit3 import CHECKPOINT_PARTS
from beit3.model.flops import Pass, checkpoint_recompute_flops
from beit3.pretrain.objective import MaskedDataModeling

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic import synthetic_batch  # noqa: E402

RELEASED, PAPER = "beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64"
TINY = (RELEASED, PAPER)
VOCAB = 500


def _model(name: str, drop_path_rate: float = 0.3):
    torch.manual_seed(0)
    return build_model(name, vocab_size=VOCAB, visual_vocab_size=64, drop_path_rate=drop_path_rate).train()


def _subbatches(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Images, padded texts of 9, pairs with texts of 5 (a pretraining micro-batch in miniature)."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[0, -2:] = True
    return {
        "image": {"image": torch.randn(3, 3, 64, 64, generator=gen)},
        "text": {"text": torch.randint(3, VOCAB, (3, 9), generator=gen), "text_padding_mask": pad},
        "pair": {
            "image": torch.randn(2, 3, 64, 64, generator=gen),
            "text": torch.randint(3, VOCAB, (2, 5), generator=gen),
            "image_mask": torch.rand(2, 16, generator=gen) < 0.4,
        },
    }


def _forward(model, batch, mixed: bool) -> dict[str, torch.Tensor]:
    if mixed:
        return model.forward_mixed(batch)
    return {key: model(**inputs) for key, inputs in batch.items()}


def _loss(model, hidden: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(h.square().mean() + model.mlm_head(h[:, -2:]).logsumexp(-1).mean() for h in hidden.values())


def _grads(model, batch, mixed: bool, seed: int = 7) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same stochastic-depth draws in every run
    _loss(model, _forward(model, batch, mixed)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_calls(model, names: tuple[str, ...]) -> dict[str, list]:
    """Replace each layer's branch methods by counting wrappers (recomputation calls them again)."""
    calls: dict[str, list] = {name: [] for name in names}
    for layer in model.beit3.encoder.layers:
        for name in names:
            original = getattr(layer, name)

            def counted(*args, original=original, name=name):
                calls[name].append(1)
                return original(*args)

            setattr(layer, name, counted)
    return calls


@pytest.mark.parametrize("mixed", [False, True], ids=["forward", "forward_mixed"])
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("part", CHECKPOINT_PARTS)
def test_every_part_gives_the_gradients_of_no_checkpointing(part, name, mixed):
    model = _model(name)
    batch = _subbatches()
    plain = _grads(model, batch, mixed)
    branches = ("_attention_packed", "_ffn_packed") if mixed else ("_attention", "_ffn")
    calls = _count_calls(model, branches)
    model.set_grad_checkpointing(True, layers=[0, model.cfg.depth - 1], part=part)
    recomputed = _grads(model, batch, mixed)
    assert plain.keys() == recomputed.keys()
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)
    # The recomputation really ran: the chosen branches of the two chosen layers ran twice.
    passes = 1 if mixed else len(batch)  # the single-sequence forward runs each layer once per sub-batch
    depth = model.cfg.depth
    attention, ffn = (len(calls[b]) // passes for b in branches)
    assert attention == depth + (2 if part in ("layer", "attention") else 0)
    assert ffn == depth + (2 if part in ("layer", "ffn") else 0)


def _saved_bytes(model, batch, mixed: bool) -> int:
    """Bytes of the distinct storages autograd saves for the backward in one forward (weights excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = _forward(model, batch, mixed)
    del hidden
    return sum(seen.values())


@pytest.mark.parametrize("mixed", [False, True], ids=["forward", "forward_mixed"])
@pytest.mark.parametrize("name", TINY)
def test_saved_activations_fall_in_the_expected_order(name, mixed):
    model = _model(name)
    batch = _subbatches()
    saved = {"none": _saved_bytes(model, batch, mixed)}
    for part in CHECKPOINT_PARTS:
        model.set_grad_checkpointing(True, part=part)
        saved[part] = _saved_bytes(model, batch, mixed)
    assert saved["none"] > max(saved["attention"], saved["ffn"])
    assert min(saved["attention"], saved["ffn"]) > saved["layer"]


def test_an_unknown_part_is_refused_naming_the_choices():
    model = _model(PAPER)
    with pytest.raises(ValueError, match="'mlp': use one of layer, attention, ffn"):
        model.set_grad_checkpointing(True, part="mlp")
    model.set_grad_checkpointing(True, layers=[1], part="ffn")
    assert (model.beit3.checkpoint_layers, model.beit3.checkpoint_part) == ({1}, "ffn")
    model.set_grad_checkpointing(False)
    assert (model.beit3.checkpoint_layers, model.beit3.checkpoint_part) == (frozenset(), "layer")


def _counted_flops(model, batch) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _loss(model, model.forward_mixed(batch)).backward()
    return counter.get_total_flops()


# Stochastic depth decides whether a whole layer's last matmul is recomputed (its keep mask is saved
# after it); a branch's drop is applied outside the branch, so it changes nothing there.
CASES = [("layer", 0.0), ("layer", 0.3), ("attention", 0.3), ("ffn", 0.3)]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("part, drop_path_rate", CASES)
def test_recomputed_flops_equal_torchs_count(name, part, drop_path_rate):
    """FLOPs of forward+backward with checkpointing minus without = the recompute, to the FLOP (the top
    layer of the paper layout has vision-language experts; the first layer has no stochastic depth)."""
    model = _model(name, drop_path_rate=drop_path_rate)
    batch = _subbatches()
    plain = _counted_flops(model, batch)
    layers = [0, model.cfg.depth - 1]
    model.set_grad_checkpointing(True, layers=layers, part=part)
    extra = _counted_flops(model, batch) - plain
    passes = [Pass(3, image=True), Pass(3, text_len=9), Pass(2, image=True, text_len=5)]
    assert extra == checkpoint_recompute_flops(model.cfg, passes, layers, part) > 0


@pytest.mark.parametrize("part", ["layer", "ffn"])
def test_the_objectives_recompute_flops_are_what_torch_recomputes(part):
    """batch_stats' ``recompute_flops`` (the HFU's addition) on a pretraining micro-batch: torch's count of
    the objective's step with checkpointing minus without; 0 without checkpointing."""
    torch.manual_seed(0)
    model = build_model(PAPER, drop_path_rate=0.2, vocab_size=100, visual_vocab_size=50)
    task = MaskedDataModeling(model).train()
    batch = task.prepare_batch(synthetic_batch(model.cfg, 3, 2, 2, 12, 7), torch.device("cpu"))

    def counted() -> int:
        torch.manual_seed(1)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            task(batch)[0].backward()
        return counter.get_total_flops()

    plain = counted()
    assert task.batch_stats(batch)["recompute_flops"] == 0
    model.set_grad_checkpointing(True, layers=[0, 2], part=part)
    assert counted() - plain == task.batch_stats(batch)["recompute_flops"] > 0


def test_selective_checkpointing_inside_a_compiled_layer():
    """Each layer's forward_packed compiled (aot_eager): the branch checkpoint traces and gives the
    gradients of the eager model."""
    model = _model(RELEASED, drop_path_rate=0.0)
    batch = _subbatches()
    model.set_grad_checkpointing(True, part="attention")
    eager = _grads(model, batch, mixed=True)
    torch._dynamo.reset()
    for layer in model.beit3.encoder.layers:
        layer.forward_packed = torch.compile(layer.forward_packed, backend="aot_eager", fullgraph=True)
    compiled = _grads(model, batch, mixed=True)
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-5, atol=1e-6, msg=n)
