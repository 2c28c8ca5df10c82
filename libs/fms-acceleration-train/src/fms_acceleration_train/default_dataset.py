"""The built-in dataset: short instructions with one-word answers, generated deterministically.

Three fixed-format tasks a 135M instruct model already half knows (sentiment of a review, the
category of a word, the opposite of an adjective). A few dozen LoRA steps teach it to answer with
the one expected word, so loss falls and exact-match accuracy on held-out prompts rises within
minutes on a CPU. Held-out prompts use words the training split never contains.

Reviews open with zero to eight neutral sentences before the one that carries the sentiment, so
examples range from about 45 to about 120 tokens, as instruction data does: in a padded batch a
third of the tokens are padding, which is what padding-free training saves.
"""

from __future__ import annotations

import random

from .data import Example

_POSITIVE = (
    "wonderful", "excellent", "delightful", "fantastic", "superb", "lovely", "brilliant",
    "amazing", "pleasant", "outstanding", "charming", "great",
)  # fmt: skip
_NEGATIVE = (
    "terrible", "awful", "disappointing", "horrible", "dreadful", "boring", "poor", "annoying",
    "unpleasant", "miserable", "mediocre", "bad",
)  # fmt: skip
_SUBJECTS = (
    "The movie", "The pizza", "This phone", "The hotel", "The concert", "The service",
    "This book", "The coffee", "The trip", "The game", "The class", "The show",
)  # fmt: skip
_CATEGORIES = {
    "fruit": ("banana", "apple", "mango", "cherry", "peach", "grape", "lemon", "plum", "kiwi",
              "pear", "orange", "melon"),
    "animal": ("tiger", "rabbit", "horse", "eagle", "dolphin", "wolf", "camel", "zebra", "goat",
               "otter", "lion", "sheep"),
    "color": ("purple", "green", "yellow", "crimson", "blue", "brown", "violet", "scarlet",
              "pink", "gray", "black", "white"),
    "vehicle": ("truck", "bicycle", "airplane", "motorcycle", "train", "bus", "ship", "tractor",
                "scooter", "van", "taxi", "car"),
}  # fmt: skip
_OPPOSITES = (
    ("hot", "cold"), ("fast", "slow"), ("happy", "sad"), ("early", "late"), ("open", "closed"),
    ("full", "empty"), ("wet", "dry"), ("strong", "weak"), ("loud", "quiet"), ("up", "down"),
    ("clean", "dirty"), ("thick", "thin"), ("cheap", "expensive"), ("true", "false"),
    ("high", "low"), ("near", "far"), ("safe", "dangerous"), ("win", "lose"), ("push", "pull"),
    ("inside", "outside"), ("day", "night"), ("before", "after"), ("left", "right"),
    ("always", "never"),
)  # fmt: skip

# Neutral context: no sentiment and none of the adjectives above.
_CONTEXT = (
    "We went there on a Saturday afternoon.", "It was my second time.",
    "I went with two friends from work.", "It is close to the train station.",
    "We had booked a week in advance.", "It took about two hours in total.",
    "My sister had suggested it to me.", "We arrived a few minutes early.",
    "The tickets were bought online.", "I had read about it in the newspaper.",
    "It was raining when we got there.", "We paid by card at the end.",
)  # fmt: skip
_MAX_CONTEXT = 8

_SENTIMENT_PROMPT = (
    'Review: "{context}{subject} was {adjective}."\nIs this review positive or negative?'
)
_CATEGORY_PROMPT = 'Is "{word}" a fruit, an animal, a color or a vehicle?'
_OPPOSITE_PROMPT = 'What is the opposite of "{word}"?'
_SUFFIX = " Answer with one word."


def _split(items: tuple, held_out_every: int) -> tuple[list, list]:
    """Every `held_out_every`-th item goes to the held-out split, the rest to training."""
    train = [x for i, x in enumerate(items) if i % held_out_every != held_out_every - 1]
    held = [x for i, x in enumerate(items) if i % held_out_every == held_out_every - 1]
    return train, held


def _sentiment(
    adjectives: list[tuple[str, str]], subjects: tuple[str, ...], rng: random.Random
) -> list[Example]:
    examples = []
    for a, label in adjectives:
        for s in subjects:
            context = rng.sample(_CONTEXT, rng.randint(0, _MAX_CONTEXT))
            prompt = _SENTIMENT_PROMPT.format(
                context="".join(c + " " for c in context), subject=s, adjective=a
            )
            examples.append(Example(prompt + _SUFFIX, label))
    return examples


def default_splits(seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Return (train, held_out) examples; the same for the same seed, disjoint in their words."""
    rng = random.Random(seed)
    pos_train, pos_held = _split(_POSITIVE, 4)
    neg_train, neg_held = _split(_NEGATIVE, 4)
    labelled_train = [(a, "positive") for a in pos_train] + [(a, "negative") for a in neg_train]
    labelled_held = [(a, "positive") for a in pos_held] + [(a, "negative") for a in neg_held]
    # Training sees every subject with training adjectives; held-out reviews pair unseen
    # adjectives with a few subjects, so the answer must come from the adjective.
    train = rng.sample(_sentiment(labelled_train, _SUBJECTS, rng), 96)
    held = rng.sample(_sentiment(labelled_held, _SUBJECTS, rng), 16)

    for category, words in _CATEGORIES.items():
        words_train, words_held = _split(words, 3)
        train += [Example(_CATEGORY_PROMPT.format(word=w) + _SUFFIX, category) for w in words_train]
        held += [Example(_CATEGORY_PROMPT.format(word=w) + _SUFFIX, category) for w in words_held]

    pairs_train, pairs_held = _split(_OPPOSITES, 3)
    for pairs, out in ((pairs_train, train), (pairs_held, held)):
        # Both directions: "hot" -> "cold" and "cold" -> "hot".
        for a, b in pairs:
            out.append(Example(_OPPOSITE_PROMPT.format(word=a) + _SUFFIX, b))
            out.append(Example(_OPPOSITE_PROMPT.format(word=b) + _SUFFIX, a))

    rng.shuffle(train)
    rng.shuffle(held)
    return train, held
