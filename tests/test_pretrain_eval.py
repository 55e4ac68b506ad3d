"""Evaluation during pretraining (pretrain/evaluation.py): the [eval] table's errors, fixed figures that do
not depend on the world size nor touch the training generators, and the image-use probe on pairs whose
caption is a function of the image."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_data import encode_image

from beit3.engine.config_io import ConfigError
from beit3.engine.trainer_config import TrainSettings
from beit3.finetune.data.build import COLORS
from beit3.model import build_model
from beit3.pretrain.data import PretrainDataConfig, PretrainLoader
from beit3.pretrain.data.tario import ShardWriter
from beit3.pretrain.evaluation import (
    EvalConfig,
    HeldOutEvaluation,
    derangement,
    pooled_health,
    train_settings,
)
from beit3.pretrain.objective import MaskedDataModeling
from beit3.pretrain.recipe import load_recipe, validate_run
from beit3.tokenizers.text import TextTokenizer, train_sentencepiece
from beit3.tokenizers.vqkd import build_visual_tokenizer

DS = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1}
SPLIT = {"images": 4, "texts": 4, "pairs": 4}
pytestmark = pytest.mark.filterwarnings("ignore:visual tokenizer .* has random weights")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def colour_shards(out_dir: Path, kind: str, count: int, seed: int, per_shard: int = 16) -> Path:
    """``count`` samples of ``kind``: solid-colour images (a little noise), the caption naming the colour."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(str(out_dir), kind, max_samples=per_shard)
    names = list(COLORS)
    for i in range(count):
        colour = names[int(rng.integers(len(names)))]
        fields = {}
        if kind in ("images", "pairs"):
            pixels = np.clip(np.array(COLORS[colour]) + rng.normal(0, 12, (64, 64, 3)), 0, 255)
            fields["png"] = encode_image(pixels.astype(np.uint8), "PNG")
        if kind in ("texts", "pairs"):
            fields["txt"] = f"a picture of {colour}".encode()
        writer.write(f"{kind[:-1]}{i:05d}", fields)
    writer.close()
    return out_dir


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("colours")
    (root / "captions.txt").write_text("\n".join(f"a picture of {c}" for c in COLORS) * 20)
    # One piece per word: a masked colour is one token, predictable from the image only.
    spm = train_sentencepiece([root / "captions.txt"], root / "words", 30, model_type="word")
    data = {
        f"{split}_{kind}": str(colour_shards(root / split / kind, kind, count, seed) / "*.tar")
        for split, count, seed in (("train", 64, 1), ("eval", 40, 2))
        for kind in ("images", "texts", "pairs")
    }
    return {"spm": spm, "tokenizer": TextTokenizer(spm), **data}


def data_config(colours: dict, **changes) -> PretrainDataConfig:
    base = dict(
        image_shards=[colours["train_images"]],
        text_shards=[colours["train_texts"]],
        pair_shards=[colours["train_pairs"]],
        img_size=64, patch_size=16, tokenizer_img_size=64, min_num_patches=2,
        text_max_len=16, pair_text_max_len=16, num_workers=0, shuffle_buffer=16, open_shards=2,
    )  # fmt: skip
    return PretrainDataConfig(**{**base, **changes})


def eval_config(colours: dict, streams=("image", "text", "pair"), **changes) -> EvalConfig:
    shards = {f"{s}_shards": [colours[f"eval_{s}s"]] for s in streams}
    return EvalConfig(**shards, **{"samples": 30, **changes})


def tiny_task(seed: int = 0) -> MaskedDataModeling:
    torch.manual_seed(seed)
    model = build_model("beit3_tiny_patch16_64", vocab_size=16, visual_vocab_size=1024, max_text_positions=18)
    visual = build_visual_tokenizer("vqkd_tiny_patch16_64", None)
    return MaskedDataModeling(model, visual)


def evaluation(colours, data, cfg, rank=0, world_size=1, split=SPLIT) -> HeldOutEvaluation:
    shards = cfg.check_shards(data)
    return HeldOutEvaluation(cfg, data, colours["tokenizer"], split, shards, rank, world_size)


# ----- the [eval] table -----
def write_recipe(tmp_path: Path, eval_table: str, train_table: str = "") -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(f"""
[model]
name = "beit3_tiny_patch16_64"
overrides = {{vocab_size = 1000, visual_vocab_size = 1024}}
[tokenizers]
visual = "vqkd_tiny_patch16_64"
[data]
image_shards = ["train/*.tar"]
img_size = 64
patch_size = 16
tokenizer_img_size = 64
text_max_len = 32
pair_text_max_len = 32
min_num_patches = 2
[train]
total_steps = 10
{train_table}
{eval_table}
""")
    return path


@pytest.mark.parametrize(
    ("eval_table", "train_table", "message"),
    [
        ("[eval]\nshards = ['x.tar']", "", "unknown key(s) ['shards'] in [eval]"),
        (
            "[eval]\nsamples = 64",
            "",
            "[eval] sets samples but names no held-out shards: set eval.image_shards",
        ),
        ("", "eval_every = 5", "train.eval_every=5 evaluates on held-out shards, but there is no [eval]"),
        ("[eval]\nsamples = 1\nimage_shards = ['x.tar']", "", "eval.samples=1 is out of range"),
        ("[eval]\npair_shards = ['x.tar']", "", "eval.pair_shards: the micro-batch trains no pairs"),
    ],
)
def test_a_bad_eval_table_is_refused_naming_the_fix(tmp_path, eval_table, train_table, message):
    path = write_recipe(tmp_path, eval_table, train_table)
    with pytest.raises(ConfigError) as err:  # read, then checked as beit3-pretrain does (no file read)
        recipe = load_recipe(path, ["batch.pairs=0", "batch.texts=0"])
        validate_run(recipe, {**DS, "train_micro_batch_size_per_gpu": 1}, 1)
    assert message in str(err.value)


def test_no_eval_table_means_no_evaluation(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, ""))
    assert recipe.eval == EvalConfig() and not recipe.eval.streams
    assert validate_run(recipe, DS, 1)


def test_held_out_shards_are_evaluated_at_the_end_when_eval_every_is_0():
    held_out = EvalConfig(pair_shards=["held_out.tar"])
    assert train_settings(TrainSettings(total_steps=30), held_out).eval_every == 30
    assert train_settings(TrainSettings(total_steps=30, eval_every=10), held_out).eval_every == 10
    assert train_settings(TrainSettings(total_steps=30), EvalConfig()).eval_every == 0


def test_eval_shards_must_match_files_and_not_be_training_shards(colours, tmp_path):
    data = data_config(colours)
    with pytest.raises(ConfigError, match=r"eval.text_shards: no shard file matches .*nowhere"):
        EvalConfig(text_shards=[str(tmp_path / "nowhere" / "*.tar")]).check_shards(data)
    with pytest.raises(ConfigError, match=r"eval.pair_shards: 4 of its 4 shards are also training shards"):
        EvalConfig(pair_shards=[colours["train_pairs"]]).check_shards(data)
    found = eval_config(colours).check_shards(data)
    assert [len(found[s]) for s in ("image", "text", "pair")] == [3, 3, 3]


# ----- the figures -----
def test_derangement_has_no_fixed_point_and_is_fixed():
    for n in (2, 3, 7, 30):
        partner = derangement(n, seed=5)
        assert sorted(partner) == list(range(n)) and all(p != i for i, p in enumerate(partner))
        assert partner == derangement(n, seed=5)


def test_pooled_health_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) @ np.diag([5.0, 1, 1, 0.5, 0.1, 0.1])
    t = torch.from_numpy(x)
    share, rank = pooled_health(50.0, t.sum(0), t.T @ t)
    eig = np.linalg.eigvalsh(np.cov(x.T, bias=True))
    p = eig / eig.sum()
    assert share == pytest.approx(eig.max() / eig.sum())
    assert rank == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    collapsed = torch.ones(10, 4) * torch.tensor([1.0, 2, 3, 4])
    assert pooled_health(10.0, collapsed.sum(0), collapsed.T @ collapsed) == (1.0, 1.0)


def test_figures_are_fixed_independent_of_world_size_and_leave_training_untouched(colours):
    data = data_config(colours)
    cfg = eval_config(colours, samples=17)
    task = tiny_task()
    task.train()
    single = evaluation(colours, data, cfg)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    first = single.evaluate(task, torch.device("cpu"), step=1)
    assert task.training and all(p.grad is None for p in task.parameters())
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert single.evaluate(task, torch.device("cpu"), step=2) == first  # the same samples and masks
    # 2 ranks: their sums add up to the single rank's figures (17 samples: 9 and 8, 4 per forward: rank 1
    # forwards a filler row in its third forward)
    ranks = [evaluation(colours, data, cfg, r, 2) for r in (0, 1)]
    assert len(ranks[0].batches) == len(ranks[1].batches) == 3
    assert ranks[1].batches[-1]["image"]["rows_valid"].tolist() == [False]
    parts = [r.partial_sums(task.eval(), torch.device("cpu")) for r in ranks]
    two = single.figures({k: parts[0][k] + parts[1][k] for k in parts[0]})
    assert sorted(two) == sorted(first)
    for tag, value in first.items():
        assert two[tag] == pytest.approx(value, rel=1e-6, abs=1e-9), tag
    for term in ("mim", "mlm", "vl_mlm", "vl_mim"):
        assert 0 <= first[f"eval/acc/{term}"] <= 1 and first[f"eval/loss/{term}"] > 0
    assert 0 < first["eval/health/image_top_pc_share"] <= 1 and first["eval/health/degenerate"] in (0.0, 1.0)


def test_ranks_that_read_the_held_out_shards_differently_all_stop_together(colours, monkeypatch):
    """A shard one rank cannot read gives it other samples (another number of forwards under ZeRO-3: a
    hang): every rank compares what it read and all raise EvalDataError naming the stream; a single pair
    (whose "shuffled" image would be its own) is refused."""
    import beit3.pretrain.evaluation as ev

    data, cfg = data_config(colours), eval_config(colours, ("pair",), samples=12)
    seen = {}

    def gather(out, found):  # rank 1 read 4 pairs fewer
        seen["found"] = found
        out[:] = [found, {"pair": (found["pair"][0] - 4, {"tar_read": 1})}]

    monkeypatch.setattr(ev.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ev.torch_dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(ev.torch_dist, "all_gather_object", gather)
    with pytest.raises(ev.EvalDataError, match=r"read differently across ranks.*'pair': \[12, 8\]"):
        evaluation(colours, data, cfg, 0, 2)
    assert seen["found"] == {"pair": (12, {})}
    monkeypatch.setattr(
        ev.torch_dist, "all_gather_object", lambda out, found: out.__setitem__(slice(None), [found] * 2)
    )
    assert len(evaluation(colours, data, cfg, 0, 2).batches) == 2  # agreed: 6 pairs each, 4 a forward
    with pytest.raises(ev.EvalDataError, match="1 usable pair"):
        evaluation(colours, data, eval_config(colours, ("pair",), samples=1), 0, 1)


def test_image_use_probe_is_positive_once_captions_are_learnt_from_images(colours):
    """Captions name the colour of a solid-colour image: a tiny model trained a few dozen steps predicts a
    masked colour word better with the true image than with another pair's."""
    data = data_config(colours, pair_image_mask_prob=0.0, color_jitter=0.0)  # every pair masks its text
    cfg = EvalConfig(pair_shards=[colours["eval_pairs"]], samples=40)
    held_out = evaluation(colours, data, cfg, split={"pairs": 16})
    task = tiny_task()
    before = held_out.evaluate(task, torch.device("cpu"), step=0)
    assert "eval/loss/vl_mim" not in before  # no pair masks its image: no figure rather than a 0
    loader = iter(PretrainLoader(data, colours["tokenizer"], {"pair": 16}, rank=0, world_size=1))
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3, weight_decay=0.0)
    task.train()
    for _ in range(40):
        loss, _ = task(task.prepare_batch(next(loader), torch.device("cpu")))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out.evaluate(task, torch.device("cpu"), step=40)
    assert after["eval/acc/vl_mlm"] > before["eval/acc/vl_mlm"] + 0.3
    assert after["eval/image_use"] > max(0.05, before["eval/image_use"] + 0.05), (before, after)
    # the colour is in the image only
    assert after["eval/acc/vl_mlm"] > after["eval/acc/vl_mlm_no_image"] + 0.05
    use = after["eval/acc/vl_mlm"] - after["eval/acc/vl_mlm_shuffled_image"]
    assert after["eval/image_use"] == pytest.approx(use)


def test_beit3_pretrain_exits_2_naming_an_eval_glob_that_matches_nothing(colours, tmp_path, capsys):
    from beit3.pretrain import train

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
[model]
name = "beit3_tiny_patch16_64"
overrides = {{vocab_size = 16, visual_vocab_size = 1024, max_text_positions = 18}}
[tokenizers]
text = "{colours["spm"]}"
visual = "vqkd_tiny_patch16_64"
[data]
image_shards = ["{colours["train_images"]}"]
text_shards = ["{colours["train_texts"]}"]
pair_shards = ["{colours["train_pairs"]}"]
img_size = 64
patch_size = 16
tokenizer_img_size = 64
text_max_len = 16
pair_text_max_len = 16
min_num_patches = 2
[eval]
pair_shards = ["{tmp_path}/held_out/*.tar"]
""")
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1}')
    code = train.main(
        ["--config", str(recipe), "--ds-config", str(ds), "--output-dir", str(tmp_path / "run")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "eval.pair_shards: no shard file matches" in err and "held_out" in err
