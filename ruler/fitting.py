"""Fitting one sample to a context length.

A generator describes a sample as a `Draft`: the prompt text around the context, the answers, the
haystack that fills the context and the texts (needles) inserted into it. `fit` chooses the
largest haystack that keeps prompt + generation budget within max_seq_length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .haystacks import Haystack, interleave
from .tokens import TokenCounter

# A solved example that its own max_seq_length cannot hold gets the next multiple of this.
EXAMPLE_LENGTH_STEP = 100


class TooShortError(ValueError):
    """max_seq_length cannot hold the prompt, the task's minimum haystack and the generation budget."""


@dataclass
class Example:
    """A solved example shown before the task, itself fitted to a short length (RULER's VT one-shot).

    It is rendered as `input + " " + " ".join(outputs) + separator`, then the task prompt follows.
    Where `max_seq_length` cannot hold the example with a tokenizer of few characters per token
    (byte-level, say), it gets the smallest longer multiple of `EXAMPLE_LENGTH_STEP` that can.
    """

    draft: Draft
    max_seq_length: int
    separator: str


@dataclass
class Draft:
    """One sample before its haystack size is chosen.

    The prompt is `head + context + tail + answer_prefix`, where the context is the haystack's
    units with each of `inserts` placed before the unit index that `place(number_of_units)`
    returns for it, joined by the haystack's separator.
    """

    head: str
    tail: str
    answer_prefix: str
    outputs: list[str]
    haystack: Haystack
    inserts: list[str] = field(default_factory=list)
    place: Callable[[int], list[int]] = lambda num_units: []
    keep_empty_gaps: bool = False
    min_units: int = 0
    example: Example | None = None


@dataclass
class FittedSample:
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int  # tokens of `input`, special tokens included


def fit(draft: Draft, max_seq_length: int, tokens_to_generate: int, counter: TokenCounter, exact: bool = False) -> FittedSample:
    """The sample with the most haystack units such that length + tokens_to_generate <= max_seq_length.

    Lengths are sums of memoised piece counts unless `exact`, where each candidate prompt is
    tokenized whole (for tokenizers whose counts are not additive over pieces).
    """
    head = draft.head
    if draft.example is not None:
        example = _fit_example(draft.example, max_seq_length, tokens_to_generate, counter, exact)
        head = example.input + " " + " ".join(example.outputs) + draft.example.separator + head
    allowed = max_seq_length - tokens_to_generate
    separator = draft.haystack.separator
    ending = [draft.tail, draft.answer_prefix]
    budget = allowed - counter.prompt(head, [separator + text for text in draft.inserts] + ending)
    while True:
        units = draft.haystack.fill(budget, counter)
        if len(units) < draft.min_units:
            raise TooShortError(
                f"max_seq_length={max_seq_length} leaves room for {len(units)} haystack units after "
                f"the prompt and {tokens_to_generate} generated tokens; this task needs at least "
                f"{draft.min_units}. Use a longer max_seq_length."
            )
        positions = draft.place(len(units))
        if len(positions) != len(draft.inserts) or not all(0 <= p <= len(units) for p in positions):
            raise ValueError(
                f"Draft.place({len(units)}) returned {positions}: it must give one unit index in "
                f"0..{len(units)} for each of the {len(draft.inserts)} inserts"
            )
        elements = interleave(units, draft.inserts, positions, draft.keep_empty_gaps)
        pieces = elements[:1] + [separator + element for element in elements[1:]] + ending
        text = head + "".join(pieces)
        length = counter.count([text])[0] if exact else counter.prompt(head, pieces)
        if length <= allowed:
            return FittedSample(text, draft.answer_prefix, draft.outputs, length)
        if not units:
            raise TooShortError(
                f"max_seq_length={max_seq_length} is too short for this task's prompt ({length} "
                f"tokens) plus {tokens_to_generate} generated tokens"
            )
        budget -= length - allowed


def _fit_example(example: Example, max_seq_length: int, tokens_to_generate: int, counter: TokenCounter, exact: bool) -> FittedSample:
    length = example.max_seq_length
    while True:
        try:
            return fit(example.draft, length, tokens_to_generate, counter, exact)
        except TooShortError as error:
            length = (length // EXAMPLE_LENGTH_STEP + 1) * EXAMPLE_LENGTH_STEP
            if length >= max_seq_length:
                raise TooShortError(f"the task's solved example does not fit in max_seq_length={max_seq_length}: {error}") from error
