"""Training-time behaviour: activation checkpointing, bf16 autocast, stochastic depth, initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from beit3.model import build_model
from beit3.model.layers import DropPath

TINY = ("beit3_tiny_patch16_64", "beit3_tiny_paper_patch16_64")


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    return {
        "image": torch.randn(2, 3, 64, 64, generator=gen),
        "text": torch.randint(3, 64000, (2, 6), generator=gen),
        "text_padding_mask": pad,
        "image_mask": torch.rand(2, 16, generator=gen) < 0.4,
    }


def _grads(model, batch, seed: int = 0) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path draws in both runs
    out = model(**batch)
    (model.mlm_head(out).logsumexp(-1).mean() + out.square().mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("name", TINY)
def test_activation_checkpointing_gives_identical_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, drop_path_rate=0.2).train()
    batch = _batch()
    plain = _grads(model, batch)
    calls = []
    for layer in model.beit3.encoder.layers:
        # Count calls of forward itself: torch does not fire module hooks during recomputation.
        layer.forward = _counting(layer.forward, calls)
    model.set_grad_checkpointing(True)
    recomputed = _grads(model, batch)
    # Every layer ran twice (forward, then again in backward): checkpointing was really on.
    assert len(calls) == 2 * model.cfg.depth
    assert plain.keys() == recomputed.keys()
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=0, atol=0, msg=n)


def test_checkpointing_selected_layers_and_switching_off():
    model = build_model("beit3_tiny_paper_patch16_64")
    model.set_grad_checkpointing(True, layers=[0, 2])
    assert model.beit3.checkpoint_layers == {0, 2}
    model.set_grad_checkpointing(False)
    assert not model.beit3.checkpoint_layers
    with pytest.raises(ValueError, match="out of range"):
        model.set_grad_checkpointing(True, layers=[3])


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_backward_is_close_to_fp32(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    batch = _batch()
    with torch.no_grad():
        reference = model(**batch)
    dtypes = []
    model.beit3.encoder.layers[0].ffn.A.fc1.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        loss = model.mim_head(out[:, 1:17]).float().logsumexp(-1).mean()
    assert dtypes == [torch.bfloat16]  # the matmuls really ran in bf16
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 2e-2
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.beit3.encoder.layers[0].ffn.A.fc1.weight.grad.dtype == torch.float32


def test_stochastic_depth_rises_linearly_from_zero():
    model = build_model("beit3_tiny_paper_patch16_64", depth=5, vl_expert_layers=1, drop_path_rate=0.2)
    rates = [0.0 if layer.drop_path is None else layer.drop_path.p for layer in model.beit3.encoder.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_no_drop_path_modules_without_a_rate():
    model = build_model("beit3_tiny_patch16_64")
    assert all(layer.drop_path is None for layer in model.beit3.encoder.layers)


def test_drop_path_is_off_in_eval_and_random_in_training():
    torch.manual_seed(0)
    with_dp = build_model("beit3_tiny_patch16_64", drop_path_rate=0.5, pretraining_heads=False)
    without = build_model("beit3_tiny_patch16_64", pretraining_heads=False)
    without.load_state_dict(with_dp.state_dict())
    batch = {"image": _batch()["image"]}
    with torch.no_grad():
        with_dp.eval(), without.eval()
        assert torch.equal(with_dp(**batch), without(**batch))
        with_dp.train()
        torch.manual_seed(1)
        first = with_dp(**batch)
        second = with_dp(**batch)
    assert not torch.equal(first, second)


def test_drop_path_zeroes_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    dp = DropPath(0.3).train()
    out = dp(torch.ones(20000, 3, 4))
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == per_sample[:, :1]).all(1)).all()
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.3, abs=0.02)
    assert out.mean().item() == pytest.approx(1.0, abs=0.03)


def test_beit_init_rescales_output_projections_by_depth():
    torch.manual_seed(0)
    model = build_model("beit3_base_patch16_224", depth=6, embed_dim=256, num_heads=4, ffn_dim=1024)
    layers = model.beit3.encoder.layers
    q_std = layers[5].self_attn.q_proj.A.weight.std().item()
    assert q_std == pytest.approx(0.02 * 0.88, rel=0.05)  # truncated at 2 sigma: std 0.88 sigma
    for layer_id, layer in enumerate(layers, start=1):
        expected = q_std / math.sqrt(2 * layer_id)
        assert layer.self_attn.out_proj.B.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert layer.ffn.A.fc2.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert layers[0].final_layer_norm.A.weight.eq(1).all()
    assert layers[0].ffn.A.fc1.bias.eq(0).all()


def test_magneto_init_scales_up_the_sub_ln_branches():
    torch.manual_seed(0)
    model = build_model("beit3_tiny_patch16_64", init="magneto", depth=4)
    attn = model.beit3.encoder.layers[3].self_attn
    xavier_std = math.sqrt(2.0 / (64 + 64))
    gain = math.sqrt(math.log(2 * 4))
    assert attn.q_proj.A.weight.std().item() == pytest.approx(xavier_std, rel=0.1)
    assert attn.v_proj.A.weight.std().item() == pytest.approx(xavier_std * gain, rel=0.1)
