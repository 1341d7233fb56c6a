"""Random needle keys and values of RULER's three types: words, numbers, uuids."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from functools import cache
from importlib.resources import files


@cache
def _word_list(name: str) -> list[str]:
    """One of wonderwords' shipped lists ("nounlist", "adjectivelist", "verblist"), sorted."""
    text = (files("wonderwords") / "assets" / f"{name}.txt").read_text(encoding="utf-8")
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


# Word keys are "first-noun" pairs. RULER's are adjective-noun; verb-noun pairs (of verbs that are
# not also adjectives, like "clean") never equal one of them, so samples made for training with
# them share no key with the evaluation sets.
WORD_PAIRS = ("adjective-noun", "verb-noun")


@cache
def _first_words(pair: str) -> list[str]:
    adjectives = _word_list("adjectivelist")
    if pair == "adjective-noun":
        return adjectives
    also_adjectives = set(adjectives)
    return [verb for verb in _word_list("verblist") if verb not in also_adjectives]


def random_word(rng: random.Random, pair: str = "adjective-noun") -> str:
    """A `pair` of words ("adjective-noun": uniform over RULER's WORDS, all such pairs of
    wonderwords' lists; "verb-noun": the same with its verbs that are not adjectives)."""
    return f"{rng.choice(_first_words(pair))}-{rng.choice(_word_list('nounlist'))}"


def random_number(rng: random.Random) -> str:
    """A 7-digit number."""
    return str(rng.randint(10**6, 10**7 - 1))


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


VALUE_TYPES: dict[str, Callable[[random.Random], str]] = {
    "words": random_word,
    "numbers": random_number,
    "uuids": random_uuid,
}


def value_drawer(value_type: str, argument: str, word_pair: str = "adjective-noun") -> Callable[[random.Random], str]:
    """The function drawing values of `value_type` (words as `word_pair`s); `argument` names the
    parameter in errors."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"{argument}={value_type!r} is not a value type; valid: {sorted(VALUE_TYPES)}")
    if word_pair not in WORD_PAIRS:
        raise ValueError(f"key_words={word_pair!r} is not a kind of word pair; valid: {sorted(WORD_PAIRS)}")
    if value_type == "words":
        return lambda rng: random_word(rng, word_pair)
    return VALUE_TYPES[value_type]
