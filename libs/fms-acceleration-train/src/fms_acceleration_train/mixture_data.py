"""The built-in mixture: five instruction domains made from the embedded data, each with its
own training rows, reward rows (what online data mixing evaluates its rewards on) and held-out
rows (what the job measures), so that a learned mixture can be compared with the uniform one.

The domains differ in difficulty: the sentiment of a review (two answers) and the thing it
reviews (copied from the text) are easy, a word's category (48 facts, four answers) and an
adjective's opposite (48 facts, 48 answers) must be learnt or known, and counting a review's
sentences is hard. Every domain has 96 training, 8 reward and 12 held-out examples, drawn from
one pool, so held-out rows ask what training taught (facts are asked in three phrasings).
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
# a fact (a word's category, an adjective's opposite) is asked in three ways, so that the
# held-out rows of a domain come from the same distribution as its training rows: a held-out
# question asks, in other words, what training taught
_CATEGORY_PROMPTS = (
    _CATEGORY_PROMPT,
    'Which group does "{word}" belong to: fruit, animal, color or vehicle?',
    'Fruit, animal, color or vehicle: what is "{word}"?',
)
_OPPOSITE_PROMPTS = (
    _OPPOSITE_PROMPT,
    'Give the antonym of "{word}".',
    'Which word means the reverse of "{word}"?',
)
TRAIN = 96  # training examples per domain
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
        Example(template.format(word=w) + _SUFFIX, c)
        for c, words in _CATEGORIES.items()
        for w in words
        for template in _CATEGORY_PROMPTS
    ]
    opposite = [
        Example(template.format(word=x) + _SUFFIX, y)
        for a, b in _OPPOSITES
        for x, y in ((a, b), (b, a))
        for template in _OPPOSITE_PROMPTS
    ]
    size = TRAIN + HELD_OUT + REWARD  # every domain the same size
    return [
        _split(name, rng.sample(pool, size), rng)
        for name, pool in (
            ("sentiment", sentiment),
            ("subject", subject),
            ("category", category),
            ("opposite", opposite),
            ("count", count),
        )
    ]
