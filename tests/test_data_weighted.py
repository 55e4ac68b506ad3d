"""Weighted sources inside a stream (issue 15 item 2): several named sources with weights for one stream,
each sample's source drawn by weight, deterministically from the seed and slot; per-source counters in the
loader and in TensorBoard (``data/source/<name>/samples``); exact resume with and without workers; config
errors before training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from engine_helpers import DS_CONFIGS, ToyMultiwayTask, tensorboard_scalars
from tiny_data import noise_image, sentence

from beit3.pretrain.data import DataConfigError, PretrainDataConfig, build_pretrain_loader
from beit3.pretrain.data.streams import WeightedSampleSource
from beit3.pretrain.data.tario import ShardWriter


def write_source(out_dir, prefix: str, num_samples: int, per_shard: int, seed: int) -> str:
    """Pair shards whose keys start with ``prefix``, so every sample names its source."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(str(out_dir), "pairs", max_samples=per_shard)
    for i in range(num_samples):
        writer.write(f"{prefix}{i:05d}", {"jpg": noise_image(rng, 16, 16), "txt": sentence(i).encode()})
    writer.close()
    return str(out_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("weighted")
    dirs = {
        "big": write_source(root / "big", "big", 16, 4, seed=1),
        "small": write_source(root / "small", "small", 12, 4, seed=2),
        "none": write_source(root / "none", "none", 4, 4, seed=3),
    }
    images = ShardWriter(str(root / "images"), "images", max_samples=4)
    rng = np.random.default_rng(4)
    for i in range(8):
        images.write(f"image{i:05d}", {"jpg": noise_image(rng, 16, 16)})
    images.close()
    return root, dirs, tok


def sources(dirs, big=3.0, small=1.0, **extra) -> list[dict]:
    out = [
        {"name": "big", "shards": dirs["big"], "weight": big},
        {"name": "small", "shards": [dirs["small"]], "weight": small},
    ]
    return out + [{"name": n, "shards": dirs["none"], "weight": w} for n, w in extra.items()]


def make_cfg(dirs, **kw) -> PretrainDataConfig:
    base = dict(
        pair_sources=sources(dirs),
        img_size=16,
        patch_size=8,
        tokenizer_img_size=16,
        text_max_len=16,
        pair_text_max_len=12,
        min_num_patches=1,
        num_workers=0,
        shuffle_buffer=4,
        open_shards=2,
        return_keys=True,
    )
    base.update(kw)
    return PretrainDataConfig(**base)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    loader.close()
    return out


def pair_keys(batches) -> list[str]:
    return [k for b in batches for k in b["pair"]["keys"]]


def within_binomial_noise(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_samples_follow_the_weights_within_binomial_noise_and_the_counters_say_so(data):
    root, dirs, tok = data
    # A third source of weight 0: never drawn, but counted (at 0) so the tags are stable.
    loader = build_pretrain_loader(make_cfg(dirs, pair_sources=sources(dirs, zero=0.0)), tok, 0, 0, 8)
    keys = pair_keys(take(loader, 200))
    n = len(keys)
    big = sum(k.startswith("big") for k in keys)
    small = sum(k.startswith("small") for k in keys)
    assert big + small == n == 1600
    assert within_binomial_noise(big, n, 0.75), (big, small)  # 3:1 is 1200 +- 69 (4 sigma)
    counters = loader.counters()
    assert counters["source/big/samples"] == big and counters["source/small/samples"] == small
    assert counters["source/zero/samples"] == 0 and counters["samples/pair"] == n
    assert loader.counter_names[-3:] == ("source/big/samples", "source/small/samples", "source/zero/samples")


@pytest.mark.parametrize("weights", [(3.0, 1.0, 0.0), (0.5, 0.15, 0.35)])
def test_the_chooser_of_every_slot_draws_in_proportion_to_the_weights(weights):
    # Only the choices are drawn here: no shard is opened.
    specs = [(name, w, [f"{name}-000000.tar"]) for name, w in zip("abc", weights)]
    p = [w / sum(weights) for w in weights]
    n = 10_000
    for slot in range(4):  # two ranks x two workers: every slot on its own draws
        chooser = WeightedSampleSource("pair", specs, slot, 4, seed=7)
        picks = [chooser.choose() for _ in range(n)]
        for name, share in zip("abc", p):
            count = picks.count(name)
            if share == 0:
                assert count == 0
            else:
                assert within_binomial_noise(count, n, share), (slot, name, count, n * share)


def test_choices_are_deterministic_from_the_seed_and_rank(data):
    _, dirs, tok = data
    cfg = make_cfg(dirs)
    runs = [pair_keys(take(build_pretrain_loader(cfg, tok, 0, 0, 4), 6)) for _ in range(2)]
    assert runs[0] == runs[1]
    other_seed = pair_keys(take(build_pretrain_loader(make_cfg(dirs, seed=1), tok, 0, 0, 4), 6))
    ranks = [
        pair_keys(take(build_pretrain_loader(cfg, tok, 0, 0, 4, rank=r, world_size=2), 6)) for r in (0, 1)
    ]
    origin = [[k.rstrip("0123456789") for k in run] for run in (runs[0], other_seed, *ranks)]
    # Another seed or rank: another sequence of sources, not only of samples.
    assert origin[0] != origin[1] and origin[2] != origin[3]
    # Ranks still read disjoint samples of each source.
    assert not set(ranks[0]) & set(ranks[1])


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for stream in a:
        assert a[stream].keys() == b[stream].keys()
        for k, v in a[stream].items():
            if torch.is_tensor(v):
                assert torch.equal(v, b[stream][k]), (stream, k)
            else:
                assert v == b[stream][k], (stream, k)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(data, num_workers):
    root, dirs, tok = data
    # A plain image stream beside the weighted pair stream.
    cfg = make_cfg(dirs, image_shards=[str(root / "images")], num_workers=num_workers)
    reference = take(build_pretrain_loader(cfg, tok, 2, 0, 4), 7)
    first = build_pretrain_loader(cfg, tok, 2, 0, 4)
    take(first, 3)  # an odd count: with 2 workers the next batch belongs to the second one
    state = first.state_dict()
    counted = first.counters()
    # The state holds the chooser's position and each source's own stream position.
    producer = state["producers"][0]["sources"]["pair"]
    assert producer["choices"] > 0 and set(producer["sources"]) == {"big", "small"}
    assert all("draws" in s and "buffer" in s for s in producer["sources"].values())
    resumed = build_pretrain_loader(cfg, tok, 2, 0, 4)
    resumed.load_state_dict(state)
    assert resumed.counters() == counted
    for expected, got in zip(reference[3:], take(resumed, 4), strict=True):
        _assert_same(expected, got)
    whole = build_pretrain_loader(cfg, tok, 2, 0, 4)
    take(whole, 7)
    assert resumed.counters() == whole.counters()


def test_a_state_with_other_weights_reseeds_and_keeps_the_counts(data):
    _, dirs, tok = data
    old = build_pretrain_loader(make_cfg(dirs), tok, 0, 0, 4)
    old_keys = pair_keys(take(old, 3))
    changed = build_pretrain_loader(make_cfg(dirs, pair_sources=sources(dirs, big=1.0)), tok, 0, 0, 4)
    changed.load_state_dict(old.state_dict())
    assert changed.state_dict()["seed"] != old.state_dict()["seed"]  # not the old positions
    got = take(changed, 1)
    assert changed.counters()["samples/pair"] == 16
    assert changed.counters()["source/big/samples"] == sum(k.startswith("big") for k in old_keys) + sum(
        k.startswith("big") for k in pair_keys(got)
    )


def test_the_plain_shard_list_form_is_one_unnamed_source(data):
    _, dirs, tok = data
    loader = build_pretrain_loader(make_cfg(dirs, pair_sources=[], pair_shards=[dirs["big"]]), tok, 0, 0, 4)
    assert not any(name.startswith("source/") for name in loader.counter_names)
    assert all(k.startswith("big") for k in pair_keys(take(loader, 2)))
    assert "choices" not in loader.state_dict()["producers"][0]["sources"]["pair"]


class _ToyFromPretrain:
    """The pretraining loader as the toy task's data source: its counters, state and re-seeding are the
    loader's own, each batch becomes a toy batch (the engine carries counters from source to TensorBoard)."""

    def __init__(self, loader):
        self.loader = loader
        self.counter_names = loader.counter_names
        self.index = 0

    def __iter__(self):
        for batch in self.loader:
            x = batch["pair"]["image"].flatten(1)[:, :8].float()
            y = torch.zeros(len(x), dtype=torch.long)
            self.index += 1
            yield {"xa": x, "ya": y, "xb": x, "yb": y, "index": self.index - 1}

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)

    def start_at(self, micro_batches):
        self.loader.start_at(micro_batches)

    def counters(self):
        return self.loader.counters()


@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*script_method.* is deprecated:DeprecationWarning")
def test_source_counters_reach_tensorboard_as_data_source_name_samples(data, tmp_path):
    from beit3.engine.ds_config import load_ds_config
    from beit3.engine.launch import init_distributed
    from beit3.engine.trainer import Trainer, TrainerConfig

    _, dirs, tok = data
    dist = init_distributed()
    torch.manual_seed(0)
    ds = load_ds_config(
        DS_CONFIGS / "zero0_fp32.json", dist.world_size, {"train_micro_batch_size_per_gpu": 4}
    )
    source = _ToyFromPretrain(build_pretrain_loader(make_cfg(dirs), tok, 0, 0, 4))
    settings = {"log_every": 2, "save_every": 0, "lr": 1e-2, "warmup_steps": 1, "shutdown_at_end": False}
    trainer = Trainer(
        ToyMultiwayTask(),
        source,
        ds,
        TrainerConfig(output_dir=str(tmp_path), total_steps=4, **settings),
        dist,
    )
    trainer.fit()
    counters = source.loader.counters()
    assert counters["source/big/samples"] + counters["source/small/samples"] == counters["samples/pair"] > 0
    for name in ("big", "small"):
        logged = tensorboard_scalars(tmp_path, f"data/source/{name}/samples")
        assert logged[4] == counters[f"source/{name}/samples"], logged
        assert logged[2] <= logged[4]


BAD_SOURCES = [
    ([{"name": "a", "shards": "x.tar", "weigth": 1.0}], r"pair_sources\[0\]: unknown key\(s\) \['weigth'\]"),
    ([{"name": "a", "shards": "x.tar"}], r"pair_sources\[0\] lacks \['weight'\]"),
    ([{"name": "a", "shards": "x.tar", "weight": -1.0}], r"weight=-1.0 \(a\): give a number >= 0"),
    ([{"name": "a", "shards": "x.tar", "weight": float("nan")}], r"weight=nan \(a\)"),
    ([{"name": "a", "shards": "x.tar", "weight": True}], r"weight=True \(a\)"),
    (
        [{"name": "a", "shards": "x.tar", "weight": 0}, {"name": "b", "shards": "y.tar", "weight": 0.0}],
        "weights sum to 0",
    ),
    (
        [{"name": "a", "shards": "x.tar", "weight": 1}, {"name": "a", "shards": "y.tar", "weight": 1}],
        r"pair_sources\[1\].name='a' also names a source in data.pair_sources: rename one",
    ),
    ([{"name": "a", "shards": "", "weight": 1}], r"shards='' \(a\): give a shard spec"),
    ([{"name": "a", "shards": [], "weight": 1}], r"shards=\[\] \(a\): give a shard spec"),
    ([{"name": "cc 3m", "shards": "x.tar", "weight": 1}], "use letters, digits"),
    ([{"name": "a/b", "shards": "x.tar", "weight": 1}], "use letters, digits"),
    (["x.tar"], r"pair_sources\[0\] must be a table"),
]


@pytest.mark.parametrize("entries, message", BAD_SOURCES)
def test_a_malformed_source_list_is_a_config_error_naming_the_fix(entries, message):
    cfg = PretrainDataConfig(pair_sources=entries)
    assert cfg.problem() is not None
    with pytest.raises(DataConfigError, match=message):
        cfg.validate()


def test_other_source_config_errors(data, tmp_path):
    _, dirs, tok = data
    with pytest.raises(DataConfigError, match="pair_shards and data.pair_sources are both set: use one"):
        make_cfg(dirs, pair_shards=[dirs["big"]]).validate()
    # A name is a TensorBoard tag: unique across the streams too.
    image_source = [{"name": "big", "shards": dirs["none"], "weight": 1.0}]
    with pytest.raises(
        DataConfigError, match=r"pair_sources\[0\].name='big' also names a source in data.image_"
    ):
        make_cfg(dirs, image_sources=image_source).validate()
    missing = sources(dirs) + [{"name": "cc3m", "shards": str(tmp_path / "cc3m-{000..003}.tar"), "weight": 1}]
    with pytest.raises(DataConfigError, match=r"pair_sources\[2\] \(cc3m\): no shard file matches"):
        make_cfg(dirs, pair_sources=missing).validate()
    with pytest.raises(DataConfigError, match="pair_shards is empty: .* or pair_sources"):
        build_pretrain_loader(make_cfg(dirs, pair_sources=[], image_shards=[dirs["big"]]), tok, 1, 0, 1)


def test_beit3_pretrain_refuses_a_bad_source_with_exit_2_before_training(tmp_path, capsys):
    from test_pretrain_config_errors import run_main, write_ds, write_recipe

    shard = tmp_path / "images-000000.tar"
    shard.write_bytes(b"")
    spm = tmp_path / "unread.spm"  # the sources are checked before any file is read
    spm.write_bytes(b"")
    recipe = write_recipe(tmp_path, spm, shard)
    bad = 'data.pair_sources=[{name="cc3m",shards="x.tar",weight=1},{name="coco",shards="y.tar",weight=-1}]'
    code, err = run_main(
        capsys, recipe, write_ds(tmp_path), tmp_path, "--set", "data.pair_shards=[]", "--set", bad
    )
    assert code == 2, err
    assert "data.pair_sources[1].weight=-1 (coco): give a number >= 0" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
