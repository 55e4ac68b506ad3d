"""The image-text contrastive (ITC) stage: gradient caching over accumulated micro-batches, the streamed pair
source, its recipe checks, and beit3-finetune on 2 ranks over pair shards with zero-shot retrieval (one
torchrun launch of this file, two runs in it: with and without accumulation)."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import clean_env, launcher, tensorboard_run
from PIL import Image
from tiny_data import shapes_recipe, shapes_spm

from beit3.engine.config_io import ConfigError
from beit3.finetune.configurations import build_encoder
from beit3.finetune.data.build import make_shapes_split
from beit3.finetune.data.pair_stream import build_pair_stream
from beit3.finetune.errors import FinetuneError
from beit3.finetune.recipe import load_recipe
from beit3.finetune.tasks.contrastive import GROUP, MICRO, Contrastive
from beit3.finetune.tasks.retrieval import Retrieval, contrastive_loss
from beit3.pretrain.data.tario import ShardWriter

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 48, "max_text_positions": 34}


def _task(drop_path_rate: float = 0.0, seed: int = 0) -> Contrastive:
    torch.manual_seed(seed)
    task = Contrastive(build_encoder("beit3_tiny_patch16_64", "dual", drop_path_rate=drop_path_rate, **TINY))
    return task.train()


def _batch(rows: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, 48, (rows, 10), generator=g)
    lengths = torch.randint(4, 11, (rows,), generator=g)
    pad = torch.arange(10)[None] >= lengths[:, None]
    text[pad] = 1
    return {"image": torch.randn(rows, 3, 64, 64, generator=g), "text": text, "text_padding_mask": pad}


def _group(batch: dict, k: int) -> list[dict]:
    return [{key: v.chunk(k)[j] for key, v in batch.items()} for j in range(k)]


def _accumulated(task: torch.nn.Module, group: list[dict]) -> list[tuple[torch.Tensor, dict]]:
    """One optimizer step's backwards as the engine runs them: each micro-batch's loss divided by k."""
    out = []
    for j, micro in enumerate(group):
        loss, metrics = task({**micro, MICRO: j, GROUP: group})
        (loss / len(group)).backward()
        out.append((loss.detach(), metrics))
    return out


def _grads(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal to float32 rounding, relative to the tensor's largest entry (summation orders differ)."""
    return bool((got - want).abs().max() <= rel * want.abs().max() + 1e-7)  # k_proj biases: 0 (softmax)


def test_a_step_of_k_micro_batches_has_the_gradient_of_one_batch_of_k_times_b():
    """Gradient caching: accumulation k = 3 of micro-batch b = 2 gives the loss and every parameter's gradient
    of one batch of 6 without accumulation (plain autograd over retrieval's loss); each micro-batch's own
    contrastive loss (2 negatives) does not."""
    k, b = 3, 2
    batch = _batch(k * b, seed=1)
    task = _task()
    reference, naive = copy.deepcopy(task), copy.deepcopy(task)
    ref_loss, _ = Retrieval.forward(reference, batch)
    ref_loss.backward()
    want = _grads(reference)

    steps = _accumulated(task, _group(batch, k))
    got = _grads(task)
    assert set(got) == set(want) == {n for n, p in task.named_parameters() if p.requires_grad}
    assert [name for name in want if not _close(got[name], want[name])] == []
    for loss, metrics in steps:  # every micro-batch reports the step's loss over the 6 pairs
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        assert metrics["itc/negatives"] == k * b
        assert metrics["loss/contrastive"] == pytest.approx(ref_loss.item(), rel=1e-5)

    for micro in _group(batch, k):  # without the cache: k separate losses, b negatives each
        loss, metrics = naive(micro)
        (loss / k).backward()
        assert metrics["itc/negatives"] == b
    differs = [n for n, g in _grads(naive).items() if not _close(g, want[n], rel=1e-2)]
    assert "logit_scale" in differs and len(differs) > len(want) // 2


def test_drop_path_is_replayed_so_the_gradient_is_that_of_the_features_the_loss_saw():
    """With stochastic depth the re-encoding draws the same masks as the cached encoding: the step's gradient
    equals that of one graph over the same encodings (same RNG stream), and the RNG ends where it would."""
    k, b = 2, 2
    batch = _batch(k * b, seed=2)
    group = _group(batch, k)
    task = _task(drop_path_rate=0.5)
    reference = copy.deepcopy(task)

    torch.manual_seed(7)
    images, texts = [], []
    for micro in group:  # the cache's order: each micro-batch's images, then its texts
        images.append(reference.embed_images(micro["image"]))
        texts.append(reference.embed_texts(micro["text"], micro["text_padding_mask"]))
    loss, _ = contrastive_loss(torch.cat(images), torch.cat(texts), reference.logit_scale)
    loss.backward()
    want, rng_after = _grads(reference), torch.get_rng_state()

    torch.manual_seed(7)
    steps = _accumulated(task, group)
    got = _grads(task)
    assert [name for name in want if not _close(got[name], want[name])] == []
    torch.testing.assert_close(steps[0][0], loss.detach())
    assert torch.equal(torch.get_rng_state(), rng_after)
    assert task._cache is None  # freed after the step's last micro-batch


def test_a_steps_flops_are_one_batch_of_k_times_b_plus_the_cached_encodings_as_torch_counts():
    """batch_stats over a step's micro-batches: model FLOPs those of one batch of k*b (the similarities
    against the whole group included), recompute_flops the encodings without gradient; together torch's
    count."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    k, b = 2, 2
    batch, task = _batch(k * b, seed=3), _task()
    group = _group(batch, k)
    stats = [task.batch_stats({**micro, MICRO: j, GROUP: group}) for j, micro in enumerate(group)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _accumulated(task, group)
    flops, recompute = (sum(s[key] for s in stats) for key in ("flops", "recompute_flops"))
    assert flops == task.batch_stats(batch)["flops"] and recompute > 0
    assert counter.get_total_flops() == flops + recompute


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def write_shape_pairs(out_dir: Path, num: int, per_shard: int, seed: int) -> str:
    """Pair shards as beit3-shards writes them (``KEY.png`` + ``KEY.txt``): shapes captioned by colour."""
    split = make_shapes_split(num, 64, seed)
    writer = ShardWriter(str(out_dir), "pairs", max_samples=per_shard)
    for i, ex in enumerate(split.examples[::2]):
        image = split.images[ex["image"]].permute(1, 2, 0).numpy()
        writer.write(f"pair{seed}_{i:05d}", {"png": _png(image), "txt": ex["caption"].encode()})
    writer.close()
    return str(out_dir)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("itc")
    (root / "spm").mkdir()
    return {
        "spm": shapes_spm(root / "spm"),
        "train": write_shape_pairs(root / "train", 48, 12, seed=0),
        "eval": write_shape_pairs(root / "eval", 8, 8, seed=5) + "/pairs-000000.tar",
        "root": root,
    }


def _data_section(assets: dict, *overrides: str, **changes):
    recipe = load_recipe(_recipe_file(assets, assets["root"] / "recipe.toml", data=changes), list(overrides))
    return recipe.data


def _recipe_file(assets: dict, path: Path, **tables) -> str:
    data = {"source": "pretrain_pairs", "train": assets["train"], "eval": assets["eval"], "num_workers": 0,
            "max_train": 0, "max_eval": 0, **tables.pop("data", {})}  # fmt: skip
    return shapes_recipe(path, assets["spm"], "contrastive", data=data, **tables)


def test_the_pair_stream_groups_a_steps_micro_batches_and_resumes_inside_a_group(assets):
    from beit3.tokenizers.text import TextTokenizer

    data = _data_section(assets, "data.hflip=true", crop_scale=0.5)
    tok = TextTokenizer(assets["spm"])
    stream = build_pair_stream(data, tok, 64, 16, 2, 3, rank=0, world_size=1)
    it = iter(stream)
    first = [next(it) for _ in range(3)]
    assert [b[MICRO] for b in first] == [0, 1, 2]
    assert all(b[GROUP] is first[0][GROUP] for b in first) and len(first[0][GROUP]) == 3
    assert set(first[0]) == {"image", "text", "text_padding_mask", MICRO, GROUP}
    assert first[1]["image"].shape == (2, 3, 64, 64) and first[1]["image"] is first[0][GROUP][1]["image"]
    assert stream.counters()["samples/pair"] == 6
    next(it)  # inside the second group
    state = stream.state_dict()
    want = [next(it) for _ in range(4)]

    again = build_pair_stream(data, tok, 64, 16, 2, 3, rank=0, world_size=1)
    again.load_state_dict(state)
    got = [b for _, b in zip(range(4), again)]
    assert [b[MICRO] for b in got] == [1, 2, 0, 1]
    for a, w in zip(got, want):
        assert torch.equal(a["image"], w["image"]) and torch.equal(a["text"], w["text"])
    plain = build_pair_stream(data, tok, 64, 16, 2, 1, rank=0, world_size=1)  # no accumulation: no group
    assert set(next(iter(plain))) == {"image", "text", "text_padding_mask"}


@pytest.mark.parametrize(
    "tables, message",
    [
        ({"data": {"source": "shapes"}}, "task 'contrastive' trains on the pretraining pair shards"),
        ({"task": {"name": "retrieval"}}, "task.name must be one of 'contrastive', not 'retrieval'"),
        ({"data": {"train": ""}}, "needs data.train: pair shards"),
        ({"data": {"randaug": "rand-m9", "crop_scale": 0.5}}, "data.randaug: the pair stream's transform"),
        ({"data": {"color_jitter": 1.5, "crop_scale": 0.5}}, "color_jitter=1.5 must be < 1"),
    ],
)
def test_recipe_mistakes_are_refused_naming_the_fix(assets, tmp_path, tables, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(_recipe_file(assets, tmp_path / "r.toml", **tables))


def test_colour_jitter_without_a_crop_is_the_pair_streams_own_and_needs_no_timm(assets, tmp_path):
    """The pair stream's views are the pretraining loader's (no timm transform): color_jitter needs no
    crop_scale there, unlike the finetuning tasks whose jitter runs inside timm's RandomResizedCrop."""
    recipe = load_recipe(_recipe_file(assets, tmp_path / "r.toml", data={"color_jitter": 0.4}))
    assert recipe.data.color_jitter == 0.4 and recipe.data.crop_scale == 0


def test_unreadable_pair_shards_are_a_data_source_error_naming_data_train(assets):
    from beit3.tokenizers.text import TextTokenizer

    data = _data_section(assets, train=str(assets["root"] / "nowhere"))
    with pytest.raises(FinetuneError, match=r"data.train=.*nowhere.*no shard file"):
        build_pair_stream(data, TextTokenizer(assets["spm"]), 64, 16, 2, 1, rank=0, world_size=1)


# ----- beit3-finetune on 2 ranks ----------------------------------------------------------------------------
STEPS = 20


def _run_args(recipe: str, out: Path, micro: int, accumulation: int, *extra: str) -> list[str]:
    return ["--config", recipe, "--ds-config", str(REPO / "ds_configs/zero0_fp32.json"),
            "--output-dir", str(out), "--ds-set", f"train_micro_batch_size_per_gpu={micro}",
            "--ds-set", f"gradient_accumulation_steps={accumulation}", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def two_rank_runs(assets) -> dict:
    """One 2-rank launch (this file as the torchrun script, below), three beit3-finetune runs in it from the
    same initial weights on the same streamed pairs: micro-batch 2 with accumulation 2 (8 negatives;
    evaluations and checkpoints at steps 10 and 20), micro-batch 4 without (8 negatives; no periodic
    evaluation), and the first resumed from its step-10 checkpoint in another run directory.
    ZeRO-0: under zero3_fp32.json the same assertions hold, at 3x the time."""
    root = assets["root"]
    recipe = _recipe_file(
        assets, root / "run.toml",
        train={"total_steps": STEPS, "warmup_steps": 3, "lr": 5e-4, "log_every": 1, "eval_every": 10},
        param_groups={"layer_decay": 1.0},
    )  # fmt: skip
    step10 = str(root / "accumulated" / "checkpoints" / "step00000010")
    runs = [_run_args(recipe, root / "accumulated", 2, 2, "--set", "train.save_every=10"),
            _run_args(recipe, root / "one_batch", 4, 1, "--set", "train.eval_every=0"),
            _run_args(recipe, root / "resumed", 2, 2, "--resume", step10)]  # fmt: skip
    cmd = [*launcher(2), __file__, json.dumps(runs)]
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {name: {"out": root / name, "scalars": tensorboard_run(root / name)} for name in
            ("accumulated", "one_batch", "resumed")}  # fmt: skip


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_contrast_with_the_global_batch_and_the_loss_falls(two_rank_runs):
    scalars = two_rank_runs["accumulated"]["scalars"]
    losses = [scalars["loss/contrastive"][s] for s in range(1, STEPS + 1)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])  # from log(8) = 2.08: the colours are learnt
    assert set(scalars["itc/negatives"].values()) == {2 * 2 * 2.0}  # world x accumulation x micro-batch
    assert scalars["data/samples/pair"][STEPS] == STEPS * 2 * 2 * 2  # streamed, every rank its own pairs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_train_with_accumulation_as_with_one_micro_batch_of_the_step(two_rank_runs):
    """Under DeepSpeed on 2 ranks, accumulation 2 of micro-batch 2 trains as micro-batch 4 without: the same
    losses and gradient norms step after step (the same pairs, the same 8 negatives)."""
    a, b = (two_rank_runs[name]["scalars"] for name in ("accumulated", "one_batch"))
    assert set(b["itc/negatives"].values()) == {8.0}
    for tag in ("loss/contrastive", "optim/grad_norm", "acc/i2t"):
        assert sorted(a[tag]) == sorted(b[tag]) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            # measured: within 2e-5 (loss) and 8e-5 (gradient norm) over the 20 steps
            assert a[tag][step] == pytest.approx(b[tag][step], rel=3e-4, abs=1e-6), (tag, step)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_resumed_at_a_checkpoint_continue_exactly(two_rank_runs):
    """The pair stream's state (and the engine's) restored at step 10: steps 11-20 are the straight run's."""
    a, r = (two_rank_runs[name]["scalars"] for name in ("accumulated", "resumed"))
    assert sorted(r["loss/contrastive"]) == list(range(11, STEPS + 1))
    for tag in ("loss/contrastive", "optim/grad_norm", "data/samples/pair", "eval/average"):
        assert {s: v for s, v in a[tag].items() if s > 10} == r[tag], tag


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_evaluate_zero_shot_retrieval_and_export_a_retrieval_model(two_rank_runs):
    from beit3.model import read_state_dict

    scalars, out = two_rank_runs["accumulated"]["scalars"], two_rank_runs["accumulated"]["out"]
    tags = [f"eval/{d}_r{k}" for d in ("tr", "ir") for k in (1, 5, 10)] + ["eval/average"]
    for tag in tags:
        assert sorted(scalars[tag]) == [10, STEPS] and 0.0 <= scalars[tag][STEPS] <= 1.0
    # 8 held-out pairs: every image's text, and every text's image, is among the 10 best
    assert scalars["eval/tr_r10"][STEPS] == scalars["eval/ir_r10"][STEPS] == 1.0
    report = json.loads((out / "eval.json").read_text())
    assert report["step"] == STEPS and set(tags) <= set(report)
    retrieval = Retrieval(build_encoder("beit3_tiny_patch16_64", "dual", **TINY))
    assert set(read_state_dict(out / "model.pth")) == set(retrieval.state_dict())
    assert os.path.isfile(out / "best_model.pth")


if __name__ == "__main__":  # the torchrun script of two_rank_runs: several beit3-finetune runs, one launch
    from beit3.engine.launch import init_distributed, shutdown_distributed
    from beit3.finetune.train import main

    # Created once, here: the runs share it and leave it (a program that owned it would destroy it at its
    # end, and re-creating it on torchrun's store between programs can race across ranks).
    init_distributed()
    codes = [main(args) for args in json.loads(sys.argv[1])]
    shutdown_distributed()
    sys.exit(max(codes))
