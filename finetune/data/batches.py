"""From examples to the tensors a task module takes: tokenising, collating, and a resumable sharded loader.

Images are normalised to [-1, 1] (mean 0.5, std 0.5, the released vision-language finetuning transform);
texts become ``[<s>] + ids[: max_len - 2] + [</s>]`` right-padded with ``<pad>`` (``text_padding_mask`` True
at padding). What a task adds to its batches is its spec's ``collate`` hook (:mod:`beit3.finetune.tasks`);
captioning batches are masked there (:func:`beit3.finetune.tasks.captioning.mask_captions`), with a
generator derived from (seed, rank, epoch, batch), so a resumed run sees the same batches. So is the
training augmentation (:mod:`beit3.finetune.data.augment`: timm's transforms per image where it is decoded,
Mixup/CutMix over the collated batch): the libraries' RNGs are seeded from that generator for the batch and
restored after.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from beit3.engine.workers import Workers, init_worker
from beit3.finetune.data.augment import MixupSettings, TrainTransform, draw_seed, seeded, to_pil
from beit3.finetune.data.sources import LazyImages, Split
from beit3.finetune.errors import BatchError
from beit3.finetune.tasks import get_task
from beit3.tokenizers.text import BOS_ID, EOS_ID, PAD_ID


def tokenize_split(split: Split, tokenizer, max_text_len: int) -> Split:
    """Replace string texts by ids ``[<s>] + ids + [</s>]`` (id lists from released indexes get the same)."""
    for ex in split.examples:
        text = ex.get("text")
        if text is None or (isinstance(text, list) and text and text[0] == BOS_ID):
            continue
        ids = tokenizer.encode(text) if isinstance(text, str) else list(text)
        if isinstance(text, str):
            ex["raw_text"] = text
        ex["text"] = [BOS_ID] + ids[: max_text_len - 2] + [EOS_ID]
    return split


def images_to_float(images: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in [-1, 1]; rows where ``flip`` is True mirrored left-right."""
    if flip is not None and flip.any():  # on the uint8 rows: a quarter of the float temporaries
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    return images.float() / 127.5 - 1.0


def pad_texts(texts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists: (ids, padding_mask True at padding)."""
    length = max(len(t) for t in texts)
    ids = torch.full((len(texts), length), PAD_ID, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return ids, ids == PAD_ID


@dataclass
class Collator:
    """Builds a task's batch dict from examples (see each task module for the keys it reads): images,
    texts where the task's spec has them in its batches, then what its ``collate`` hook adds (labels, VQA
    scores, captioning's masking; :mod:`beit3.finetune.tasks`). ``task``: the task's registered name.

    ``transform``: each training image goes through it (a
    :class:`~beit3.finetune.data.augment.TrainTransform`: a :class:`~beit3.finetune.data.sources.LazyImages`
    image as decoded, a bank row as stored) instead of the plain conversion and ``hflip``; ``mixup``: image
    classification batches are mixed and carry ``target``, soft targets (B, num_classes), beside the hard
    ``label``."""

    task: str
    images: torch.Tensor | LazyImages | None
    num_answers: int = 0
    hflip: bool = False
    mask_prob: float = 0.6
    mask_id: int | None = None  # the tokenizer's <mask>: captioning batches need it
    transform: TrainTransform | None = None
    mixup: MixupSettings | None = None

    def _augmented(self, rows: list[int]) -> torch.Tensor:
        if isinstance(self.images, LazyImages):
            return torch.stack([self.transform(self.images.decode(r)) for r in rows])
        return torch.stack([self.transform(to_pil(self.images[r])) for r in rows])

    def __call__(self, examples: list[dict], generator: torch.Generator) -> dict:
        batch: dict = {}
        augment = self.transform is not None or self.mixup is not None
        seed = draw_seed(generator) if augment else None
        plain_flip = self.hflip and self.transform is None  # else the transform flips
        flip = torch.rand(len(examples), generator=generator) < 0.5 if plain_flip else None
        for key in ("image", "image2"):
            if key in examples[0] and self.images is not None:
                if self.transform is not None:
                    with seeded(seed + (key == "image2")):
                        batch[key] = self._augmented([ex[key] for ex in examples])
                else:
                    rows = torch.tensor([ex[key] for ex in examples])
                    batch[key] = images_to_float(self.images[rows], flip)
        spec = get_task(self.task)
        if "text" in examples[0] and spec.texts_in_batch:
            batch["text"], batch["text_padding_mask"] = pad_texts([ex["text"] for ex in examples])
        if spec.collate is not None:  # the task's keys: labels, VQA scores, captioning's masking
            spec.collate(batch, examples, self, generator)
        if self.mixup is not None:
            if "image" not in batch or "label" not in batch:
                raise BatchError("Mixup/CutMix mixes images and their labels: image classification only")
            with seeded(seed + 2):
                batch["image"], batch["target"] = self.mixup.apply(batch["image"], batch["label"])
        return batch


class _RankBatches(torch.utils.data.Dataset):
    """Batch ``(epoch, position)`` of one rank, collated where it is read (in a DataLoader worker the images
    of a :class:`~beit3.finetune.data.sources.LazyImages` split are decoded there)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.examples, self.collate, self.batch_size = loader.examples, loader.collate, loader.batch_size
        self.rank, self.world_size, self.seed, self.shuffle = (
            loader.rank, loader.world_size, loader.seed, loader.shuffle
        )  # fmt: skip
        self.batches = len(loader)
        self.steps_of = loader.micro_batches_per_step
        self._order: tuple[int, list[int]] | None = None  # (epoch, this rank's examples in order)

    def mine(self, epoch: int) -> list[int]:
        """This rank's example indices in epoch ``epoch``: a ``seed + epoch`` shuffle, every world_size-th."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.examples)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            else:
                order = list(range(n))
            self._order = (epoch, order[self.rank :: self.world_size][: self.batches * self.batch_size])
        return self._order[1]

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, position = key
        start = position * self.batch_size
        chunk = [self.examples[i] for i in self.mine(epoch)[start : start + self.batch_size]]
        g = torch.Generator().manual_seed(hash((self.seed, self.rank, epoch, position)) % 2**62)
        batch = self.collate(chunk, g)
        if self.steps_of:  # the optimizer step this batch is trained in (0: the first)
            batch["step"] = (epoch * self.batches + position) // self.steps_of
        return batch


class _Positions(torch.utils.data.Sampler):
    """The (epoch, position) keys from the loader's current position to the end of its epoch, read when an
    iteration starts (after a resume has set them)."""

    def __init__(self, loader: BatchLoader) -> None:
        self.loader = loader

    def __iter__(self):
        epoch, start = self.loader.epoch, self.loader.position
        return ((epoch, p) for p in range(start, len(self.loader)))

    def __len__(self) -> int:
        return len(self.loader) - self.loader.position


class BatchLoader:
    """Seeded, sharded, resumable batches of one split; one epoch per iteration (the trainer re-iterates).

    Each epoch shuffles all examples with ``seed + epoch``, gives rank r every world_size-th example, and
    drops the tail so that every rank yields the same number of full batches (unequal counts would hang
    collectives). An engine data source (:mod:`beit3.engine.data_source`) without counters: ``state_dict``
    holds (epoch, batch position), which the engine saves with each checkpoint; ``start_at`` continues at the
    epoch and position a number of batches reach. ``num_workers > 0``: batches are collated (their images read
    from disk) in that many DataLoader worker processes, ahead of the step, in pinned memory with
    ``pin_memory``; the position counts the batches handed to the trainer, so a resume continues exactly where
    the last checkpoint's step stopped, whatever the workers had prefetched. With ``persistent_workers``
    (``data.persistent_workers``) the workers are started once and serve every later epoch (torch's
    ``persistent_workers``: no fork, dataset copy or worker start-up per epoch); an iteration abandoned before
    its end (a stop, an evaluation that reads the split itself) leaves them running, and the next one starts
    at the loader's position after the batches they had prefetched are dropped. Without it (the default) they
    live for one iteration. :meth:`close` ends them (the trainer calls it at the end, the interpreter's exit
    too). ``micro_batches_per_step > 0``: each batch carries ``step``, the (0-based) optimizer step it is
    trained in (its micro-batch count since the start over the gradient accumulation; a task whose loss
    changes with the step, captioning's drop-worst, reads it there and needs nothing of the engine).
    """

    counter_names: tuple[str, ...] = ()

    def __init__(
        self,
        split: Split,
        collate: Collator,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        micro_batches_per_step: int = 0,
        persistent_workers: bool = False,
    ) -> None:
        self.examples, self.collate, self.batch_size = split.examples, collate, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.micro_batches_per_step = int(micro_batches_per_step)
        self.epoch, self.position = 0, 0
        self._batches: _RankBatches | None = None
        self._workers: torch.utils.data.DataLoader | None = None
        self._active = None  # the workers (beit3.engine.workers.Workers) of the current iteration
        if len(self) == 0:
            raise BatchError(
                f"{len(self.examples)} examples cannot fill one batch of {batch_size} on each of "
                f"{world_size} "
                "rank(s): lower train_micro_batch_size_per_gpu in the DeepSpeed JSON or add data"
            )

    def __len__(self) -> int:
        return len(self.examples) // self.world_size // self.batch_size

    def __iter__(self) -> Iterator[dict]:
        if self._batches is None:
            self._batches = _RankBatches(self)
        if self.num_workers:
            if self._workers is None:
                self._workers = torch.utils.data.DataLoader(
                    self._batches,
                    batch_size=None,  # each item is a collated batch
                    sampler=_Positions(self),
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    persistent_workers=self.persistent_workers,
                    # Workers ignore the step's stop signals (the trainer checkpoints) and keep their heap
                    # from growing with the batches they build (beit3.engine.workers).
                    worker_init_fn=init_worker,
                    # Its own generator: the workers' base seed is drawn from it, not from the global torch
                    # RNG, which each new iteration (a resume, a new epoch) would otherwise consume.
                    generator=torch.Generator().manual_seed(self.seed),
                )
            if not self.persistent_workers:
                self.close()  # the workers of an iteration abandoned before its end
            self._active = Workers(self._workers)  # persistent workers: forked by the first iteration only
            active = self._active
            try:
                for batch in active:
                    self.position += 1
                    yield batch
            finally:
                if self._active is active and not self.persistent_workers:
                    self.close()
        else:
            while self.position < len(self):
                batch = self._batches[self.epoch, self.position]
                self.position += 1
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        """Stop the worker processes (if any): now, not whenever the garbage collector reaches their
        iterator, and before the interpreter exits (beit3.engine.workers). A later iteration starts new
        ones."""
        active, self._active = self._active, None
        if active is not None:
            active.close()
        if self.persistent_workers:
            # torch keeps a persistent iterator inside its DataLoader and would reset that one (waiting on
            # workers that are gone) at the next iteration: a new DataLoader forks new workers instead.
            self._workers = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def start_at(self, micro_batches: int) -> None:
        """Continue after ``micro_batches`` batches of this rank (a resume on another world size)."""
        self.epoch, self.position = divmod(int(micro_batches), len(self))

    def counters(self) -> dict[str, float]:
        return {}
