"""The built-in mixture: five instruction domains made from the embedded data, each with its
own training rows, reward rows (what online data mixing evaluates its rewards on) and held-out
rows (what the job measures), so that a learned mixture can be compared with the uniform one.

The domains differ in difficulty for a 135M model: the sentiment of a review and the thing it
reviews are read off the text, a word's category and an adjective's opposite must be known, and
counting a review's sentences is hard.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Example
from .default_dataset import (
    _CATEGORIES,
    _CATEGORY_PROMPT,
    _CONTEXT,
    _MAX_CONTEXT,
    _NEGATIVE,
    _OPPOSITE_PROMPT,
    _OPPOSITES,
    _POSITIVE,
    _SUBJECTS,
    _SUFFIX,
)

MIXTURE_NAME = "built-in mixture (sentiment, subject, category, opposite, count)"
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_REVIEW = 'Review: "{context}{subject} was {adjective}."\n'
# examples per domain held out for measurement, and for the rewards of online data mixing
HELD_OUT = 12
REWARD = 8


@dataclass(frozen=True)
class Domain:
    """One category of the mixture and its three disjoint splits."""

    name: str
    train: list[Example]
    reward: list[Example]
    held_out: list[Example]


def _reviews(rng: random.Random) -> list[tuple[str, str, str, int]]:
    """(review text, sentiment, subject noun, sentence count) for every adjective x subject."""
    out = []
    labelled = [(a, "positive") for a in _POSITIVE] + [(a, "negative") for a in _NEGATIVE]
    for adjective, label in labelled:
        for subject in _SUBJECTS:
            context = rng.sample(_CONTEXT, rng.randint(0, _MAX_CONTEXT))
            text = _REVIEW.format(
                context="".join(c + " " for c in context), subject=subject, adjective=adjective
            )
            out.append((text, label, subject.split()[-1].lower(), len(context) + 1))
    return out


def _split(name: str, examples: list[Example], rng: random.Random) -> Domain:
    rng.shuffle(examples)
    held, reward, train = (
        examples[:HELD_OUT],
        examples[HELD_OUT : HELD_OUT + REWARD],
        examples[HELD_OUT + REWARD :],
    )
    return Domain(name, train, reward, held)


def mixture_domains(seed: int = 0) -> list[Domain]:
    """The five domains, the same for the same seed."""
    rng = random.Random(seed)
    reviews = _reviews(rng)
    sentiment = [
        Example(text + "Is this review positive or negative?" + _SUFFIX, label)
        for text, label, _, _ in reviews
    ]
    subject = [
        Example(text + "What does this review talk about?" + _SUFFIX, noun)
        for text, _, noun, _ in reviews
    ]
    count = [
        Example(text + "How many sentences does this review have?" + _SUFFIX, _NUMBERS[n - 1])
        for text, _, _, n in reviews
    ]
    category = [
        Example(_CATEGORY_PROMPT.format(word=w) + _SUFFIX, c)
        for c, words in _CATEGORIES.items()
        for w in words
    ]
    opposite = [
        Example(_OPPOSITE_PROMPT.format(word=x) + _SUFFIX, y)
        for a, b in _OPPOSITES
        for x, y in ((a, b), (b, a))
    ]
    # the review domains would dwarf the others; keep each at most 96 training examples
    domains = [
        _split("sentiment", rng.sample(sentiment, 96 + HELD_OUT + REWARD), rng),
        _split("subject", rng.sample(subject, 96 + HELD_OUT + REWARD), rng),
        _split("category", category, rng),
        _split("opposite", opposite, rng),
        _split("count", rng.sample(count, 96 + HELD_OUT + REWARD), rng),
    ]
    return domains
