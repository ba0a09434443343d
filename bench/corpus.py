"""The benchmark texts, made here (no downloads): English paragraphs from a fixed seed."""

from __future__ import annotations

import random

_SUBJECTS = [
    "The old lighthouse keeper", "A young engineer", "The city council", "Our neighbour",
    "The research team", "A tired student", "The river", "Every morning the baker",
    "The small village school", "A travelling musician", "The committee", "My grandmother",
]
_VERBS = [
    "carefully repaired", "quietly watched", "argued about", "wrote a long letter about",
    "forgot", "slowly rebuilt", "measured", "painted", "explained", "walked past",
    "questioned", "celebrated",
]
_OBJECTS = [
    "the broken bridge near the market", "a map of the northern coast",
    "the results of last year's harvest", "the price of bread and coffee",
    "an old wooden boat", "the rules of the new game", "the history of the valley",
    "a garden full of tomatoes", "the noisy trains at night", "the weather in early spring",
    "a book about distant stars", "the plans for a new library",
]
_ENDINGS = [
    "before the sun went down.", "while everyone else was asleep.",
    "because nobody else would do it.", "and then went home for dinner.",
    "although it started to rain.", "with surprising patience.",
    "for the third time that week.", "as the town slowly woke up.",
]


def paragraphs(count: int = 64, sentences: int = 3, seed: int = 0) -> list[str]:
    """``count`` paragraphs of ``sentences`` sentences each (about 43 GPT-2 tokens)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        parts = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_ENDINGS)}"
            for _ in range(rng.choice([sentences - 1, sentences, sentences]))
        ]
        out.append(" ".join(parts))
    return out


def tiny_texts(count: int, seed: int = 1) -> list[str]:
    """``count`` distinct short texts (at most 16 GPT-2 tokens) for tiny-probe runs."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} item {i}." for i in range(count)]
