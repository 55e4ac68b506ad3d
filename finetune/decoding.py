"""Caption generation: beam search over the captioning model, with or without the key/value cache.

Each step feeds ``<mask>`` after the caption so far and reads the next-token distribution at the mask, the
way the model was trained (:mod:`beit3.finetune.tasks.captioning`). :class:`CachedStep` computes only the
two new positions per step ([previous token, ``<mask>``]) against cached keys/values and drops the
``<mask>`` slot afterwards; :class:`RecomputeStep` re-runs the whole sequence each step. Both give the
same distributions (a test checks it); the cache is the fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from beit3.finetune.tasks.captioning import Captioning, captioning_attention_mask
from beit3.model import KVCache
from beit3.model.beit3 import POSITION_OFFSET
from beit3.tokenizers.text import PAD_ID  # never generated

# step(tokens (N, L) incl. <s>, parents (N,) rows of the previous step each row continues) -> (N, V) log-probs
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# stop(this batch's search is over) -> end the search now (e.g. only once every rank's is over)
StopFn = Callable[[bool], bool]


@dataclass(frozen=True)
class BeamSearchConfig:
    """Decoding settings (released captioning defaults: 3 beams, length penalty 0.6)."""

    num_beams: int = 3
    max_len: int = 32  # tokens including <s> and </s>
    min_len: int = 1  # generated tokens before </s> may be chosen
    length_penalty: float = 0.6  # score / (generated length) ** length_penalty


def beam_search(
    step: StepFn,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    cfg: BeamSearchConfig,
    banned: tuple[int, ...] = (),
    stop: StopFn | None = None,
) -> list[tuple[list[int], float]]:
    """Best (token ids without ``<s>``/``</s>``, normalised log-probability) per batch item.

    A hypothesis ends when it picks ``eos_id``; the search for an item stops once it holds ``num_beams``
    finished hypotheses, or at ``max_len``, where live beams are finished as they stand. The search ends
    when every item has stopped, or, with ``stop``, when ``stop(every item has stopped)`` says so: distributed
    evaluation stops when every rank's batch has (each rank then runs as many model steps, which keeps
    ZeRO-3's parameter gathers in lock-step); steps taken after an item stopped leave its result as it is.
    """
    k = cfg.num_beams
    tokens = torch.full((batch_size * k, 1), bos_id, dtype=torch.long)
    scores = torch.full((batch_size, k), float("-inf"))
    scores[:, 0] = 0.0  # all beams start equal: expand only the first
    parents = torch.arange(batch_size * k)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]
    for length in range(1, cfg.max_len):
        logp = step(tokens, parents).float().cpu()
        logp[:, list(banned)] = float("-inf")
        if length <= cfg.min_len:
            logp[:, eos_id] = float("-inf")
        vocab = logp.shape[1]
        top_scores, top_idx = (scores.view(-1, 1) + logp).view(batch_size, -1).topk(2 * k, dim=1)
        parents = torch.arange(batch_size * k)  # rows of finished items keep pointing at themselves
        new_tokens = torch.full((batch_size * k,), eos_id, dtype=torch.long)
        new_scores = torch.full((batch_size, k), float("-inf"))
        for b in range(batch_size):
            if len(finished[b]) >= k:
                continue
            j = 0
            for s, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                if s == float("-inf") or j == k:
                    break
                beam, tok = divmod(idx, vocab)
                row = b * k + beam
                if tok == eos_id:
                    seq = tokens[row, 1:].tolist()
                    finished[b].append((s / (len(seq) + 1) ** cfg.length_penalty, seq))
                    continue
                parents[b * k + j], new_tokens[b * k + j], new_scores[b, j] = row, tok, s
                j += 1
        done = all(len(f) >= k for f in finished)
        if stop is not None:  # e.g. only once every rank's batch is done
            done = stop(done)
        if done:
            break
        tokens = torch.cat([tokens[parents], new_tokens[:, None]], dim=1)
        scores = new_scores
    for b in range(batch_size):
        if len(finished[b]) < k:  # out of length: live beams count as they are
            for j in range(k):
                s = scores[b, j].item()
                if s > float("-inf"):
                    seq = tokens[b * k + j, 1:].tolist()
                    finished[b].append((s / max(len(seq), 1) ** cfg.length_penalty, seq))
    return [max(f, key=lambda x: x[0])[::-1] if f else ([], float("-inf")) for f in finished]


class RecomputeStep:
    """Step function that runs image + caption-so-far + ``<mask>`` through the model from scratch."""

    def __init__(self, task: Captioning, image: torch.Tensor, num_beams: int, mask_id: int) -> None:
        self.task, self.mask_id = task, mask_id
        self.image = image.repeat_interleave(num_beams, dim=0)  # row b * K + j is beam j of item b

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        dev = self.image.device
        text = torch.cat([tokens, torch.full_like(tokens[:, :1], self.mask_id)], dim=1).to(dev)
        h = self.task.hidden(self.image, text)
        return F.log_softmax(self.task.mlm_head(h[:, -1]).float(), dim=-1)


class CachedStep:
    """Step function with the model's key/value cache: two new positions per step.

    First step: image + [``<s>``, ``<mask>``]. Later steps: text only ([last token, ``<mask>``]; the image
    lives in the cache) at explicit positions, with the last two rows of the full captioning mask. The
    ``<mask>`` slot is dropped from the cache after each step and the cache follows surviving beams.
    Only for layouts without vision-language experts: a text-only step would route through the language
    experts where a full pass routes pair input through the VL experts (use :class:`RecomputeStep`).
    """

    def __init__(self, task: Captioning, image: torch.Tensor, num_beams: int, mask_id: int) -> None:
        if task.cfg.vl_expert_layers:
            raise ValueError("cached decoding needs a layout without VL experts; use RecomputeStep")
        self.task, self.mask_id = task, mask_id
        self.image = image.repeat_interleave(num_beams, dim=0)
        self.cache = KVCache(task.cfg.depth)
        self.nv = task.cfg.num_vision_tokens

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        dev = self.image.device
        length = tokens.shape[1]  # caption tokens so far, <s> included
        mask_col = torch.full_like(tokens[:, :1], self.mask_id)
        full_mask = captioning_attention_mask(self.nv, length + 1, dev)
        b3 = self.task.beit3
        if len(self.cache) == 0:
            text = torch.cat([tokens, mask_col], dim=1).to(dev)
            x = b3(image=self.image, text=text, attn_mask=full_mask, cache=self.cache)
        else:
            self.cache.reorder(parents.to(dev))
            text = torch.cat([tokens[:, -1:], mask_col], dim=1).to(dev)
            positions = torch.arange(length - 1, length + 1, device=dev) + POSITION_OFFSET
            x = b3(text=text, attn_mask=full_mask[-2:], text_positions=positions, cache=self.cache)
        self.cache.truncate(self.nv + length)  # forget the <mask> slot
        return F.log_softmax(self.task.mlm_head(x[:, -1]).float(), dim=-1)


def generate_captions(
    task: Captioning,
    image: torch.Tensor,
    bos_id: int,
    eos_id: int,
    mask_id: int,
    cfg: BeamSearchConfig = BeamSearchConfig(),
    banned: tuple[int, ...] = (),
    use_cache: bool | None = None,
    vocab_size: int | None = None,
    stop: StopFn | None = None,
) -> list[list[int]]:
    """Beam-search captions (token ids) for a batch of images; cached unless the layout has VL experts.

    ``vocab_size`` (the tokenizer's) keeps ids the tokenizer cannot decode out of the search; ``stop`` as in
    :func:`beam_search`.
    """
    if use_cache is None:
        use_cache = not task.cfg.vl_expert_layers
    step_cls = CachedStep if use_cache else RecomputeStep
    was_training = task.training
    task.eval()
    try:
        step = step_cls(task, image, cfg.num_beams, mask_id)
        if vocab_size is not None:  # the embedding may have spare rows the tokenizer cannot decode
            step = _limit_vocab(step, vocab_size)
        results = beam_search(
            step, image.shape[0], bos_id, eos_id, cfg, banned=(bos_id, PAD_ID, mask_id) + banned, stop=stop
        )
    finally:
        task.train(was_training)
    return [ids for ids, _ in results]


def _limit_vocab(step: StepFn, vocab_size: int) -> StepFn:
    def limited(tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        return step(tokens, parents)[:, :vocab_size]

    return limited
