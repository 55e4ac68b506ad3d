"""One infinite, resampled sample stream per (stream, rank, worker): disjoint shards, exact resume.

Readers are numbered ``slot = rank * num_workers + worker`` out of ``world_size * num_workers``. A stream's
shards are cut into units (whole shards, or interleaved parts of shards when there are fewer shards than
readers: :func:`beit3.pretrain.data.config.parts_per_shard`) and unit ``u`` belongs to slot ``u % num_slots``
only, so no two readers ever see the same sample. Within its units a reader draws units forever (resampling:
the stream never ends), each round of draws a fresh random permutation of its units so that every unit is
read once per round; it keeps ``open_shards`` of them open (at most its number of units), takes each next
sample from one of them at random, and passes samples through a shuffle buffer.

Every random choice is a pure function of ``(seed, stream, slot, counter)`` (:func:`mix`), and the position in
each open unit is a byte offset, so :meth:`SampleSource.state_dict` is a few integers plus the buffered
samples' file offsets; restoring it reproduces the stream exactly. A remote shard (a stream that cannot seek)
is resumed by re-reading it and skipping the recorded number of samples, its buffered samples by re-reading
each such shard once up to the last of them; a remote shard that fails all its tries is counted
(``remote/skipped_shards``) and replaced by the next draw: it is skipped for this round only.

A stream of several named sources (``pair_sources``) is a :class:`WeightedSampleSource`: one
:class:`SampleSource` per source and a seeded chooser that picks each sample's source by weight.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from beit3.pretrain.data.config import DataStreamError, parts_per_shard
from beit3.pretrain.data.tario import TAR_ERRORS, RawSample, RemoteReadError, iter_shard, read_refs

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
STREAM_IDS = {"image": 1, "text": 2, "pair": 3}


def mix(*values: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): the seed of one random decision."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def units_for_slot(num_shards: int, slot: int, num_slots: int) -> list[tuple[int, int, int]]:
    """The ``(shard, part, parts)`` units read by ``slot``; disjoint across slots, together everything."""
    parts = parts_per_shard(num_shards, num_slots)
    units = [(s, p, parts) for s in range(num_shards) for p in range(parts)]
    return units[slot::num_slots]


@dataclass
class _OpenUnit:
    unit: int  # index into the slot's unit list
    offset: int  # member-header byte offset of the next sample
    index: int  # shard-level index of the next sample
    iterator: object = None


class SampleSource:
    """Raw samples of one stream for one reader slot, forever, in a reproducible order."""

    def __init__(
        self,
        stream: str,
        shards: list[str],
        slot: int,
        num_slots: int,
        seed: int,
        open_shards: int = 4,
        buffer_size: int = 256,
        on_skip=None,
        remote_tries: int = 3,
        remote_backoff: float = 1.0,
        stream_id: int | None = None,
    ) -> None:
        self.stream, self.shards, self.slot, self.seed = stream, shards, slot, seed
        self.units = units_for_slot(len(shards), slot, num_slots)
        if not self.units:
            raise DataStreamError(f"{stream}: reader slot {slot} of {num_slots} owns no shard units")
        # More open readers than units would read the same unit from its start twice, close together.
        self.open_shards, self.buffer_size = min(open_shards, len(self.units)), max(1, buffer_size)
        self._round: tuple[int, np.ndarray] | None = None
        # on_skip(kind, url, detail): counts what the reader drops or repairs (a kind of SKIP_KINDS).
        self.on_skip = on_skip or (lambda kind, url, detail: None)
        self.remote_tries, self.remote_backoff = remote_tries, remote_backoff
        self.draws = 0  # units drawn so far
        self.picks = 0  # samples taken out of the buffer so far
        self.reads = 0  # samples read from open units so far
        self.open: list[_OpenUnit] = []
        self.buffer: list[RawSample] = []
        # The stream's id in every random choice; a named source of a weighted stream has its own.
        self._sid = STREAM_IDS[stream] if stream_id is None else stream_id

    # ---- reading -----------------------------------------------------------------------------------
    def _draw(self) -> _OpenUnit:
        """The next unit: position ``draws % n`` of round ``draws // n``'s seeded permutation."""
        n = len(self.units)
        rnd = self.draws // n
        if self._round is None or self._round[0] != rnd:
            perm = np.random.default_rng(mix(self.seed, self._sid, self.slot, 1, rnd)).permutation(n)
            self._round = (rnd, perm)
        u = int(self._round[1][self.draws % n])
        self.draws += 1
        return _OpenUnit(unit=u, offset=0, index=0)

    def _read_one(self) -> RawSample:
        """The next sample from a randomly chosen open unit, replacing exhausted or damaged units."""
        barren = 0
        while True:
            while len(self.open) < self.open_shards:
                self.open.append(self._draw())
            k = mix(self.seed, self._sid, self.slot, 2, self.reads) % len(self.open)
            cur = self.open[k]
            shard, part, parts = self.units[cur.unit]
            url = self.shards[shard]
            try:
                if cur.iterator is None:
                    cur.iterator = iter_shard(url, cur.offset, cur.index, part, parts, self.on_skip,
                                              self.remote_tries, self.remote_backoff)  # fmt: skip
                while True:
                    sample, cur.offset, cur.index = next(cur.iterator)
                    if sample is not None:
                        self.reads += 1
                        return sample
            except StopIteration:
                pass
            except RemoteReadError as e:
                log.warning("%s: skipping remote shard %s for this round after sample %d (%s)", self.stream,
                            url, cur.index, e)  # fmt: skip
                self.on_skip("remote/skipped_shards", url, str(e))
            except TAR_ERRORS as e:
                log.warning(
                    "%s: shard %s unreadable after sample %d (%s); moving on", self.stream, url, cur.index, e
                )
                self.on_skip("tar_read", url, str(e))
            self.open[k] = self._draw()
            barren += 1
            if barren > 4 * len(self.units) + 16:
                raise DataStreamError(
                    f"{self.stream}: {barren} shard units in a row gave no sample "
                    f"(shards such as {url}): check the shards (`tar tf`) or drop them from the config"
                )

    def next(self) -> RawSample:
        """The next sample of the stream (shuffled through the buffer)."""
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._read_one())
        i = mix(self.seed, self._sid, self.slot, 3, self.picks) % len(self.buffer)
        self.picks += 1
        sample = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return sample

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters, open-unit positions and buffered sample references (no sample bytes)."""
        return {
            "seed": self.seed,
            "draws": self.draws,
            "picks": self.picks,
            "reads": self.reads,
            "open": [(o.unit, o.offset, o.index) for o in self.open],
            "buffer": [s.ref() for s in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same shards, slot and slot count)."""
        self.seed, self._round = state["seed"], None
        self.draws, self.picks, self.reads = state["draws"], state["picks"], state["reads"]
        self.open = [_OpenUnit(unit=u, offset=off, index=idx) for u, off, idx in state["open"]]
        self.buffer = []
        refs = state["buffer"]
        for ref, sample in zip(refs, read_refs(refs, self.on_skip, self.remote_tries, self.remote_backoff)):
            # The shard changed, vanished or failed all its tries: lose the sample, not the run.
            if isinstance(sample, Exception):
                self.on_skip("tar_read", ref[1], str(sample))
            else:
                self.buffer.append(sample)


def source_stream_id(stream: str, name: str) -> int:
    """The id of named source ``name`` of ``stream`` in the random choices of its reader (its own draws,
    interleaving and buffer picks, independent of the other sources'): from the name, not the position in
    the list, so a source reads its samples in the same order wherever it is listed."""
    digest = int.from_bytes(hashlib.sha1(f"{stream}/{name}".encode()).digest()[:8], "little")
    return mix(STREAM_IDS[stream], 6, digest)


class WeightedSampleSource:
    """Raw samples of one stream for one reader slot from several named sources, each sample's source
    chosen in proportion to the weights.

    Every source is a :class:`SampleSource` of its own shards (split over the slots as a plain stream's
    are). Choice ``c`` of the slot is a pure function of ``(seed, stream, slot, c)``: a uniform number
    against the cumulative normalised weights (a source of weight 0 is never chosen). The state is the
    number of choices made and each source's state, so a restored slot makes the same choices from the same
    positions.
    """

    def __init__(
        self,
        stream: str,
        sources: list[tuple[str, float, list[str]]],
        slot: int,
        num_slots: int,
        seed: int,
        *reading,
    ) -> None:
        self.stream, self.slot, self.seed = stream, slot, seed
        self.names = [name for name, _, _ in sources]
        weights = np.array([weight for _, weight, _ in sources], dtype=np.float64)
        self.cumulative = np.cumsum(weights) / weights.sum()
        self.sources = {
            name: SampleSource(
                stream, urls, slot, num_slots, seed, *reading, stream_id=source_stream_id(stream, name)
            )
            for name, _, urls in sources
        }
        self.choices = 0  # sources chosen so far
        self._sid = STREAM_IDS[stream]

    def choose(self) -> str:
        """The source of the next sample."""
        # 52 random bits: exactly representable, uniform in [0, 1).
        u = (mix(self.seed, self._sid, self.slot, 5, self.choices) >> 11) / 2.0**52
        self.choices += 1
        i = int(np.searchsorted(self.cumulative, u, side="right"))
        return self.names[min(i, len(self.names) - 1)]

    def next(self, name: str) -> RawSample:
        """The next sample of source ``name``."""
        return self.sources[name].next()

    def state_dict(self) -> dict:
        """The chooser's count and every source's :meth:`SampleSource.state_dict`, by name."""
        return {
            "seed": self.seed,
            "choices": self.choices,
            "sources": {name: src.state_dict() for name, src in self.sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (same sources, slot and slot count)."""
        self.seed, self.choices = state["seed"], state["choices"]
        for name, src in self.sources.items():
            src.load_state_dict(state["sources"][name])
