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


def random_word(rng: random.Random) -> str:
    """An "adjective-noun" pair, uniform over RULER's WORDS (all such pairs of wonderwords' lists)."""
    return f"{rng.choice(_word_list('adjectivelist'))}-{rng.choice(_word_list('nounlist'))}"


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


def value_drawer(value_type: str, argument: str) -> Callable[[random.Random], str]:
    """The function drawing values of `value_type`; `argument` names the parameter in errors."""
    if value_type not in VALUE_TYPES:
        raise ValueError(f"{argument}={value_type!r} is not a value type; valid: {sorted(VALUE_TYPES)}")
    return VALUE_TYPES[value_type]
