"""Evaluation of a finetuned task module on an eval split: the task's metric, as ``eval/<name>`` scalars,
and the official prediction files (:func:`predict`, formats in :mod:`beit3.finetune.outputs`).

Every task is sharded, evaluation and prediction alike: rank r of N takes every N-th example (or distinct
image), every rank runs the same number of equal-sized batches (a short last shard repeats an example whose
result is dropped), which keeps ZeRO-3's parameter gathers in lock-step, and the counts are reduced, or the
features, predictions and caption ids gathered, across ranks (retrieval's recalls: each rank ranks the
similarity rows of its share, the hits summed): N ranks evaluate in about 1/N of the time, with the one-rank
result. Captioning's beam search runs a data-dependent number of decoder steps: its
ranks agree at each step whether every rank's batch is done, so that all run as many steps (ZeRO-3's gathers
again in lock-step); the captions are gathered as fixed-size id rows, and rank 0 scores the full set once
and hands the scores to the others. On rank 0 a long evaluation logs its progress (items done of the
total, the rate) every :data:`PROGRESS_EVERY_S` seconds. A split whose images are on disk
(:class:`~beit3.finetune.data.sources.LazyImages`) has its batches' images decoded in ``workers``
DataLoader worker processes, ahead of the forward and in order (:func:`_built`; the training loader's
``data.num_workers``), the results equal to building them here.

What is evaluated, and how, is each task's spec (:mod:`beit3.finetune.tasks`): its ``evaluate`` and
``predict`` hooks get an :class:`EvalContext`, whose methods are the sharded loops (:meth:`EvalContext.hits`
over a task's logits, :meth:`EvalContext.recalls`, :meth:`EvalContext.caption_scores`, ...), and return the
task's metrics under their tags; the spec's ``selection`` is the scalar, and its direction, by which a run
keeps its best checkpoint (the engine's ``train.best_metric`` / ``best_mode``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from beit3.engine.workers import Workers, init_worker
from beit3.finetune.data.batches import Collator, images_to_float, pad_texts
from beit3.finetune.data.sources import LazyImages, Split
from beit3.finetune.decoding import BeamSearchConfig, generate_captions
from beit3.finetune.outputs import caption_results, caption_scores
from beit3.finetune.tasks import get_task, task_names
from beit3.finetune.tasks.spec import TaskSpec
from beit3.tokenizers.text import BOS_ID, EOS_ID

PROGRESS_EVERY_S = 30.0  # rank 0 logs a long evaluation's progress this often

log = logging.getLogger("beit3.finetune.evaluate")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sharded(n: int, batch_size: int, what: str = "examples") -> Iterator[tuple[list[int], int]]:
    """This rank's batches of indices into ``n`` items: every world_size-th item from the rank, in batches of
    ``batch_size``, as many batches on every rank (a short one repeats its first index); with each batch, how
    many of its indices are real (the rest are repeats whose results are dropped). Rank 0 logs the progress
    of all ranks (they run in step) on ``what`` every :data:`PROGRESS_EVERY_S` seconds."""
    progress = _Progress(n, batch_size, what) if _world()[0] == 0 else None
    for chunk in _shard_chunks(n, batch_size):
        yield chunk
        if progress is not None:  # the batch is done
            progress.batch_done()


def _shard_chunks(n: int, batch_size: int) -> list[tuple[list[int], int]]:
    """This rank's batches of :func:`_sharded`, without the progress log."""
    rank, world = _world()
    mine = list(range(rank, n, world))
    per_rank = -(-n // world)
    out = []
    for b in range(-(-per_rank // batch_size)):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        real = len(chunk)
        filler = chunk[0] if chunk else (mine[0] if mine else 0)
        out.append((chunk + [filler] * (batch_size - real), real))
    return out


class _Chunks(torch.utils.data.Dataset):
    """``build(indices)`` of this rank's batches, by position (read in DataLoader workers)."""

    def __init__(self, chunks: list[tuple[list[int], int]], build: Callable[[list[int]], object]) -> None:
        self.chunks, self.build = chunks, build

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> object:
        return self.build(self.chunks[i][0])


def _built(
    n: int, batch_size: int, what: str, build: Callable[[list[int]], object], workers: int = 0
) -> Iterator[tuple[object, int]]:
    """``(build(indices), real)`` for each batch of :func:`_sharded` (its order and progress log); with
    ``workers`` > 0 the batches are built in that many DataLoader worker processes (the workers of
    :mod:`beit3.engine.workers`: they ignore the stop signals), ahead of their use. ``build`` must not
    depend on what was built before (each batch may be built in another process)."""
    chunks = _sharded(n, batch_size, what)
    plan = _shard_chunks(n, batch_size) if workers > 0 else []
    if len(plan) < 2:  # nothing to overlap
        for indices, real in chunks:
            yield build(indices), real
        return
    loader = torch.utils.data.DataLoader(
        _Chunks(plan, build), batch_size=None, num_workers=min(workers, len(plan)),
        worker_init_fn=init_worker, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    workers = Workers(loader)  # an evaluation abandoned mid-way: its workers end before the exit waits
    try:
        for (_, real), batch in zip(chunks, workers):
            yield batch, real
    finally:
        workers.close()


class _Progress:
    """Rank 0's log line on a long evaluation: items done (over all ranks) of the total, rate, time left."""

    def __init__(self, n: int, batch_size: int, what: str) -> None:
        self.n, self.batch_size, self.what = n, batch_size, what
        self.world = _world()[1]
        self.batches = 0
        self.start = self.last = time.monotonic()

    def done(self) -> int:
        """Items of all ranks in their first ``batches`` batches (every rank runs its batches in step)."""
        per_rank = self.batches * self.batch_size
        return sum(min(len(range(r, self.n, self.world)), per_rank) for r in range(self.world))

    def batch_done(self) -> None:
        self.batches += 1
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        done, elapsed = self.done(), max(now - self.start, 1e-9)
        rate = done / elapsed
        left = (self.n - done) / rate if rate > 0 else float("inf")
        log.info("evaluating: %d/%d %s (%.1f/s over %d ranks, %.0f s so far, about %.0f s left)",
                 done, self.n, self.what, rate, self.world, elapsed, left)  # fmt: skip


def _sum_across_ranks(values: list[float], device) -> list[float]:
    """``values`` summed over the ranks (as they are without a process group)."""
    if _world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _on_rank0(compute: Callable[[], object], device) -> object:
    """``compute()`` run on rank 0 only and its result handed to every rank. An error is raised on every rank
    (rank 0 its own, the others a RuntimeError with its message), so that none waits for a result."""
    rank, world = _world()
    if world == 1:
        return compute()
    box: list = [None]
    error = None
    if rank == 0:
        try:
            box[0] = (compute(), None)
        except Exception as e:  # re-raised below, after the others heard of it
            error = e
            box[0] = (None, f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, device=torch.device(device))
    result, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"on rank 0: {message}")
    return result


def _all_ranks_done(device) -> Callable[[bool], bool] | None:
    """Beam search's ``stop`` in a process group: stop once every rank's batch is done (None alone)."""
    if _world()[1] == 1:
        return None

    def stop(done: bool) -> bool:
        busy = torch.tensor([0 if done else 1], dtype=torch.long, device=device)
        dist.all_reduce(busy)
        return busy.item() == 0

    return stop


def _gathered_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of ``n`` items computed in :func:`_sharded` order on every rank, back in item order."""
    rank, world = _world()
    if world == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        count = len(range(r, n, world))
        out[r::world] = part[:count]
    return out


def _unique_images(split: Split) -> tuple[list[int], dict[int, int]]:
    """Bank rows of the distinct images (by ``image_id``) and the position of each image id."""
    rows, position = [], {}
    for ex in split.examples:
        if ex["image_id"] not in position:
            position[ex["image_id"]] = len(rows)
            rows.append(ex["image"])
    return rows, position


@dataclass
class EvalContext:
    """One evaluation of a task module on a split, as the task's spec hooks see it: the sharded loops they
    compose (every rank calls them in step) and the settings they take."""

    spec: TaskSpec
    task: torch.nn.Module
    split: Split
    batch_size: int
    device: torch.device | str = "cpu"
    num_answers: int = 0  # VQA's soft-score width
    tokenizer: object = None
    decoding: BeamSearchConfig | None = None
    answers: list[str] | None = None  # the class / answer names (predictions)
    references: dict[int, list[str]] | None = None  # captions by image id (``--references``)
    workers: int = 0  # DataLoader workers that decode on-disk images (a split in memory needs none)

    def __post_init__(self) -> None:
        if not isinstance(self.split.images, LazyImages):
            self.workers = 0

    def _collated(self) -> Callable[[list[int]], dict]:
        """The split's examples ``indices`` collated (the task's ``collate`` hook), each batch with a
        generator of its own (the same batch wherever it is built)."""
        split = self.split
        collate = Collator(self.spec.name, split.images, num_answers=self.num_answers)

        def build(indices: list[int]) -> dict:
            g = torch.Generator().manual_seed(indices[0] if indices else 0)
            return collate([split.examples[i] for i in indices], g)

        return build

    def hits(
        self, logits: Callable[[dict], torch.Tensor], top_k: int = 0, soft: bool = False
    ) -> tuple[float, float, float]:
        """(hits, top-k hits, examples) over the split, summed over the ranks: the arg-max of
        ``logits(batch)`` against the batch's ``label`` (``soft``: its VQA score, from the batch's
        ``scores``), and with ``top_k`` the rows whose label is among their ``top_k`` best (0.0 without)."""
        device = self.device
        total, hits, hits_k = 0, 0.0, 0.0
        for batch, real in self.batches():
            out = logits(batch)
            pred = out[:real].argmax(-1)
            if soft:
                hits += batch["scores"][:real].gather(1, pred[:, None]).sum().item()
            else:
                hits += (pred == batch["label"][:real]).sum().item()
            if top_k:
                hits_k += top_k_hits(out[:real], batch["label"][:real], top_k)
            total += real
        hits, hits_k, total = _sum_across_ranks([hits, hits_k, total], device)
        return hits, hits_k, total

    def predictions(self, logits: Callable[[dict], torch.Tensor]) -> list[int]:
        """The arg-max of ``logits(batch)`` for every example, in example order on every rank; the batches
        hold the examples' images and texts only (a test split has no labels)."""
        split = self.split

        def build(indices: list[int]) -> dict:
            chunk = [split.examples[i] for i in indices]
            batch = {}
            for key in ("image", "image2"):
                if key in chunk[0]:
                    batch[key] = images_to_float(split.images[torch.tensor([ex[key] for ex in chunk])])
            if "text" in chunk[0]:
                batch["text"], batch["text_padding_mask"] = pad_texts([ex["text"] for ex in chunk])
            return batch

        local, n = [], len(split.examples)
        for batch, _ in _built(n, self.batch_size, self.spec.eval_items, build, self.workers):
            local.append(logits(self.task.prepare_batch(batch, self.device)).argmax(-1))
        return _gathered_rows(torch.cat(local), len(split.examples)).tolist() if local else []

    def batches(self) -> Iterator[tuple[dict, int]]:
        """This rank's batches of the split (:func:`_sharded`), collated (the task's ``collate`` hook) and on
        the device, each with how many of its examples are real (the rest repeat one, to be dropped)."""
        n, what = len(self.split.examples), self.spec.eval_items
        for batch, real in _built(n, self.batch_size, what, self._collated(), self.workers):
            yield self.task.prepare_batch(batch, self.device), real

    def summed(self, per_batch: Callable[[dict, int], torch.Tensor]) -> torch.Tensor:
        """The sum over the split of ``per_batch(batch, real)`` (a tensor of one shape from each batch's
        ``real`` first examples, such as segmentation's confusion matrix), summed over the ranks: every rank
        gets what one process computes over the whole split (exactly, for integer counts)."""
        total = None
        for batch, real in self.batches():
            part = per_batch(batch, real)
            total = part if total is None else total + part
        if _world()[1] > 1:
            dist.all_reduce(total)
        return total

    def gathered(self, per_batch: Callable[[dict, int], list]) -> list:
        """Per-example results over the split, in example order, on every rank: ``per_batch(batch, real)``
        returns one picklable result for each of the batch's ``real`` first examples (detections, for an
        evaluation that scores the whole set at once); the ranks' lists are gathered as objects."""
        local: list = []
        for batch, real in self.batches():
            local += list(per_batch(batch, real))[:real]
        world = _world()[1]
        if world == 1:
            return local
        parts: list = [None] * world
        dist.all_gather_object(parts, local)
        out: list = [None] * len(self.split.examples)
        for r, part in enumerate(parts):
            out[r::world] = part
        return out

    def on_first_rank(self, compute: Callable[[], object]) -> object:
        """``compute()`` run on rank 0 only, its (picklable) result given to every rank (:func:`_on_rank0`):
        a scoring that needs the whole gathered set once (COCOeval's memory grows with the set)."""
        return _on_rank0(compute, self.device)

    def recalls(self) -> dict[str, float]:
        """Retrieval's recalls (fractions) over the split's distinct images and texts: ``tr_r1`` ...
        ``ir_r10`` and ``average``, their mean (:func:`sharded_recalls`)."""
        found = _retrieval(self.task, self.split, self.batch_size, self.device, self.workers)
        return {k.removeprefix("eval/"): v for k, v in found.items()}

    def caption_scores(self) -> dict[str, float]:
        """The pure-python caption scores of one beam-search caption per distinct image (scored on rank 0)."""
        return {k.removeprefix("eval/"): v for k, v in
                _captioning(self.task, self.split, self.batch_size, self.device, self.tokenizer,
                            self.decoding or BeamSearchConfig(), self.workers).items()}  # fmt: skip

    def caption_results(self) -> tuple[list, dict]:
        """(COCO results list, report with the COCO scores where references exist) of the split."""
        return _predict_captions(self.task, self.split, self.batch_size, self.device, self.tokenizer,
                                 self.decoding, self.references, self.workers)  # fmt: skip

    def sample_captions(self, count: int) -> list[tuple[str, str]]:
        """(generated, reference) captions of the first ``count`` images (:func:`sample_captions`)."""
        return sample_captions(self.task, self.split, self.tokenizer, count, self.decoding)


def predicted_tasks() -> tuple[str, ...]:
    """The registered tasks with an official output file (a ``predict`` hook)."""
    return tuple(name for name in task_names() if get_task(name).predict is not None)


@torch.no_grad()
def evaluate(
    task_name: str,
    task: torch.nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device | str = "cpu",
    num_answers: int = 0,
    tokenizer=None,
    decoding: BeamSearchConfig | None = None,
    workers: int = 0,
) -> dict[str, float]:
    """The task's metrics on ``split`` (its spec's ``evaluate``; the module is put in eval mode and
    restored); ``workers``: DataLoader workers that decode the split's on-disk images."""
    if not split.examples:
        return {}
    spec = get_task(task_name)
    was_training = task.training
    task.eval()
    try:
        context = EvalContext(spec, task, split, batch_size, device, num_answers, tokenizer, decoding,
                              workers=workers)  # fmt: skip
        return spec.evaluate(context)
    finally:
        task.train(was_training)


@torch.no_grad()
def final_report(
    task_name: str,
    task: torch.nn.Module,
    split: Split,
    tokenizer=None,
    decoding: BeamSearchConfig | None = None,
) -> dict:
    """The extra entries of a finished run's eval.json that the task's spec adds (``report``; captioning's
    sample captions), {} for a task without."""
    spec = get_task(task_name)
    if spec.report is None:
        return {}
    return spec.report(EvalContext(spec, task, split, 0, tokenizer=tokenizer, decoding=decoding))


def top_k_hits(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    """How many rows have their label among their ``k`` highest logits (all of them when there are fewer
    than ``k`` classes: top-k with k = min(k, classes))."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return int((top == labels[:, None]).any(dim=-1).sum().item())


def _image_rows(split: Split, rows: list[int]) -> Callable[[list[int]], torch.Tensor]:
    """``build`` of :func:`_built`: the float images of bank rows ``rows[i]`` for the batch's ``i``."""

    def build(indices: list[int]) -> torch.Tensor:
        return images_to_float(split.images[[rows[i] for i in indices]])

    return build


def _retrieval(task, split, batch_size, device, workers: int = 0) -> dict[str, float]:
    rows, position = _unique_images(split)
    dtype = next(task.parameters()).dtype
    image_feats = []
    for images, _ in _built(len(rows), batch_size, "images", _image_rows(split, rows), workers):
        image_feats.append(task.embed_images(images.to(device, dtype)).float())
    text_feats = []
    for indices, _ in _sharded(len(split.examples), batch_size, "texts"):
        ids, pad = pad_texts([split.examples[i]["text"] for i in indices])
        text_feats.append(task.embed_texts(ids.to(device), pad.to(device)).float())
    images = _gathered_rows(torch.cat(image_feats), len(rows))
    texts = _gathered_rows(torch.cat(text_feats), len(split.examples))
    text_to_image = torch.tensor([position[ex["image_id"]] for ex in split.examples])
    return {f"eval/{k}": v for k, v in sharded_recalls(images, texts, text_to_image, device).items()}


def sharded_recalls(
    images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor, device, ks=(1, 5, 10)
) -> dict[str, float]:
    """:func:`beit3.finetune.metrics.recall_at_k` of ``images @ texts.T`` (every rank holding all features),
    each rank ranking the texts of every N-th image and the images of every N-th text (the similarity rows
    it needs, on the features' device), and the hits summed over the ranks: no rank builds or sorts the
    whole (images x texts) matrix. Same keys, ``average`` the mean of the six."""
    rank, world = _world()
    dev = images.device
    t2i = text_to_image.to(dev)
    my_texts = torch.arange(rank, texts.shape[0], world, device=dev)
    order = (texts[my_texts] @ images.t()).argsort(dim=1, descending=True)  # (my texts, I)
    rank_ir = (order == t2i[my_texts, None]).float().argmax(dim=1)  # rank of each text's image
    my_images = torch.arange(rank, images.shape[0], world, device=dev)
    order = (images[my_images] @ texts.t()).argsort(dim=1, descending=True)  # (my images, T)
    hits = t2i[order] == my_images[:, None]  # text at rank j is the image's own
    has_text = hits.any(dim=1)
    rank_tr = hits.float().argmax(dim=1)[has_text]  # best rank among the image's texts
    counts = [float(has_text.sum()), float(len(my_texts))]
    for k in ks:
        counts += [float((rank_tr < k).sum()), float((rank_ir < k).sum())]
    counts = _sum_across_ranks(counts, device)
    out = {}
    for i, k in enumerate(ks):
        out[f"tr_r{k}"] = counts[2 + 2 * i] / max(counts[0], 1.0)
        out[f"ir_r{k}"] = counts[3 + 2 * i] / max(counts[1], 1.0)
    out["average"] = sum(out.values()) / len(out)
    return out


def _references(split: Split, tokenizer) -> list[list[str]]:
    """The reference captions of each distinct image (bank-row order); empty lists where a split has none."""
    rows, position = _unique_images(split)
    refs: list[list[str]] = [[] for _ in rows]
    for ex in split.examples:
        if ex.get("raw_text") or ex.get("text"):
            refs[position[ex["image_id"]]].append(ex.get("raw_text") or tokenizer.decode(ex["text"]))
    return refs


def _generate(
    task, split, batch_size, device, tokenizer, decoding: BeamSearchConfig, workers: int = 0
) -> list[str]:
    """One beam-search caption per distinct image of ``split`` (bank-row order), on every rank: each rank
    decodes its shard of the images, and the caption ids are gathered as rows of ``max_len`` ids (-1 after
    the caption)."""
    if tokenizer is None:
        raise ValueError("captioning evaluation needs the tokenizer to decode captions")
    rows, _ = _unique_images(split)
    dtype = next(task.parameters()).dtype
    stop = _all_ranks_done(device)
    width = decoding.max_len  # a caption without <s> and </s> has at most max_len - 1 ids
    local: list[list[int]] = []
    for images, _ in _built(len(rows), batch_size, "images captioned", _image_rows(split, rows), workers):
        images = images.to(device, dtype)
        for ids in generate_captions(task, images, BOS_ID, EOS_ID, tokenizer.mask_id, decoding,
                                     vocab_size=tokenizer.vocab_size, stop=stop):  # fmt: skip
            local.append(ids + [-1] * (width - len(ids)))
    if not rows:
        return []
    gathered = _gathered_rows(torch.tensor(local, dtype=torch.long, device=device), len(rows))
    return [tokenizer.decode([i for i in ids if i >= 0]) for ids in gathered.tolist()]


def _captioning(
    task, split, batch_size, device, tokenizer, decoding: BeamSearchConfig, workers: int = 0
) -> dict[str, float]:
    hyps = _generate(task, split, batch_size, device, tokenizer, decoding, workers)
    refs = _references(split, tokenizer)
    scores, _ = _on_rank0(lambda: caption_scores(hyps, refs), device)  # pure python: cheap enough per eval
    return {f"eval/{k}": v for k, v in scores.items()}


@torch.no_grad()
def predict(
    task_name: str,
    task: torch.nn.Module,
    split: Split,
    batch_size: int,
    device: torch.device | str = "cpu",
    answers: list[str] | None = None,
    tokenizer=None,
    decoding: BeamSearchConfig | None = None,
    references: dict[int, list[str]] | None = None,
    workers: int = 0,
) -> tuple[object, dict]:
    """(official output, report) of ``task`` on ``split``: its spec's ``predict`` (formats in
    :mod:`beit3.finetune.outputs`; VQA: the submission, captioning: the COCO results scored against
    ``references`` by image id, else the split's own captions, retrieval: the released recalls)."""
    spec = get_task(task_name)
    if spec.predict is None:
        raise ValueError(
            f"task {task_name!r} has no official output file (tasks with one: {predicted_tasks()})"
        )
    was_training = task.training
    task.eval()
    try:
        context = EvalContext(spec, task, split, batch_size, device, len(answers or []), tokenizer, decoding,
                              answers, references, workers)  # fmt: skip
        return spec.predict(context)
    finally:
        task.train(was_training)


def _predict_captions(
    task, split, batch_size, device, tokenizer, decoding, references, workers: int = 0
) -> tuple[list, dict]:
    hyps = _generate(task, split, batch_size, device, tokenizer, decoding or BeamSearchConfig(), workers)
    rows, position = _unique_images(split)
    image_ids = sorted(position, key=position.get)  # bank-row order, as the captions
    results = caption_results(image_ids, hyps)
    if references is not None:
        missing = [i for i in image_ids if not references.get(i)]
        if missing:
            raise ValueError(f"the references have no caption for {len(missing)} image(s), e.g. {missing[0]}")
        refs = [references[i] for i in image_ids]
    else:
        refs = _references(split, tokenizer)
    report: dict = {"images": len(results)}
    if all(refs):  # the official toolkit (Java where installed) once, on rank 0
        official = _on_rank0(lambda: caption_scores(hyps, refs, official=True), device)
        report["scores"], report["scorer"] = official
    return results, report


def sample_captions(task, split: Split, tokenizer, count: int = 4, decoding: BeamSearchConfig | None = None):
    """(generated, reference) caption pairs for the first ``count`` images, for reports (every rank decodes
    the same images, and steps with the others: ZeRO-3's gathers stay in lock-step even should the ranks'
    numerics differ)."""
    rows, position = _unique_images(split)
    rows = rows[:count]
    dtype = next(task.parameters()).dtype
    device = next(task.parameters()).device
    images = images_to_float(split.images[rows]).to(device, dtype)
    ids = generate_captions(
        task,
        images,
        BOS_ID,
        EOS_ID,
        tokenizer.mask_id,
        decoding or BeamSearchConfig(),
        vocab_size=tokenizer.vocab_size,
        stop=_all_ranks_done(device),
    )
    first_ref = {}
    for ex in split.examples:
        first_ref.setdefault(position[ex["image_id"]], ex.get("raw_text") or tokenizer.decode(ex["text"]))
    return [(tokenizer.decode(i), first_ref[r]) for r, i in enumerate(ids)]
