"""How big a sample's haystack is: RULER's stepped search ("ruler"), or as big as fits ("fill").

RULER sizes a set once. It draws a sample at 1, 2, 3, ... steps of haystack (500 words of essay,
25 noise lines or distractors, 10 noise paragraphs, words or documents), counts the tokens of the
prompt with its answers appended, and stops at the first size that overflows: the set's size is
one step less. Each sample is then drawn at that size and, where it does not fit, shrunk a step
at a time. Published RULER scores come from haystacks sized that way, so "ruler" sizing (the
default) reproduces it: each generator replays RULER's search, with RULER's random draws
(sb_eval.ruler.reference_random) and RULER's token counts (no special tokens), and gets the same
size for the same tokenizer, length and seed. "fill" gives each sample the largest haystack that
fits instead (up to about 15 % more context at 4K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .tokens import TokenCounter

SIZINGS = ("ruler", "fill")


def check_sizing(sizing: str) -> str:
    if sizing not in SIZINGS:
        raise ValueError(f"sizing={sizing!r} is not a sizing; valid: {list(SIZINGS)} (ruler: RULER's stepped haystack sizes; fill: as large as fits)")
    return sizing


@dataclass(frozen=True)
class SizingTarget:
    """What a set is sized for: RULER's `max_seq_length`, `tokens_to_generate` and random seed."""

    max_seq_length: int
    tokens_to_generate: int
    counter: TokenCounter
    seed: int


@dataclass(frozen=True)
class ReferenceSize:
    """A set's haystack size as RULER finds it, and how a sample that does not fit shrinks.

    `units` are the generator's haystack units (essay words, lines, noise paragraphs, words,
    documents); `allowed` is the most tokens, counted without special tokens, that a sample's
    input may have; `example_units` sizes a solved example shown first (variable tracking).
    """

    units: int
    step: int
    allowed: int
    max_seq_length: int
    example_units: int | None = None


class ReferenceCounter:
    """Token counts as RULER takes them (`tokenizer.tokenize(text)`: no special tokens).

    A search only needs to know on which side of a threshold each count falls. A haystack whose
    size in units, at the tokens per unit of the last prompt counted, comes to `SKIP_BELOW` of
    the threshold or less is taken to be below it, and its prompt is not even built (RULER's
    search prompts grow by steps of the same kind of unit, so the rate barely moves, and it
    overstates the next prompt's count, since the fixed text is spread over fewer units). A
    prompt nearer the threshold is counted as the sum of its memoised piece counts, and one within
    `MARGIN` tokens of it whole. Where the sum and the whole count disagree by more than half the
    margin, the tokenizer does not count additively and `unreliable` is set: the search is then
    run again with every prompt near the threshold tokenized whole.
    """

    MARGIN = 64
    SKIP_BELOW = 0.97

    def __init__(self, counter: TokenCounter, exact: bool = False):
        self.counter = counter
        self.exact = exact
        self.unreliable = False
        self._tokens_per_unit: float | None = None

    def tokens(self, size: int, threshold: int, prompt: Callable[[], tuple[str, list[str]]]) -> int:
        """Tokens of the prompt (head, pieces) that `prompt()` builds around `size` haystack units,
        exact wherever it matters for comparing with `threshold`."""
        if self._tokens_per_unit is not None and size * self._tokens_per_unit <= self.SKIP_BELOW * threshold - self.MARGIN:
            return int(size * self._tokens_per_unit)
        first, rest = prompt()
        estimate = None
        if not self.exact:
            estimate = self.counter.prompt(first, rest) - self.counter.special_tokens
            self._tokens_per_unit = estimate / max(1, size)
            if abs(estimate - threshold) > self.MARGIN:
                return estimate
        exact = self.exact_tokens(first + "".join(rest))
        self._tokens_per_unit = exact / max(1, size)
        if estimate is not None and abs(exact - estimate) > self.MARGIN // 2:
            self.unreliable = True
        return exact

    def exact_tokens(self, text: str) -> int:
        return self.counter.count([text])[0] - self.counter.special_tokens


def reference_search(search: Callable[[ReferenceCounter], ReferenceSize], counter: TokenCounter) -> ReferenceSize:
    """`search` run with estimated counts, and again with exact ones if those proved unreliable.
    A search draws from its own seeded generators, so running it again makes the same draws."""
    estimated = ReferenceCounter(counter)
    size = search(estimated)
    return search(ReferenceCounter(counter, exact=True)) if estimated.unreliable else size


def stepped_size(
    tokens_at: Callable[[int, int], int],
    target: SizingTarget,
    step: int,
    most: int | None = None,
    extra_tokens: int = 0,
    cap_before_step: bool = False,
) -> int:
    """RULER's search loop: the haystack size one step below the first that overflows, trying
    one step, two steps, ...

    `tokens_at(size, threshold)` draws RULER's search sample at `size` units and counts its tokens
    with its answers appended (ReferenceCounter.tokens: exactly where it matters). The loop runs while
    tokens + tokens_to_generate + `extra_tokens` stay below max_seq_length; a count that lands on
    max_seq_length exactly ends it without the step back, as RULER's does. Sizes stop at `most`
    (the units there are), checked before the step up (`cap_before_step`, RULER's NIAH) or after
    it (its other tasks).
    """
    size = step
    limit = target.max_seq_length - target.tokens_to_generate - extra_tokens
    total = 0
    while total < limit:
        total = tokens_at(size, limit)
        if total > limit:
            return size - step
        if cap_before_step and most is not None and size > most:
            return most
        size += step
        if not cap_before_step and most is not None and size > most:
            return most
    return size
