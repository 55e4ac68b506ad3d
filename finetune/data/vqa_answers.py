"""VQAv2 answers: the official evaluation's normalisation, the answer vocabulary and the released soft scores.

Normalisation follows the rules of the VQA evaluation (visualqa.org, "Evaluation"), in its order:
newlines and tabs become spaces; punctuation other than the apostrophe, colon and period is deleted where it
touches a space (or anywhere, when the answer holds a digit-comma-digit group such as ``2,000``) and replaced
by a space elsewhere; a period is deleted unless a digit follows (``3.5`` stays); then, word by word after
lower-casing, number words become digits (``none``/``zero`` -> ``0`` ... ``ten`` -> ``10``), the articles
``a``/``an``/``the`` are dropped, and a contraction written without its apostrophes gets them back
(``dont`` -> ``don't``). The evaluation applies the same function to its ground truth and to predictions, so
an index built with it scores exactly what the evaluation scores.

The answer vocabulary and the soft scores are those of the released BEiT-3 index builder (reference
beit3.md §6.1): answers are the normalised ``multiple_choice_answer`` of every train and val question;
those given at least 9 times form the vocabulary (3,129 answers on VQAv2), numbered in the order they are
first met (train questions, then val), so that a released VQA head's rows line up. A question's answer
given by n of its annotators scores 0.3, 0.6, 0.9 for n = 1, 2, 3 and 1.0 for n >= 4: for 10 annotators
that is exactly the evaluation's accuracy min(1, n / 3) averaged over the 10 leave-one-out subsets of 9.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable

# Deleted or spaced: every ASCII punctuation mark but the apostrophe, colon and period (handled apart).
PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit. (The evaluation's pattern also meant "not preceded by a digit", but its
# look-behind is written as a look-ahead that never fails, so only this half acts; we keep its behaviour.)
_PERIOD = re.compile(r"\.(?!\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Contractions as they should be written; every spelling that drops some of the apostrophes maps back.
# Forms whose bare spelling is an ordinary word the evaluation leaves alone (its, well, were, hell, ill,
# id, im, lets) are not listed.
_CONTRACTIONS_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've "
    "mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll "
    "someone's something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
)
CONTRACTIONS = tuple(_CONTRACTIONS_TEXT.split())
MIN_ANSWER_COUNT = 9  # released: answers given as multiple_choice_answer at least 9 times (3,129 on VQAv2)
NUM_ANSWERS = 3129
SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # by number of annotators giving the answer (4 or more: 1.0)


def _unapostrophised(word: str) -> set[str]:
    """Every spelling of ``word`` with at least one of its apostrophes dropped."""
    parts = word.split("'")
    spellings = set()
    for keep in range(2 ** (len(parts) - 1) - 1):  # bit i set: apostrophe i kept; all-kept excluded
        out = parts[0]
        for i, part in enumerate(parts[1:]):
            out += ("'" if keep >> i & 1 else "") + part
        spellings.add(out)
    return spellings


CONTRACTION_FIXES = {bare: word for word in CONTRACTIONS for bare in _unapostrophised(word)}


def _punctuation(text: str) -> str:
    squeeze = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if squeeze or f"{p} " in text or f" {p}" in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


@functools.lru_cache(maxsize=1 << 18)  # VQAv2 holds 6.5M annotator answers, far fewer distinct ones
def normalize_answer(answer: str) -> str:
    """The VQA evaluation's normal form of an answer (``"Two dogs."`` -> ``"2 dogs"``)."""
    text = _punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTION_FIXES.get(w, w) for w in words if w not in ARTICLES)


def soft_score(count: int) -> float:
    """The released soft score of an answer given by ``count`` annotators (0, 0.3, 0.6, 0.9, 1.0)."""
    return SOFT_SCORES[min(count, len(SOFT_SCORES) - 1)]


def answer_vocabulary(
    answers: Iterable[str], min_count: int = MIN_ANSWER_COUNT, max_answers: int = NUM_ANSWERS
) -> list[str]:
    """The answers given at least ``min_count`` times, in the order first met; of more than ``max_answers``
    such answers only the ``max_answers`` most frequent stay (0: no cap), still in that order."""
    counts = Counter(answers)  # a Counter keeps first-insertion order
    kept = [a for a, n in counts.items() if n >= min_count]
    if max_answers and len(kept) > max_answers:
        order = {a: i for i, a in enumerate(kept)}
        top = set(sorted(kept, key=lambda a: (-counts[a], order[a]))[:max_answers])
        kept = [a for a in kept if a in top]
    return kept


def question_targets(
    annotator_answers: Iterable[str], answer_index: dict[str, int]
) -> tuple[list[int], list[float]]:
    """(labels, scores) of one question: each distinct vocabulary answer among its annotators' (already
    normalised) answers, in the order first given, with its soft score; answers outside the vocabulary
    are left out (a question left with none is not trainable)."""
    counts = Counter(annotator_answers)
    labels = [answer_index[a] for a in counts if a in answer_index]
    scores = [soft_score(counts[a]) for a in counts if a in answer_index]
    return labels, scores
