"""bench/pretraining_helps.py's image-use probe over mask draws: every draw its own seed, the figures
averaged, the spread of true - shuffled the sample standard deviation over the draws."""

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pretraining_helps as bench  # noqa: E402


def test_probe_draws_averages_each_seed_and_spreads_the_image_use(monkeypatch):
    seen = []

    def one_draw(checkpoint, spm, shapes, pairs, seed=0):
        seen.append(seed)
        true, shuffled = 0.5 + 0.1 * seed, 0.4 + 0.05 * seed * seed
        return {"true image": true, "shuffled image": shuffled, "no image": 0.3 + seed,
                "image_use": true - shuffled, "pairs": 7, "masked_tokens": 10 + seed}  # fmt: skip

    monkeypatch.setattr(bench, "image_use_probe", one_draw)
    out = bench.probe_draws(None, Path("spm.model"), {}, ("images", "captions"), draws=4)
    assert seen == [0, 1, 2, 3]
    uses = [0.1 + 0.1 * s - 0.05 * s * s for s in range(4)]
    assert out["image_use_draws"] == pytest.approx(uses)
    assert out["image_use"] == pytest.approx(statistics.fmean(uses))
    assert out["image_use_sd"] == pytest.approx(statistics.stdev(uses))
    assert out["true image"] == pytest.approx(0.65) and out["no image"] == pytest.approx(1.8)
    assert out["pairs"] == 7 and out["masked_tokens"] == 46


def test_one_draw_has_no_spread(monkeypatch):
    figures = {"true image": 0.6, "shuffled image": 0.5, "no image": 0.4, "image_use": 0.1, "pairs": 3,
               "masked_tokens": 5}  # fmt: skip
    monkeypatch.setattr(bench, "image_use_probe", lambda *args: figures)
    out = bench.probe_draws(None, Path("spm.model"), {}, ("images", "captions"), draws=1)
    assert out["image_use"] == pytest.approx(0.1) and out["image_use_sd"] == 0.0


def test_a_run_of_other_settings_or_a_failed_one_runs_again_in_a_clean_folder(tmp_path, monkeypatch):
    """The contrastive stage's cache (the finetuning stage's works alike): a record of other settings and a
    failed record each run again, after the earlier run's folder (checkpoints the harness's fresh start
    would refuse) is removed; records that stand are not rerun."""
    preset, args = {"itc_steps": 180, "itc_sets": ()}, argparse.Namespace(seeds=[0], batch=4, threads=1)
    settings = {"steps": 180, "sets": ["train.seed=0", "data.seed=0", "train.eval_every=0"]}
    stale = {"scratch": {"0": {"eval/average": 0.1, "settings": {**settings, "steps": 60}}},
             "pretrained": {"0": {"error": "exit 2", "settings": settings}}}  # fmt: skip
    (tmp_path / "contrastive.json").write_text(json.dumps(stale))
    for start in bench.STARTS:
        left = tmp_path / f"contrastive/seed0/itc_small_{start}/checkpoints"
        left.mkdir(parents=True)
        (left / "step00000060").write_text("an earlier run's checkpoint")
    calls = []

    def run_one(recipe, start, run_args, spm, shapes, data_sets):
        assert not (run_args.work / f"{recipe}_{start}").exists()  # cleared before the run
        calls.append((recipe, start, run_args.steps))
        return {"eval/average": 0.3, "wall_s": 1.0}

    monkeypatch.setattr(bench.finetune_small, "run_one", run_one)
    results = bench.contrastive(tmp_path, preset, args, Path("spm.model"), Path("model.pth"), {})
    assert calls == [("itc_small", "scratch", 180), ("itc_small", "pretrained", 180)]
    for start in bench.STARTS:
        assert results[start]["0"] == {"eval/average": 0.3, "wall_s": 1.0, "settings": settings}
    assert json.loads((tmp_path / "contrastive.json").read_text()) == results
    calls.clear()
    bench.contrastive(tmp_path, preset, args, Path("spm.model"), Path("model.pth"), {})
    assert calls == []  # both records now stand


def test_a_pretraining_export_of_another_command_is_refused_not_reused(tmp_path, monkeypatch):
    """The pretraining stages' cache: an export stands when the command that made it is the preset's now;
    one of another command (a preset changed since), or one warm-started from an export this invocation
    remade, exits naming the folders to remove; an export without a record (older runs) is taken. Each
    stage's wall time is kept beside its export and reported again when the stage is reused."""
    preset = {"ranks": 1, "pretrain_steps": 30, "warm_stages": [{"name": "pairs", "steps": 20, "mix": {}}]}
    runs = []

    def command(work, preset, spm, vqkd, name, steps, mix, export, warm_start=None, lr=None, seed=0):
        return [
            "beit3-pretrain",
            f"--name={name}",
            f"train.total_steps={steps}",
            f"warm={warm_start}",
            f"{seed=}",
        ]

    def run(cmd, log, threads):
        runs.append(cmd[1])
        export = tmp_path / f"{cmd[1].removeprefix('--name=')}_export/model.pth"
        export.parent.mkdir(parents=True, exist_ok=True)
        export.write_text("weights")
        return 1.5

    monkeypatch.setattr(bench, "_pretrain_cmd", command)
    monkeypatch.setattr(bench, "run", run)
    export, walls = bench.pretrain(tmp_path, preset, Path("spm.model"), Path("vqkd.pth"), 2)
    assert (export, walls, runs) == (
        tmp_path / "pretrain_export/model.pth",
        {"pairs_s": 1.5, "pretrain_s": 1.5},
        ["--name=pairs", "--name=pretrain"],
    )
    assert json.loads((tmp_path / "pretrain_export/command.json").read_text())[2] == "train.total_steps=30"
    runs.clear()
    # the stages stand, and so do their wall times (a rerun that runs nothing still reports them)
    walls = bench.pretrain(tmp_path, preset, Path("spm.model"), Path("vqkd.pth"), 2)[1]
    assert walls == {"pairs_s": 1.5, "pretrain_s": 1.5} and runs == []

    with pytest.raises(SystemExit, match=r"another command.*train.total_steps=45.*remove .*pretrain_export"):
        bench.pretrain(tmp_path, {**preset, "pretrain_steps": 45}, Path("spm.model"), Path("vqkd.pth"), 2)
    assert runs == []

    for record in ("command.json", "wall.json"):  # an export of a run before the records
        (tmp_path / "pretrain_export" / record).unlink()
    assert bench.pretrain(tmp_path, preset, Path("spm.model"), Path("vqkd.pth"), 2)[1] == {"pairs_s": 1.5}
    assert runs == []

    # another pretraining seed: the same chain in runs of its own, warm-started from its own stage
    export, walls = bench.pretrain(tmp_path, preset, Path("spm.model"), Path("vqkd.pth"), 2, seed=1)
    assert export == tmp_path / "pretrain_seed1_export/model.pth"
    assert walls == {"pairs_seed1_s": 1.5, "pretrain_seed1_s": 1.5}
    assert runs == ["--name=pairs_seed1", "--name=pretrain_seed1"]
    made = json.loads((tmp_path / "pretrain_seed1_export/command.json").read_text())
    assert made[3:] == [f"warm={tmp_path / 'pairs_seed1_export/model.pth'}", "seed=1"]
    runs.clear()

    (tmp_path / "pairs_export/model.pth").unlink()
    with pytest.raises(SystemExit, match="warm-started from an export that was just made again"):
        bench.pretrain(tmp_path, preset, Path("spm.model"), Path("vqkd.pth"), 2)
    assert runs == ["--name=pairs"]


def test_the_probe_over_pretraining_seeds_pairs_each_seed_with_its_own_rows():
    probe = {
        "pretrained": {"image_use": 0.10},
        "pretrained, easy_vqa pairs only": {"image_use": 0.16},
        "pretrained (pretraining seed 3)": {"image_use": 0.06},
        "pretrained (pretraining seed 3), easy_vqa pairs only": {"image_use": 0.12},
        "after the pairs stage": {"image_use": 0.5},
    }
    over = bench.probe_over_seeds(probe, [0, 3], ["easy_vqa"])
    assert list(over) == ["all held-out pairs", "easy_vqa"]
    assert over["all held-out pairs"][0] == pytest.approx(0.08)
    assert over["all held-out pairs"][1] == pytest.approx(statistics.stdev([0.10, 0.06]))
    assert over["easy_vqa"][2] == [0.16, 0.12]
    assert bench.probe_over_seeds(probe, [0], ["easy_vqa"])["easy_vqa"] == (0.16, 0.0, [0.16])


def test_held_out_items_are_new_images_of_words_training_keeps():
    items = [(f"{i}.png", c) for i, c in enumerate(
        ["A mango.", "A red fox.", "A fox.", "A red apple.", "An apple.", "A mango tree.", "A yak.",
         "A red mango.", "A tree.", "A fox in a tree.", "An apple tree.", "A red tree."])]  # fmt: skip
    train, held = bench.hold_out(items, 4)
    assert len(held) == 3 and sorted(train + held) == sorted(items)
    kept = set().union(*(bench.caption_words(c) for _, c in train))
    for _, caption in held:
        assert bench.caption_words(caption) <= kept, caption
    assert ("6.png", "A yak.") in train  # the only yak: never held out
    # where every caption qualifies, every 4th item, as the split before this rule
    shapes = [(f"{i}.png", f"a {c} {s}.") for i in range(40) for c, s in [(("red", "blue")[i % 2],
              ("circle", "square")[i // 2 % 2])]]  # fmt: skip
    assert bench.hold_out(shapes, 4)[1] == shapes[3::4]
    # a source with too few qualifying captions holds out fewer, never an unseen word
    unique = [(f"{i}.png", f"A {w}.") for i, w in enumerate(["yak", "emu", "gnu", "owl", "eel", "ant"])]
    assert bench.hold_out(unique, 2) == (unique, [])
    assert bench.hold_out([], 10) == ([], [])
    # an item due whose word the items held out before it took from training is skipped, not replaced
    yaks = [("0.png", "A yak."), ("1.png", "A yak.")]
    assert bench.hold_out(yaks, 1) == (yaks[1:], yaks[:1])
    rare = [
        (f"{i}.png", f"A {w}.")
        for i, w in enumerate(["fox", "yak", "fox", "yak", "zebu", "gnu", "emu", "owl"])
    ]
    # 4 qualify (the foxes and yaks), the 2nd and 4th are due: the 2nd yak may not go (a fox would)
    assert bench.hold_out(rare, 4) == ([x for x in rare if x[0] != "1.png"], [("1.png", "A yak.")])


def test_the_probe_splits_held_out_pairs_by_the_counts_the_data_records():
    data = {"sources": {"a": 100, "b": 50}, "heldout_sources": {"a": 10, "b": 3}}
    assert bench.held_out_sources(data, 13) == {"a": slice(0, 10), "b": slice(10, 13)}
    assert bench.held_out_sources(data, 15) == {}
    # a data folder written before the counts were recorded held out every 10th item
    assert bench.held_out_sources({"sources": {"a": 100, "b": 50}}, 15) == {
        "a": slice(0, 10),
        "b": slice(10, 15),
    }


def test_figures_too_small_for_three_decimals_show_what_a_verdict_compares():
    assert bench.mean_sd(0.4712, 0.0341) == "0.471 ± 0.034"
    assert bench.mean_sd(0.0, 0.0) == "0.000 ± 0.000"
    assert bench.mean_sd(4.9e-5, 4.5e-5) == "4.9e-05 ± 4.5e-05"
    assert bench.mean_sd(8.0e-10, 3.5e-11) == "8e-10 ± 3.5e-11"
    assert bench.mean_sd(0.0004, 0.002) == "0.000 ± 0.002"
