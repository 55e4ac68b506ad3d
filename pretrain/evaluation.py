"""Evaluation during pretraining: held-out shards with fixed crops and masks, figures comparable across runs.

The recipe's ``[eval]`` table (:class:`EvalConfig`) names held-out shards per stream; every
``train.eval_every`` steps (0: at the end only) the engine calls the evaluation on every rank
(:class:`HeldOutEvaluation`), which reports under ``eval/`` (docs/pretraining.md, "Evaluation during
pretraining"):

* ``eval/loss/<term>``, ``eval/acc/<term>``: cross-entropy (no label smoothing) and masked-token accuracy of
  ``mim``, ``mlm``, ``vl_mlm``, ``vl_mim`` over all the held-out samples of the streams given;
* ``eval/acc/vl_mlm_shuffled_image`` and ``eval/image_use``: the pairs' masked text predicted again with the
  image of another held-out pair (a fixed derangement), and the accuracy with the true image minus that: a
  model that ignores the image scores 0; ``eval/acc/vl_mlm_no_image``: the same texts without any image;
* ``eval/health/<stream>_top_pc_share`` and ``..._effective_rank``: the share of variance in the top
  principal component of the pooled features (the first token of the last layer) and the effective rank
  (exp of the entropy of the normalised eigenvalues); ``eval/health/degenerate`` is 1 (and a warning is
  logged) when a share exceeds ``health_threshold``.

Fixed samples: every rank reads the first ``samples`` usable samples of each stream's shards in order, each
cropped and masked by a generator seeded from ``(seed, stream, position in the shards)`` (the whole image, no
flip or jitter; the training masking ratios), and keeps sample ``i`` when ``i % world_size == rank``. The
figures are sums over ranks (one all-reduce), so they do not depend on the world size (to rounding), and no
training generator is touched. Every rank runs the same number of forwards with every sub-batch present
(ZeRO-3 gathers parameters collectively): a rank out of samples of a stream forwards its first sample again
with nothing to predict.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as torch_dist

from beit3.engine.config_io import ConfigError, bounded
from beit3.engine.trainer_config import TrainSettings
from beit3.pretrain.data.config import STREAMS, DataConfigError, PretrainDataConfig, expand_shards
from beit3.pretrain.data.decode import SkipSample
from beit3.pretrain.data.samples import SampleProcessor, collate
from beit3.pretrain.data.streams import STREAM_IDS, mix
from beit3.pretrain.data.tario import TAR_ERRORS, iter_shard
from beit3.pretrain.errors import PretrainError
from beit3.pretrain.objective import KIND_TERMS
from beit3.tokenizers.masking import IGNORE_INDEX

log = logging.getLogger(__name__)

SPLIT_KEYS = {"image": "images", "text": "texts", "pair": "pairs"}  # [batch] / micro-batch split names
SHUFFLED = "pair_shuffled"  # the pairs again, each with another pair's image
NO_IMAGE = "pair_no_image"  # the pairs' texts alone
TEXT_KEYS = ("text", "text_padding_mask", "text_labels", "rows_valid")  # of a pair, for NO_IMAGE
# The extra sub-batches' scored term and its tag: eval/acc/<tag>
PROBES = {f"{SHUFFLED}/vl_mlm": "vl_mlm_shuffled_image", f"{NO_IMAGE}/vl_mlm": "vl_mlm_no_image"}
_DERANGEMENT = 7  # a stream-id-like constant of the derangement's seed


class EvalDataError(PretrainError, RuntimeError):
    """Held-out shards that give no usable sample of a stream."""


@dataclass
class EvalConfig:
    """The recipe's ``[eval]`` table: held-out shards evaluated every ``train.eval_every`` steps."""

    # Shard specs as in [data] (globs, directories, brace ranges); none of them may be a training shard.
    image_shards: list[str] = field(default_factory=list)
    text_shards: list[str] = field(default_factory=list)
    pair_shards: list[str] = field(default_factory=list)
    # Per stream: the first `samples` usable samples of its shards, in order (every rank reads them all).
    samples: int = bounded(256, "[2, inf)")
    seed: int = bounded(0, "[0, inf)")  # the crops and masks of the held-out samples
    # A pooled-feature top principal component above this share of the variance is reported as degenerate.
    health_threshold: float = bounded(0.9, "(0, 1]")

    def shards_for(self, stream: str) -> list[str]:
        """The held-out shard specs of ``stream`` ("image", "text" or "pair")."""
        return {"image": self.image_shards, "text": self.text_shards, "pair": self.pair_shards}[stream]

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams with held-out shards (empty: no evaluation)."""
        return tuple(s for s in STREAMS if self.shards_for(s))

    def problem(self, split: dict[str, int], eval_every: int, where: str = "eval") -> str | None:
        """The first problem of this table that needs no file, given the micro-batch ``split`` (images,
        texts, pairs) and ``train.eval_every``; None if none."""
        if not self.streams:
            default = EvalConfig()
            changed = [
                f.name for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(default, f.name)
            ]
            if changed:
                return (
                    f"[{where}] sets {', '.join(changed)} but names no held-out shards: set "
                    f"{where}.image_shards, {where}.text_shards and/or {where}.pair_shards"
                )
            if eval_every:
                return (
                    f"train.eval_every={eval_every} evaluates on held-out shards, but there is no [{where}] "
                    f"table naming them: set {where}.pair_shards (and/or image_shards, text_shards), or "
                    "train.eval_every = 0"
                )
            return None
        for stream in self.streams:
            specs = self.shards_for(stream)
            if not all(isinstance(s, str) and s.strip() for s in specs):
                return f"{where}.{stream}_shards={specs!r}: give shard specs (paths, globs, brace ranges)"
            if not split.get(SPLIT_KEYS[stream]):
                return (
                    f"{where}.{stream}_shards: the micro-batch trains no {SPLIT_KEYS[stream]} ([batch] "
                    f"{SPLIT_KEYS[stream]} = 0), so there is nothing to evaluate: remove them"
                )
        return None

    def check_shards(self, data: PretrainDataConfig, where: str = "eval") -> dict[str, list[str]]:
        """Expand every stream's held-out shards (each spec must match a file) and check that none is a
        training shard of the same stream; returns ``{stream: shard list}``."""
        found = {}
        for stream in self.streams:
            key = f"{where}.{stream}_shards"
            try:
                urls = expand_shards(self.shards_for(stream), key)
                trained = set(expand_shards(data.shards_for(stream), f"data.{stream}_shards"))
                for i, source in enumerate(data.sources_for(stream)):
                    trained.update(expand_shards(list(source.shards), f"data.{stream}_sources[{i}]"))
            except DataConfigError as e:
                raise ConfigError(str(e)) from e
            both = [u for u in urls if u in trained]
            if both:
                raise ConfigError(
                    f"{key}: {len(both)} of its {len(urls)} shards are also training shards of [data] (e.g. "
                    f"{both[0]}): held-out shards must not be trained on: give other shards"
                )
            found[stream] = urls
        return found


def read_held_out(
    cfg: EvalConfig, stream: str, urls: list[str], processor: SampleProcessor, keep=None
) -> tuple[list, Counter]:
    """The first ``cfg.samples`` usable samples of ``urls`` in order, each processed with a generator seeded
    by ``(cfg.seed, stream, its position among the samples read)``; and the skipped samples by kind.

    ``keep(i, sample)``: what is kept of the ``i``-th usable sample (None: nothing; default: all of it),
    so that a rank holds only its share of a large evaluation."""
    skipped: Counter = Counter()
    keep = keep or (lambda i, sample: sample)

    def report(kind: str, url: str, detail: str) -> None:
        skipped[kind] += 1

    process = getattr(processor, stream)
    samples, position = [], 0  # what is kept of each usable sample; samples read
    for url in urls:
        try:
            for raw, _, _ in iter_shard(url, report=report):
                if raw is None:
                    continue
                rng = np.random.default_rng(mix(cfg.seed, STREAM_IDS[stream], position))
                position += 1
                try:
                    sample = process(raw, rng)
                except SkipSample as e:
                    skipped[e.kind] += 1
                    continue
                samples.append(keep(len(samples), sample))
                if len(samples) == cfg.samples:
                    return samples, skipped
        except TAR_ERRORS as e:
            log.warning("eval %s: shard %s unreadable (%s); moving on", stream, url, e)
            skipped["tar_read"] += 1
    return samples, skipped


def _agree_across_ranks(found: dict[str, tuple[int, dict]], world_size: int) -> None:
    """Every rank read the same held-out samples (counts, and what was skipped) or all raise EvalDataError
    together: a shard one rank could not read (a transient remote or file-system error) would give it
    another share, another number of forwards (a ZeRO-3 hang) and other figures."""
    if world_size < 2 or not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    size = torch_dist.get_world_size()  # the process group's (a caller may shard without one of that size)
    if size < 2:
        return
    every: list = [None] * size
    torch_dist.all_gather_object(every, found)
    if any(other != every[0] for other in every):
        differ = {s: [r[s][0] for r in every] for s in found if any(r[s] != every[0][s] for r in every)}
        raise EvalDataError(
            f"the held-out shards read differently across ranks (usable samples per rank: {differ}; "
            "an unreadable shard on some ranks): check that every node reads them, then resume"
        )


def derangement(n: int, seed: int) -> list[int]:
    """A fixed permutation of ``range(n)`` without fixed points (one seeded cycle): ``partner[i] != i``."""
    order = np.random.default_rng(mix(seed, _DERANGEMENT, n)).permutation(n).tolist()
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _nothing_to_predict(sample: dict) -> dict:
    """A copy of ``sample`` with no masked patch and no text label: a filler row."""
    out = dict(sample)
    if "image_mask" in out:
        out["image_mask"] = np.zeros_like(out["image_mask"])
    if "text_labels" in out:
        out["text_labels"] = np.full_like(out["text_labels"], IGNORE_INDEX)
    return out


def pooled_health(count: float, total: torch.Tensor, outer: torch.Tensor) -> tuple[float, float]:
    """``(top-PC share, effective rank)`` of features given their count, sum (D,) and sum of outer products
    (D, D): the covariance's largest eigenvalue over their sum, and exp of the eigenvalues' entropy."""
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    eig = torch.linalg.eigvalsh(cov.double()).clamp(min=0)
    variance = float(eig.sum())
    if variance <= 0:
        return 1.0, 1.0  # every feature the same: fully collapsed
    p = eig / variance
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return float(eig.max()) / variance, math.exp(entropy)


class HeldOutEvaluation:
    """One rank's share of the held-out samples as CPU micro-batches, and their evaluation (call it with
    the step: the engine's ``eval_fn``, after :meth:`bind`)."""

    def __init__(
        self,
        cfg: EvalConfig,
        data: PretrainDataConfig,
        tokenizer,
        split: dict[str, int],
        shards: dict[str, list[str]],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        # The whole image, no flip or colour jitter: what each held-out sample shows never changes.
        view = dataclasses.replace(data, crop_scale=(1.0, 1.0), hflip=0.0, color_jitter=0.0)
        processor = SampleProcessor(view, tokenizer)
        self.counts: dict[str, int] = {}
        own: dict[str, list[dict]] = {}
        filler: dict[str, dict] = {}
        read = {s: read_held_out(cfg, s, shards[s], processor, self._keeper(s)) for s in cfg.streams}
        _agree_across_ranks({s: (len(samples), dict(skipped)) for s, (samples, skipped) in read.items()},
                            world_size)  # fmt: skip
        for stream in cfg.streams:
            samples, skipped = read.pop(stream)
            if not samples:
                raise EvalDataError(
                    f"eval.{stream}_shards hold no usable {stream} sample (skipped: {dict(skipped)}): "
                    "check the shards (`tar tf`) or give others"
                )
            if stream == "pair" and len(samples) < 2:
                raise EvalDataError(
                    "eval.pair_shards hold 1 usable pair: the image-use probe shows each text another "
                    "held-out pair's image and needs at least 2"
                )
            if len(samples) < cfg.samples and rank == 0:
                log.warning("eval.%s_shards hold %d usable samples, fewer than eval.samples=%d: evaluating "
                            "those", stream, len(samples), cfg.samples)  # fmt: skip
            self.counts[stream] = len(samples)
            filler[stream] = _nothing_to_predict(samples[0])
            own[stream] = samples[rank::world_size]
            if stream == "pair":  # the image each held-out text is also shown with
                partner = derangement(len(samples), cfg.seed)
                for i, sample in zip(range(rank, len(samples), world_size), own[stream]):
                    sample["shuffled_image"] = samples[partner[i]]["image"]
                filler[stream]["shuffled_image"] = filler[stream]["image"]
            del samples
        self.batches = self._micro_batches(own, filler, split, data, tokenizer.pad_id)
        self._codes_cached = False

    def _micro_batches(self, own: dict, filler: dict, split: dict, data: PretrainDataConfig, pad_id: int):
        """This rank's samples as CPU micro-batches of the training composition, each with every stream
        (a filler row where this rank has run out) and a ``rows_valid`` mask; the pairs also as
        :data:`SHUFFLED`, with their partners' images and no tokenizer views, and their texts alone as
        :data:`NO_IMAGE`."""
        sizes = {s: split[SPLIT_KEYS[s]] for s in self.cfg.streams}
        # Forwards per evaluation: the same on every rank (rank 0 holds the most samples of each stream).
        forwards = max(_ceil_div(_ceil_div(self.counts[s], self.world_size), sizes[s]) for s in sizes)
        text_len = {"image": None, "text": data.text_max_len, "pair": data.pair_text_max_len}
        batches = []
        for k in range(forwards):
            batch = {}
            for s, size in sizes.items():
                rows = own[s][k * size : (k + 1) * size]
                length = text_len[s] if data.pad_text_to_max_len else None
                batch[s] = collate(rows or [filler[s]], length, pad_id)
                batch[s]["rows_valid"] = torch.full((max(len(rows), 1),), bool(rows))
                if s == "pair":
                    shown = [r["shuffled_image"] for r in rows or [filler[s]]]
                    batch[SHUFFLED] = {key: v for key, v in batch[s].items() if key != "tokenizer_image"}
                    batch[SHUFFLED]["image"] = torch.from_numpy(np.stack(shown))
                    batch[NO_IMAGE] = {key: batch[s][key] for key in TEXT_KEYS}
            batches.append(batch)
        return batches

    def _keeper(self, stream: str):
        """What this rank keeps of held-out sample ``i``: its own samples and the first (the filler); of the
        other pairs their model view (each rank shows its pairs' texts with other pairs' images)."""
        rank, world_size = self.rank, self.world_size

        def keep(i: int, sample: dict) -> dict | None:
            if i % world_size == rank or i == 0:
                return sample
            return {"image": sample["image"]} if stream == "pair" else None

        return keep

    # ----- the evaluation -----
    def bind(self, task, device: torch.device):
        """The engine's ``eval_fn(step) -> scalars`` for this rank's ``task`` (MaskedDataModeling)."""

        def eval_fn(step: int) -> dict[str, float]:
            return self.evaluate(task, device, step)

        return eval_fn

    @torch.no_grad()
    def evaluate(self, task, device: torch.device, step: int) -> dict[str, float]:
        """Every rank's held-out samples through ``task``, the sums gathered: the ``eval/...`` scalars."""
        training = task.training
        task.eval()
        try:
            sums = self.partial_sums(task, device)
        finally:
            task.train(training)
        if self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
            names = sorted(sums)
            flat = torch.cat([sums[n].reshape(-1) for n in names])
            torch_dist.all_reduce(flat)
            sizes = [sums[n].numel() for n in names]
            sums = {n: t.reshape(sums[n].shape) for n, t in zip(names, flat.split(sizes))}
        scalars = self.figures(sums)
        if self.rank == 0:  # the engine writes the scalars (TensorBoard, one console line)
            self._warn_if_degenerate(step, scalars)
        return scalars

    def partial_sums(self, task, device: torch.device) -> dict[str, torch.Tensor]:
        """This rank's sums (float64, on ``device``): per term loss, correct and count; per stream the
        count, sum and sum of outer products of the pooled features of its real (not filler) rows."""
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            value = value.detach().double()
            sums[name] = sums[name] + value if name in sums else value

        scored = {SHUFFLED: ("vl_mlm",), NO_IMAGE: ("vl_mlm",)} if "pair" in self.cfg.streams else None
        for batch in self.batches:
            prepared = self._prepare(task, batch, device)
            hidden, scores = task.masked_terms(prepared, scored=scored, smoothing=0.0)
            for name, (loss_sum, correct, count) in scores.items():
                add(f"{name}/loss", loss_sum)
                add(f"{name}/correct", correct)
                add(f"{name}/count", count)
            for stream in self.cfg.streams:
                valid = prepared[stream]["rows_valid"]
                pooled = hidden[stream][:, 0].double()[valid]  # (n, D): the first token of the last layer
                add(f"health/{stream}/n", valid.sum())
                add(f"health/{stream}/sum", pooled.sum(0))
                add(f"health/{stream}/outer", pooled.T @ pooled)
        return sums

    def _prepare(self, task, batch: dict, device: torch.device) -> dict:
        """The task's ``prepare_batch`` of one CPU batch; the visual-token codes, computed at the first
        evaluation, are kept in the CPU batch instead of its tokenizer views (they never change)."""
        subs = {k: v for k, v in batch.items() if k not in (SHUFFLED, NO_IMAGE)}
        prepared = task.prepare_batch(subs, device)
        if not self._codes_cached:
            for key, sub in subs.items():
                if "tokenizer_image" in sub:
                    sub.pop("tokenizer_image")
                    sub["image_codes"] = prepared[key]["image_codes"].cpu()
        if SHUFFLED in batch:
            prepared[SHUFFLED] = task.prepare_batch({"pair": batch[SHUFFLED]}, device)["pair"]
            prepared[NO_IMAGE] = task.prepare_batch({"text": batch[NO_IMAGE]}, device)["text"]
        if batch is self.batches[-1]:
            self._codes_cached = True
        return prepared

    def figures(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The ``eval/...`` scalars from the summed statistics."""
        out: dict[str, float] = {}
        present = {n.rsplit("/", 1)[0] for n in sums if not n.startswith("health/")}
        for term in [t for t in (*KIND_TERMS["image"], *KIND_TERMS["text"], *KIND_TERMS["pair"], *PROBES)
                     if t in present]:  # fmt: skip
            count = float(sums[f"{term}/count"])
            if not count:  # e.g. no pair masks its image: no figure rather than a 0
                continue
            tag = PROBES.get(term, term)
            out[f"eval/loss/{tag}"] = float(sums[f"{term}/loss"]) / count
            out[f"eval/acc/{tag}"] = float(sums[f"{term}/correct"]) / count
        if "eval/acc/vl_mlm" in out and "eval/acc/vl_mlm_shuffled_image" in out:
            out["eval/image_use"] = out["eval/acc/vl_mlm"] - out["eval/acc/vl_mlm_shuffled_image"]
        degenerate = False
        for stream in self.cfg.streams:
            n = float(sums[f"health/{stream}/n"])
            share, rank = pooled_health(n, sums[f"health/{stream}/sum"], sums[f"health/{stream}/outer"])
            out[f"eval/health/{stream}_top_pc_share"] = share
            out[f"eval/health/{stream}_effective_rank"] = rank
            degenerate |= share > self.cfg.health_threshold
        out["eval/health/degenerate"] = float(degenerate)
        return out

    def _warn_if_degenerate(self, step: int, scalars: dict[str, float]) -> None:
        """A warning naming the streams whose pooled features have a top-PC share above the threshold."""
        shares = {s: scalars[f"eval/health/{s}_top_pc_share"] for s in self.cfg.streams}
        high = {s: v for s, v in shares.items() if v > self.cfg.health_threshold}
        if high:
            log.warning(
                "eval step %d: pooled features degenerate: %s of their variance in the top principal "
                "component (above eval.health_threshold=%g): the representation is collapsing",
                step, ", ".join(f"{s} {100 * v:.1f}%" for s, v in high.items()),
                self.cfg.health_threshold,
            )  # fmt: skip


def train_settings(train: TrainSettings, cfg: EvalConfig) -> TrainSettings:
    """The recipe's [train] table as run: with held-out shards, ``eval_every = 0`` evaluates at the end."""
    if cfg.streams and not train.eval_every:
        return dataclasses.replace(train, eval_every=train.total_steps)
    return train


def eval_hook(cfg: EvalConfig, data: PretrainDataConfig, tokenizer, split: dict[str, int], task, dist):
    """The engine's ``eval_fn`` for this rank (``dist``: its DistInfo), or None without held-out shards."""
    if not cfg.streams:
        return None
    shards = cfg.check_shards(data)
    evaluation = HeldOutEvaluation(cfg, data, tokenizer, split, shards, dist.rank, dist.world_size)
    if dist.rank == 0:
        held_out = ", ".join(f"{n} {SPLIT_KEYS[s]}" for s, n in evaluation.counts.items())
        log.info(
            "evaluation on held-out samples: %s, %d forwards per rank", held_out, len(evaluation.batches)
        )
    return evaluation.bind(task, dist.device)
