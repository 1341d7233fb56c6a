"""Haystacks: the filler text a sample's context is made of, measured in units.

A haystack hands out the longest run of units that fits a token budget. Each unit appears in the
prompt as `separator + unit` (the first one without the separator), and its token count is the
memoised count of that piece, so fitting a 64K context costs a walk over cached counts
rather than re-tokenizing the context.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Protocol

from .tokens import TokenCounter

# RULER's noise haystack (niah_single_1) and the noise of variable tracking.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Haystack(Protocol):
    separator: str

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        """The longest run of units whose pieces (separator + unit) sum to at most `budget` tokens."""

    def take(self, count: int) -> list[str]:
        """The units of a haystack of `count` of RULER's units (sb_eval.ruler.sizing)."""


class RepeatedText:
    """The same text over and over: RULER's noise haystack."""

    def __init__(self, text: str, separator: str):
        self.text = text
        self.separator = separator

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        per_unit = counter.pieces([self.separator + self.text])[0]
        return [self.text] * max(0, budget // per_unit)

    def take(self, count: int) -> list[str]:
        return [self.text] * count


class TextRun:
    """A fixed sequence of units, taken from its start (RULER's essay haystack of sentences) or
    from a given unit.

    Units are counted lazily, a chunk at a time, as far as the budgets asked so far reach, and the
    counts are shared by every sample that uses the same run with the same counter.
    """

    CHUNK = 256  # units counted at a time

    def __init__(self, units: Sequence[str], separator: str, name: str):
        self.units = units
        self.separator = separator
        self.name = name
        self._counter: TokenCounter | None = None
        self._unit_tokens: list[int | None] = []

    def fill(self, budget: int, counter: TokenCounter, start: int = 0) -> list[str]:
        """The longest run from unit `start` on that fits `budget` (the run's first unit is then
        counted with its separator, a token or so more than it costs at the very start)."""
        if not 0 <= start < len(self.units):
            raise ValueError(f"start={start} is not a unit of the {self.name} haystack (0 .. {len(self.units) - 1})")
        if counter is not self._counter:
            self._counter, self._unit_tokens = counter, [None] * len(self.units)
        end, total = start, 0
        while end < len(self.units):
            if self._unit_tokens[end] is None:
                chunk = range(end, min(end + self.CHUNK, len(self.units)))
                for index, tokens in zip(chunk, counter.pieces(self.separator + self.units[i] for i in chunk)):
                    self._unit_tokens[index] = tokens
            if total + self._unit_tokens[end] > budget:
                return list(self.units[start:end])
            total += self._unit_tokens[end]
            end += 1
        raise ValueError(
            f"The {self.name} haystack holds {total} tokens from unit {start} on, no more than the "
            f"{budget} this max_seq_length needs"
        )


class Essay(TextRun):
    """The essay haystack: whole sentences from its start ("fill"), or, as RULER cuts it, its
    first words split into sentences ("ruler": `take(words)`).

    RULER collapses whitespace runs to one space, splits the text at spaces into words, takes the
    first N, and splits those into sentences with punkt. `text` is the collapsed text and
    `sentences` its punkt sentences, in order; the sentences of a prefix are then the whole
    sentences inside it and the cut one's start (punkt needs the text after a sentence end only
    to decide that end, so the earlier ones do not change).
    """

    def __init__(self, text: str, sentences: Sequence[str]):
        super().__init__(sentences, " ", "essay")
        self._word_ends = list(accumulate(len(word) + 1 for word in text.split(" ")))
        self._text = text
        self._sentence_ends, position = [], 0
        for sentence in sentences:
            start = text.find(sentence, position)
            if start < 0:
                raise ValueError(f"the essay sentence {sentence[:60]!r} is not in the essay text after character {position}")
            position = start + len(sentence)
            self._sentence_ends.append(position)

    @property
    def words(self) -> int:
        return len(self._word_ends)

    def take(self, count: int) -> list[str]:
        """The sentences of the essay's first `count` words (all of them past its end)."""
        cut = self._word_ends[min(count, self.words) - 1] - 1 if count > 0 else 0
        whole = bisect.bisect_right(self._sentence_ends, cut)
        rest = self._text[self._sentence_ends[whole - 1] if whole else 0 : cut].strip()
        return list(self.units[:whole]) + ([rest] if rest else [])


class TextRunFrom:
    """A `TextRun` entered at unit `start` rather than at its beginning: a training haystack that
    differs from sample to sample while its token counts stay shared."""

    def __init__(self, run: TextRun, start: int):
        self.run = run
        self.start = start
        self.separator = run.separator

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        return self.run.fill(budget, counter, self.start)

    def take(self, count: int) -> list[str]:
        raise ValueError("a training haystack entered at a random unit has no RULER size; use sizing='fill'")


class DistractorPool:
    """A growing list of random units drawn from one seed, shared by the samples of one set.

    Drawing fresh random distractors for every sample (as RULER's needle haystack does) would
    mean tokenizing every one of them; samples instead draw theirs from this pool, whose units
    are each tokenized once.
    """

    def __init__(self, draw_unit: Callable[[random.Random], str], seed: int):
        self._draw_unit = draw_unit
        self._rng = random.Random(seed)
        self.units: list[str] = []

    def grow(self, size: int) -> None:
        while len(self.units) < size:
            self.units.append(self._draw_unit(self._rng))


class PoolSample:
    """One sample's distractors: distinct units of a pool in a random order of its own."""

    # The pool is kept this many times larger than one sample's need, so that samples share few
    # distractors.
    POOL_FACTOR = 4

    def __init__(self, pool: DistractorPool, rng: random.Random, separator: str):
        self.pool = pool
        self.separator = separator
        self._rng = rng
        self._order: list[str] | None = None

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        if self._order is None:
            self.pool.grow(64)
            shortest = min(counter.pieces(self.separator + unit for unit in self.pool.units[:64]))
            self._draw_order(max(0, budget) // max(1, shortest) + 1)
        counts = counter.pieces(self.separator + unit for unit in self._order)
        total, taken = 0, 0
        for tokens in counts:
            if total + tokens > budget:
                break
            total, taken = total + tokens, taken + 1
        return self._order[:taken]

    def take(self, count: int) -> list[str]:
        if self._order is None:
            self._draw_order(count)
        if count > len(self._order):
            raise ValueError(f"this sample drew {len(self._order)} distractors, fewer than the {count} asked for")
        return self._order[:count]

    def _draw_order(self, most_needed: int) -> None:
        self.pool.grow(self.POOL_FACTOR * most_needed)
        size = len(self.pool.units)
        self._order = [self.pool.units[i] for i in self._rng.sample(range(size), min(size, most_needed))]


def interleave(units: list[str], inserts: list[str], positions: list[int], keep_empty_gaps: bool) -> list[str]:
    """Units with each insert placed before the unit index paired with it.

    Inserts keep their order where positions tie. With `keep_empty_gaps`, an empty run of units
    between two inserts (or at either end) stays as an empty element, as RULER's essay haystack
    keeps empty sentence runs when it joins them.
    """
    elements: list[str] = []
    start = 0
    for position, insert in sorted(zip(positions, inserts), key=lambda pair: pair[0]):
        gap = units[start:position]
        elements.extend(gap if gap or not keep_empty_gaps else [""])
        elements.append(insert)
        start = position
    rest = units[start:]
    elements.extend(rest if rest or not keep_empty_gaps else [""])
    return elements


def depth_positions(num_units: int, depths_percent: list[int]) -> list[int]:
    """RULER's essay needle positions, ascending: unit index int(num_units * depth / 100)."""
    return sorted(int(num_units * (depth / 100)) for depth in depths_percent)


def evenly_spaced_depths(count: int = 40) -> list[int]:
    """RULER's DEPTHS: `count` depths from 0 to 100 percent, rounded half to even like numpy."""
    return [round(100 * i / (count - 1)) for i in range(count)]

