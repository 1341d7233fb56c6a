"""The random draws of RULER's own generator, reproduced draw for draw.

RULER's scripts seed Python's global `random` and numpy's legacy global generator with the run's
seed and size every sample set with a search whose steps draw random samples from those streams
(sb_eval.ruler.sizing). Reproducing its haystack sizes for a tokenizer therefore means making the
same draws: Python's Mersenne Twister is `random.Random(seed)` itself; numpy's legacy generator
is the same Mersenne Twister seeded differently, with its own bounded-integer method; and a
`random.choice` over RULER's sorted list of 6.2 million adjective-noun pairs needs that list's
order, which `SortedPairs` gives without building it.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from operator import itemgetter
from typing import TypeVar

from .values import _word_list

T = TypeVar("T")

_MT_STATE_WORDS = 624


class NumpyLegacyRandom:
    """numpy's `np.random.seed(seed)` then `np.random.randint(low, high)` (legacy RandomState)."""

    def __init__(self, seed: int):
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in 0 .. 2**32 - 1, as numpy's legacy seeding requires")
        # numpy seeds its Mersenne Twister with init_genrand; Python's seeds it from an array. The
        # state words are then the same kind, so Python's generator can run numpy's state.
        state = [seed]
        for index in range(1, _MT_STATE_WORDS):
            previous = state[-1]
            state.append((1812433253 * (previous ^ (previous >> 30)) + index) & 0xFFFFFFFF)
        self._twister = random.Random()
        self._twister.setstate((3, (*state, _MT_STATE_WORDS), None))

    def randint(self, low: int, high: int) -> int:
        """An integer in [low, high), drawn as numpy's legacy randint draws it: 32-bit words masked
        to the range's bit length, rejected until one falls in the range."""
        span = high - 1 - low
        if not 0 <= span < 2**32:
            raise ValueError(f"randint({low}, {high}): the range must hold 1 to 2**32 integers")
        mask = (1 << span.bit_length()) - 1
        while (value := self._twister.getrandbits(32) & mask) > span:
            pass
        return low + value


class SortedPairs(Sequence):
    """`sorted({f"{first}-{second}" for first in firsts for second in seconds})`, indexed lazily.

    Each first word's pairs form a sorted block. Blocks whose ranges do not overlap follow one
    another whole; the few that do (a first word such as "old" and another such as
    "old-fashioned") are merged and built out.
    """

    def __init__(self, firsts: Sequence[str], seconds: Sequence[str]):
        self._seconds = sorted(set(seconds))
        blocks = sorted((f"{first}-{self._seconds[0]}", f"{first}-{self._seconds[-1]}", first) for first in set(firsts))
        groups: list[list[tuple[str, str, str]]] = []
        for block in blocks:
            if groups and block[0] <= max(end for _, end, _ in groups[-1]):
                groups[-1].append(block)
            else:
                groups.append([block])
        self._groups: list[str | list[str]] = [
            group[0][2] if len(group) == 1 else sorted({f"{first}-{second}" for _, _, first in group for second in self._seconds})
            for group in groups
        ]
        self._starts = [0]
        for group in self._groups:
            self._starts.append(self._starts[-1] + (len(self._seconds) if isinstance(group, str) else len(group)))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range 0 .. {len(self) - 1}")
        number = bisect.bisect_right(self._starts, index) - 1
        group, offset = self._groups[number], index - self._starts[number]
        return f"{group}-{self._seconds[offset]}" if isinstance(group, str) else group[offset]


@lru_cache(maxsize=16)
def _shuffled_order(seed: int, length: int) -> Callable[[Sequence], tuple]:
    order = list(range(length))
    random.Random(seed).shuffle(order)
    return itemgetter(*order) if length > 1 else lambda items: tuple(items)


def shuffled_as_ruler(items: Sequence[T], seed: int) -> list[T]:
    """`items` shuffled by `random.Random(seed).shuffle`, as RULER shuffles its lists, needles and
    documents: the same order for every list of the same length. The order is computed once
    per length and seed."""
    return list(_shuffled_order(seed, len(items))(items))


@cache
def adjective_noun_pairs() -> SortedPairs:
    """RULER's needle key words: every adjective-noun pair of wonderwords' lists, sorted."""
    return SortedPairs(_word_list("adjectivelist"), _word_list("nounlist"))
