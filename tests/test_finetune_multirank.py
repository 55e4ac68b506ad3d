"""The retrieval loss over 2 ranks equals the single-process loss over the union of their batches; sharded
evaluation and prediction on 2 ranks give the one-process metrics and prediction files."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beit3.finetune.tasks.retrieval import contrastive_loss

B, D = 3, 8


def _features(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(2 * B, D, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(2 * B, D, generator=g), dim=-1)
    return img, txt


def _rank(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    img, txt = _features(0)
    img = img[rank * B : (rank + 1) * B].clone().requires_grad_()
    txt = txt[rank * B : (rank + 1) * B].clone().requires_grad_()
    loss, _ = contrastive_loss(img, txt, torch.tensor(math.log(10.0)))
    loss.backward()
    torch.save({"loss": loss.detach(), "img_grad": img.grad, "txt_grad": txt.grad}, f"{out_file}.{rank}")
    dist.barrier()
    # Results are on disk: leave without interpreter teardown, where gloo occasionally aborts under load
    # (the signal then fails the test although the computation was checked).
    os._exit(0)


@pytest.mark.multiprocess
def test_contrastive_loss_gathers_features_with_gradient_across_ranks(tmp_path):
    mp.start_processes(
        _rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, start_method="spawn"
    )
    results = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    img, txt = (x.clone().requires_grad_() for x in _features(0))
    full, _ = contrastive_loss(img, txt, torch.tensor(math.log(10.0)))
    full.backward()
    # Ranks' losses average to the full-batch loss; each rank's feature gradient (summed over all ranks'
    # losses by the gather's backward) is world_size times the full-batch gradient of its rows.
    assert (results[0]["loss"] + results[1]["loss"]).item() / 2 == pytest.approx(full.item(), rel=1e-5)
    for r in range(2):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(results[r]["img_grad"] / 2, img.grad[rows], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(results[r]["txt_grad"] / 2, txt.grad[rows], atol=1e-6, rtol=1e-5)


EVAL_TASKS = ("vqa", "retrieval", "prompt_classification", "image_classification", "captioning")
PREDICT_TASKS = ("vqa", "captioning")
TOP5_TARGETS = (0, 2, 4, 5, 6)  # image i's label is its logits' TOP5_TARGETS[i % 5]-th best class (of 7)


class _Words:
    """A stand-in tokenizer for captioning: id i decodes to the word ``w<i>``."""

    mask_id, vocab_size = 39, 40

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def _captioning_task():
    """A tiny captioner (no VL experts: cached decoding) whose </s> is likely enough that images' searches
    take different numbers of steps, on 5 images (2 ranks, batch 2: rank 1's second batch is all filler),
    with 1 or 2 reference captions per image."""
    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.data.build import shapes_data
    from beit3.finetune.tasks.captioning import Captioning
    from beit3.tokenizers.text import EOS_ID

    torch.manual_seed(0)
    encoder = build_encoder("beit3_tiny_patch16_64", "seq2seq", vocab_size=40, max_text_positions=20,
                            img_size=32, drop_path_rate=0.0)  # fmt: skip
    task = Captioning(encoder)
    with torch.no_grad():
        torch.nn.init.normal_(task.mlm_head.weight, std=0.2)
        task.mlm_head.bias[EOS_ID] += 2.0
    data = shapes_data(32, "captioning", num_train=2, num_eval=5, seed=2)
    refs = ["w3 w3 w16 w12", "w3 w14 w9", "w3 w16 w16", "w12 w3", "w3 w3 w16 w15"]
    for ex in data.eval.examples:
        ex["raw_text"] = refs[ex["image_id"]]
    data.eval.examples += [{**data.eval.examples[i], "raw_text": "w3 w12 w16"} for i in (0, 3)]
    return task, data


def _eval_kwargs(name: str) -> dict:
    from beit3.finetune.decoding import BeamSearchConfig

    if name == "captioning":
        return {"tokenizer": _Words(), "decoding": BeamSearchConfig(num_beams=2, max_len=8)}
    return {"num_answers": 6}


def _predict_kwargs(name: str) -> dict:
    kw = _eval_kwargs(name)
    return {"answers": [f"answer{i}" for i in range(6)]} if "num_answers" in kw else kw


def _eval_task(name: str):
    from beit3.finetune.configurations import build_encoder
    from beit3.finetune.data.build import shapes_data
    from beit3.finetune.tasks.retrieval import Retrieval
    from beit3.finetune.tasks.vqa import VQA

    if name == "captioning":
        return _captioning_task()
    torch.manual_seed(0)
    if name == "image_classification":  # 7 images, 7 classes; labels where the top-1 / top-5 hits are known
        from beit3.finetune.data.batches import images_to_float
        from beit3.finetune.tasks.classification import ImageClassification

        data = shapes_data(32, "image_classification", num_train=2, num_eval=7, seed=2)
        encoder = build_encoder("beit3_tiny_paper_patch16_64", "vision", normalize_output=False,
                                vocab_size=64, img_size=32, drop_path_rate=0.0)  # fmt: skip
        task = ImageClassification(encoder, 7).eval()
        torch.nn.init.normal_(task.head.weight)
        with torch.no_grad():
            order = task.logits(images_to_float(data.eval.images)).argsort(dim=-1, descending=True)
        for i, ex in enumerate(data.eval.examples):
            ex["label"] = int(order[ex["image"], TOP5_TARGETS[i % 5]])
        return task, data
    data = shapes_data(32, "vqa" if name == "vqa" else "retrieval", num_train=4, num_eval=7, seed=2)
    if name == "prompt_classification":  # 5 images against 3 class prompts
        from beit3.finetune.tasks.classification import PromptClassification

        data = shapes_data(32, "image_classification", num_train=4, num_eval=5, seed=2)
        assert len(data.eval.examples) == 5  # batch 2 on 2 ranks: rank 1's second batch holds no example
        for i, ex in enumerate(data.eval.examples):
            ex["label"] = i % 3
        prompts = torch.tensor([[0, 7, 8, 2], [0, 9, 2, 1], [0, 10, 11, 2]])
        encoder = build_encoder("beit3_tiny_paper_patch16_64", "dual", vocab_size=64, img_size=32,
                                drop_path_rate=0.0)  # fmt: skip
        return PromptClassification(Retrieval(encoder), prompts, prompts == 1), data
    for i, ex in enumerate(data.eval.examples):
        ex["text"] = [0, 5 + i % 7, 9, 2][: 3 + i % 2]  # ids, some texts shorter (padding)
    kw = {"vocab_size": 64, "img_size": 32, "drop_path_rate": 0.0}
    if name == "vqa":
        task = VQA(build_encoder("beit3_tiny_paper_patch16_64", "fusion", normalize_output=False, **kw), 6)
    else:
        task = Retrieval(build_encoder("beit3_tiny_paper_patch16_64", "dual", **kw))
    return task, data


def _zero3(task: torch.nn.Module) -> torch.nn.Module:
    """``task`` with its parameters partitioned by a ZeRO-3 engine over the process group (each gathered only
    inside its module's forward: ranks that call the modules a different number of times fail)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_module

    from beit3.engine.launch import _skip_shm_op_build
    from beit3.engine.task import zero3_gather_units

    _skip_shm_op_build()
    os.environ["LOCAL_RANK"] = str(dist.get_rank())  # DeepSpeed asks for it (one host)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    for module in zero3_gather_units(task):
        set_z3_leaf_module(module, True)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.0)  # an optimizer ZeRO accepts; never stepped
    deepspeed.initialize(model=task, optimizer=optimizer, config=config, dist_init_required=False)
    assert task.mlm_head.weight.numel() == 0  # partitioned
    return task


def _count_forwards(module: torch.nn.Module) -> list[int]:
    """A counter of ``module``'s forward calls (a one-element list)."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def _eval_rank(rank: int, init_file: str, out_file: str) -> None:
    import beit3.finetune.evaluate as ev
    import beit3.finetune.outputs as outputs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    outputs.have_java = lambda: False  # official caption scores without the JVM (PTB tokenizer, METEOR)
    scored, caption_scores = [], ev.caption_scores
    ev.caption_scores = lambda *a, **k: scored.append(1) or caption_scores(*a, **k)
    results: dict = {"eval": {}, "predict": {}, "forwards": {}}  # forwards: the backbone's, eval and predict
    for name in EVAL_TASKS:
        task, data = _eval_task(name)
        if name == "captioning":  # beam search under ZeRO-3: the ranks' steps in lock-step
            task = _zero3(task)
        forwards = _count_forwards(task.retrieval.beit3 if name == "prompt_classification" else task.beit3)
        results["eval"][name] = ev.evaluate(name, task, data.eval, batch_size=2, **_eval_kwargs(name))
        results["forwards"][name] = [forwards[0]]
        if name in PREDICT_TASKS:
            kw = _predict_kwargs(name)
            results["predict"][name] = ev.predict(name, task, data.eval, batch_size=2, **kw)
            results["forwards"][name].append(forwards[0] - results["forwards"][name][0])
        if name == "captioning":  # the report's samples: the same images on every rank
            decoding = _eval_kwargs(name)["decoding"]
            results["samples"] = ev.sample_captions(task, data.eval, _Words(), 3, decoding)
    results["scored"] = len(scored)  # caption scoring runs on rank 0 only
    try:  # an error of rank 0's computation reaches every rank
        ev._on_rank0(lambda: int("rank 0 fails"), "cpu")
    except Exception as e:
        results["error"] = (type(e).__name__, str(e))
    torch.save(results, f"{out_file}.{rank}")
    dist.barrier()
    os._exit(0)


def _shard_steps(monkeypatch, task, data, decoding) -> list[list[int]]:
    """Model steps each rank's captioning batches take on their own (2 ranks, batch 2), per rank and batch."""
    import beit3.finetune.evaluate as ev
    from beit3.finetune.data.batches import images_to_float
    from beit3.finetune.decoding import generate_captions

    steps, out = _count_forwards(task.beit3), []
    rows, _ = ev._unique_images(data.eval)
    for rank in range(2):
        out.append([])
        with monkeypatch.context() as patch:
            patch.setattr(ev, "_world", lambda r=rank: (r, 2))
            shards = list(ev._sharded(len(rows), 2))
        for indices, _ in shards:
            steps[0] = 0
            images = images_to_float(data.eval.images[[rows[i] for i in indices]])
            generate_captions(task, images, 0, 2, _Words.mask_id, decoding, vocab_size=_Words.vocab_size)
            out[-1].append(steps[0])
    return out


@pytest.mark.multiprocess
def test_evaluation_is_sharded_across_ranks_with_the_one_rank_result(tmp_path, monkeypatch):
    """On 2 ranks, batch 2, every rank reports what one process computes over the whole split: VQA (14
    questions: a short last shard), retrieval (features gathered), prompt classification (5 images: one
    rank's last batch holds no example; 3 classes: top-5 is top-3), image classification (top-1 and top-5
    from the logits' ranks), captioning under ZeRO-3 (5 images, rank 1's second batch all filler: the
    captions gathered, scored once on rank 0, its ranks' beam searches in lock-step); and the same
    prediction files (VQA submission, COCO caption results) with the same reports."""
    import beit3.finetune.outputs as outputs

    mp.start_processes(
        _eval_rank, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, start_method="spawn"
    )
    got = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    monkeypatch.setattr(outputs, "have_java", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: tiny models, and no OpenMP spinning on a loaded machine
    try:
        _check_against_one_process(got, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert [g["scored"] for g in got] == [2, 0]  # evaluate + predict on rank 0, nothing on rank 1
    assert got[0]["error"][0] == "ValueError" and "rank 0 fails" in got[0]["error"][1]
    assert got[1]["error"] == ("RuntimeError", f"on rank 0: ValueError: {got[0]['error'][1]}")


def _check_against_one_process(got: list[dict], monkeypatch) -> None:
    from beit3.finetune.evaluate import evaluate, predict, sample_captions

    for name in EVAL_TASKS:
        task, data = _eval_task(name)
        expected = evaluate(name, task, data.eval, batch_size=2, **_eval_kwargs(name))
        for r in range(2):
            assert got[r]["eval"][name].keys() == expected.keys()
            for k in expected:
                assert got[r]["eval"][name][k] == pytest.approx(expected[k], abs=1e-9), (name, r, k)
        if name in PREDICT_TASKS:
            output, report = predict(name, task, data.eval, batch_size=2, **_predict_kwargs(name))
            assert all(got[r]["predict"][name] == (output, report) for r in range(2)), name
            assert len(output) == (14 if name == "vqa" else 5)  # every question / image once
        if name == "vqa":  # 7 questions a rank, batch 2: 4 batches each (one process: 7), eval and predict
            assert got[0]["forwards"][name] == got[1]["forwards"][name] == [4, 4]
            if name == "captioning":
                assert [row["image_id"] for row in output] == [0, 1, 2, 3, 4]
                assert report["images"] == 5 and report["scores"]["cider"] > 0
        if name == "image_classification":  # TOP5_TARGETS: hits at top-1 for images 0, 5; top-5 for 0-2, 5, 6
            assert expected["eval/acc1"] == pytest.approx(2 / 7)
            assert expected["eval/acc5"] == pytest.approx(5 / 7)
            assert expected["eval/accuracy"] == expected["eval/acc1"]
        if name == "prompt_classification":  # 3 classes: all within the top 5; top-1 as the task's forward
            from beit3.finetune.data.batches import Collator

            batch = Collator(name, data.eval.images)(data.eval.examples, torch.Generator().manual_seed(0))
            with torch.no_grad():
                _, metrics = task.eval()(task.prepare_batch(batch, "cpu"))
            assert expected["eval/acc5"] == 1.0
            assert expected["eval/acc1"] == pytest.approx(float(metrics["acc/top1"]), abs=1e-6)  # float32
        if name == "captioning":  # each rank steps until both ranks' batch is done: max per batch
            alone = _shard_steps(monkeypatch, task, data, _eval_kwargs(name)["decoding"])
            together = sum(max(a, b) for a, b in zip(*alone))
            assert sum(alone[0]) != together != sum(alone[1])  # the ranks' searches would diverge alone
            assert [g["forwards"][name] for g in got] == [[together, together]] * 2
            samples = sample_captions(task, data.eval, _Words(), 3, _eval_kwargs(name)["decoding"])
            assert got[0]["samples"] == got[1]["samples"] == samples
            assert [s[0] for s in samples] == [row["caption"] for row in output[:3]]
