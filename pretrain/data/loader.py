"""The per-rank pretraining loader: mixed micro-batches of exact composition, counted skips, exact resume.

Each DataLoader worker (or the training process itself with ``num_workers=0``) is a *producer slot* that
owns one :class:`~beit3.pretrain.data.streams.SampleSource` per stream (a
:class:`~beit3.pretrain.data.streams.WeightedSampleSource` for a stream of weighted named sources, each
sample's source drawn by weight and counted as ``source/<name>/samples``) and builds whole micro-batches;
PyTorch hands out worker batches round-robin, so batch ``n`` of a rank always comes from slot
``n % num_workers``.
Every batch carries its producer's state *after* that batch (its counters included) from the worker to the
loader, which keeps the latest state per slot and strips it from the batch: :meth:`PretrainLoader.state_dict`
and :meth:`PretrainLoader.counters` describe exactly the batches consumed, never those prefetched. The loader
is an engine data source (:mod:`beit3.engine.data_source`), its counters declared in :data:`COUNTER_NAMES`.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from beit3.engine.workers import Workers, init_worker
from beit3.pretrain.data.config import (
    STREAMS,
    DataConfigError,
    DataStreamError,
    PretrainDataConfig,
    expand_shards,
)
from beit3.pretrain.data.decode import SKIP_KINDS, SkipSample
from beit3.pretrain.data.samples import SampleProcessor, collate
from beit3.pretrain.data.streams import STREAM_IDS, SampleSource, WeightedSampleSource, mix
from beit3.pretrain.data.tario import is_remote

log = logging.getLogger(__name__)

STATE_VERSION = 1
_RESEED = 0x5EED


# The counters of every rank's loader, logged as TensorBoard ``data/<name>`` (summed over ranks): a sample
# skipped, by kind, and a sample used, by stream. All are always present, so the tags are stable.
COUNTER_NAMES = (*(f"skipped/{k}" for k in SKIP_KINDS), *(f"samples/{s}" for s in STREAMS))
# Added when a stream reads remote shards: failed transfers retried, shards skipped for a round after their
# last try (docs/data.md, "Remote shards").
REMOTE_COUNTER_NAMES = ("remote/retries", "remote/skipped_shards")


def source_counter(name: str) -> str:
    """The counter of the samples used from weighted source ``name`` (TensorBoard
    ``data/source/<name>/samples``), declared when a stream lists named sources (docs/data.md)."""
    return f"source/{name}/samples"


def empty_stats(names: tuple[str, ...] = COUNTER_NAMES) -> dict[str, int]:
    """Every counter of ``names`` (:data:`COUNTER_NAMES`) at zero."""
    return dict.fromkeys(names, 0)


class BatchProducer:
    """Builds micro-batches for one producer slot of one rank; its state is a small picklable dict."""

    def __init__(
        self,
        cfg: PretrainDataConfig,
        tokenizer,
        counts: dict[str, int],
        shards: dict[str, list[str]],
        slot: int,
        num_slots: int,
        seed: int,
        counter_names: tuple[str, ...] = COUNTER_NAMES,
        weighted: dict[str, list[tuple[str, float, list[str]]]] | None = None,
    ) -> None:
        self.cfg, self.counts, self.slot, self.seed = cfg, counts, slot, seed
        self.processor = SampleProcessor(cfg, tokenizer)
        self.pad_id = tokenizer.pad_id
        self.counter_names = counter_names
        self.stats = empty_stats(counter_names)
        self.attempts = dict.fromkeys(counts, 0)  # raw samples processed per stream (good or bad)
        reading = (cfg.open_shards, cfg.shuffle_buffer, self._on_skip, cfg.remote_tries, cfg.remote_backoff)
        # A stream is one shard list (shards[s]) or named sources with weights (weighted[s]: name, weight,
        # shard list), each sample's source chosen by weight.
        weighted = weighted or {}
        self.sources = {
            s: WeightedSampleSource(s, weighted[s], slot, num_slots, seed, *reading)
            if s in weighted
            else SampleSource(s, shards[s], slot, num_slots, seed, *reading)
            for s in counts
        }

    def _on_skip(self, kind: str, url: str, detail: str) -> None:
        # A skip kind (SKIP_KINDS), or a counter of its own ("remote/retries").
        self.stats[kind if kind in REMOTE_COUNTER_NAMES else f"skipped/{kind}"] += 1
        log.debug("skipped %s in %s (%s)", kind, url, detail)

    def _sample(self, stream: str) -> dict:
        fn = getattr(self.processor, stream)
        source = self.sources[stream]
        # A weighted stream chooses the source once per sample: a bad sample is replaced from the same
        # source, so the used samples follow the weights whatever each source's share of bad ones.
        name = source.choose() if isinstance(source, WeightedSampleSource) else None
        skipped = 0
        while True:
            raw = source.next() if name is None else source.next(name)
            rng = np.random.default_rng(
                mix(self.seed, STREAM_IDS[stream], self.slot, 4, self.attempts[stream])
            )
            self.attempts[stream] += 1
            try:
                out = fn(raw, rng)
            except Exception as e:
                # SkipSample names its kind; anything else (RecursionError from a deeply nested member, a
                # library bug on odd bytes, a MemoryError from one huge field) is still about this one sample.
                kind = e.kind if isinstance(e, SkipSample) else "sample_error"
                self.stats[f"skipped/{kind}"] += 1
                log.debug("%s: skipped %s in %s (%s: %r)", stream, raw.key, raw.url, kind, e)
                skipped += 1
                if skipped > self.cfg.max_consecutive_skips:
                    what = stream if name is None else f"{stream} source {name}"
                    raise DataStreamError(
                        f"{what}: {skipped} bad samples in a row (last: {kind} {e!r} in {raw.url}); skip "
                        f"counts { {k: v for k, v in self.stats.items() if v} }: fix the shards or the config"
                    ) from None
                continue
            self.stats[f"samples/{stream}"] += 1
            if name is not None:
                self.stats[source_counter(name)] += 1
            if self.cfg.return_keys:
                out["key"] = raw.key
            return out

    def next_batch(self) -> dict:
        """One micro-batch: ``counts[s]`` samples of each stream ``s``, in the order image, text, pair."""
        batch = {}
        for stream in STREAMS:
            n = self.counts.get(stream, 0)
            if n:
                text_len = None
                if self.cfg.pad_text_to_max_len:
                    text_len = self.cfg.pair_text_max_len if stream == "pair" else self.cfg.text_max_len
                batch[stream] = collate([self._sample(stream) for _ in range(n)], text_len, self.pad_id)
        return batch

    def state_dict(self) -> dict:
        """Sources, per-stream attempt counters and statistics of this slot."""
        return {
            "slot": self.slot,
            "attempts": dict(self.attempts),
            "stats": dict(self.stats),
            "sources": {s: src.state_dict() for s, src in self.sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (taken from the same slot of the same layout)."""
        self.attempts = dict(state["attempts"])
        self.stats = {**empty_stats(self.counter_names), **state["stats"]}
        for s, src in self.sources.items():
            src.load_state_dict(state["sources"][s])


class _BatchStream(IterableDataset):
    """What each DataLoader worker iterates: endless batches of its slot, each with the slot's state."""

    def __init__(self, make_producer, slots: list[int], initial_states: list[dict | None]) -> None:
        self.make_producer, self.slots, self.initial_states = make_producer, slots, initial_states

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        producer = self.make_producer(self.slots[worker])
        if self.initial_states[worker] is not None:
            producer.load_state_dict(self.initial_states[worker])
        while True:
            batch = producer.next_batch()
            batch["_producer_state"] = producer.state_dict()
            yield batch


def _identity(x):
    return x


class PretrainLoader:
    """Endless per-rank micro-batches ``{"image", "text", "pair"}``: an engine data source with exact resume
    (``state_dict``), re-seeding (``start_at``) and the cumulative :data:`COUNTER_NAMES` (``counters``).

    Iterating again (or after :meth:`load_state_dict`) continues from the last consumed batch.
    """

    counter_names = COUNTER_NAMES  # with REMOTE_COUNTER_NAMES too when a stream reads remote shards

    def __init__(
        self, cfg: PretrainDataConfig, tokenizer, counts: dict[str, int], rank: int, world_size: int
    ):
        self.cfg, self.tokenizer, self.counts = cfg, tokenizer, counts
        self.rank, self.world_size = rank, world_size
        self.num_slots = max(1, cfg.num_workers)
        self.shards = {
            s: expand_shards(cfg.shards_for(s), f"{s}_shards") for s in counts if not cfg.sources_for(s)
        }
        # Streams of named sources: (name, weight, expanded shard list) per source, in the config's order.
        self.weighted = {
            s: [
                (src.name, src.weight, expand_shards(list(src.shards), f"{s}_sources[{i}] ({src.name})"))
                for i, src in enumerate(cfg.sources_for(s))
            ]
            for s in counts
            if cfg.sources_for(s)
        }
        lists = [*self.shards.values(), *(urls for srcs in self.weighted.values() for _, _, urls in srcs)]
        names = COUNTER_NAMES
        if any(is_remote(url) for urls in lists for url in urls):
            names = (*names, *REMOTE_COUNTER_NAMES)
        sources = [source_counter(name) for s in STREAMS for name, _, _ in self.weighted.get(s, ())]
        self.counter_names = (*names, *sources)
        self.seed = cfg.seed
        self.batches = 0
        self.producer_states: dict[int, dict] = {}
        self.stats_base = empty_stats(self.counter_names)
        self._active = None
        # Build one producer now so that shard/slot problems surface at construction, not in a worker.
        _SlotFactory(self)(self.rank * self.num_slots)

    def counters(self) -> dict[str, int]:
        """Cumulative counts of :attr:`counter_names` on this rank over the consumed batches."""
        total = empty_stats(self.counter_names)
        for part in (self.stats_base, *(state["stats"] for state in self.producer_states.values())):
            for k, v in part.items():
                if k in total:  # a counter an older version declared is dropped
                    total[k] += v
        return total

    def __iter__(self):
        self.close()
        self._active = self._generate()
        return self._active

    def _generate(self):
        n = self.num_slots
        # Worker i first produces batch ``batches + i``, which belongs to slot (batches + i) % n.
        slots = [(self.batches + i) % n for i in range(n)]
        initial = [self.producer_states.get(s) for s in slots]
        dataset = _BatchStream(_SlotFactory(self), [self.rank * n + s for s in slots], initial)
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            loader = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                collate_fn=_identity,
                prefetch_factor=self.cfg.prefetch_factor,
                persistent_workers=False,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                worker_init_fn=init_worker,
                # Its own generator: the workers' base seed is drawn from it, not from the global torch
                # RNG, which this (lazy) iterator would otherwise consume after a resume's RNG restore.
                generator=torch.Generator().manual_seed(mix(self.seed, self.rank, self.batches) % 2**63),
            )
            source = Workers(loader)
        try:
            for batch in source:
                state = batch.pop("_producer_state")
                self.producer_states[state["slot"] - self.rank * n] = state
                self.batches += 1
                yield batch
        finally:
            if isinstance(source, Workers):  # stopped now, not whenever the garbage collector reaches them
                source.close()

    def close(self) -> None:
        """Stop the worker processes of the current iteration (if any)."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def start_at(self, batches: int) -> None:
        """Continue a run after ``batches`` micro-batches when its loader state is lost (e.g. the world size
        changed and per-rank states cannot be mapped): streams are re-seeded from (seed, batches), the same
        way :meth:`load_state_dict` does for a state from another layout; counters restart at zero."""
        self.close()
        self.batches = batches
        self.seed = mix(self.cfg.seed, _RESEED, batches)
        self.producer_states, self.stats_base = {}, empty_stats(self.counter_names)

    def _shard_fingerprint(self) -> dict[str, str]:
        """Per stream, a digest of the shard list (of a weighted stream: its sources' names, weights and
        shard lists): positions only mean something for the same shards."""
        lists = dict(self.shards)
        for s, sources in self.weighted.items():
            lists[s] = [f"{name}\t{weight!r}\t{url}" for name, weight, urls in sources for url in urls]
        return {s: hashlib.sha1("\n".join(urls).encode()).hexdigest()[:16] for s, urls in lists.items()}

    def state_dict(self) -> dict:
        """Everything needed to continue after the batches consumed so far (per rank: save one per rank)."""
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "counts": dict(self.counts),
            "shards": self._shard_fingerprint(),
            "seed": self.seed,
            "batches": self.batches,
            "stats_base": dict(self.stats_base),
            "producers": {s: dict(v) for s, v in self.producer_states.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: exactly on the same layout; else re-seeded from (seed, batches) so no stream repeats."""
        if state.get("version") != STATE_VERSION:
            raise DataConfigError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        self.close()
        self.batches = state["batches"]
        same = all(
            state.get(k) == v
            for k, v in (
                ("rank", self.rank),
                ("world_size", self.world_size),
                ("num_workers", self.cfg.num_workers),
                ("counts", dict(self.counts)),
                ("shards", self._shard_fingerprint()),
            )
        )
        if same:
            self.seed = state["seed"]
            self.stats_base = {**empty_stats(self.counter_names), **state["stats_base"]}
            self.producer_states = {int(s): v for s, v in state["producers"].items()}
            return
        # A new layout: the old positions mean nothing to the new slots. Keep the counters, and draw new
        # streams from a seed derived from the old one and the step, the same on every rank.
        loaded = dict(state["stats_base"])
        for st in state["producers"].values():
            for k, v in st["stats"].items():
                loaded[k] = loaded.get(k, 0) + v
        self.stats_base = {**empty_stats(self.counter_names), **loaded}
        self.seed = mix(state["seed"], _RESEED, state["batches"])
        self.producer_states = {}
        log.warning(
            "data loader state from rank %d/%d with %d workers restored on rank %d/%d with %d workers "
            "(or with another batch composition or shard list): continuing on re-seeded streams (seed %d) "
            "after %d batches",
            state["rank"],
            state["world_size"],
            state["num_workers"],
            self.rank,
            self.world_size,
            self.cfg.num_workers,
            self.seed,
            self.batches,
        )


class _SlotFactory:
    """Picklable ``global slot -> producer`` for the DataLoader workers."""

    def __init__(self, loader: PretrainLoader) -> None:
        self.cfg, self.tokenizer, self.counts = loader.cfg, loader.tokenizer, loader.counts
        self.shards, self.weighted, self.seed = loader.shards, loader.weighted, loader.seed
        self.num_slots = loader.world_size * loader.num_slots
        self.counter_names = loader.counter_names

    def __call__(self, global_slot: int) -> BatchProducer:
        return BatchProducer(self.cfg, self.tokenizer, self.counts, self.shards, global_slot, self.num_slots,
                             self.seed, self.counter_names, self.weighted)  # fmt: skip


def build_pretrain_loader(
    cfg: PretrainDataConfig,
    tokenizer,
    images_per_batch: int,
    texts_per_batch: int,
    pairs_per_batch: int,
    rank: int = 0,
    world_size: int = 1,
) -> PretrainLoader:
    """The loader of one rank: every batch holds exactly the given numbers of images, texts and pairs.

    A count of 0 leaves that sub-batch out of every batch. Raises :class:`DataConfigError` for a config
    that cannot work (e.g. pairs requested but no ``pair_shards``).
    """
    cfg.validate()
    counts = {"image": images_per_batch, "text": texts_per_batch, "pair": pairs_per_batch}
    if any(c < 0 for c in counts.values()) or not any(counts.values()):
        raise DataConfigError(f"batch composition {counts} must be >= 0 with at least one sample per batch")
    if not 0 <= rank < world_size:
        raise DataConfigError(f"rank {rank} is outside world_size {world_size}")
    counts = {s: c for s, c in counts.items() if c}
    for s in counts:
        if not cfg.has_data(s):
            raise DataConfigError(
                f"{counts[s]} {s}s per batch but {s}_shards is empty: set [data] {s}_shards "
                f"(e.g. `beit3-shards {s}s ...` output) or {s}_sources, or set the count to 0"
            )
    return PretrainLoader(cfg, tokenizer, counts, rank, world_size)
