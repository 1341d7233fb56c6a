"""Fitting one sample to a context length.

A generator describes a sample as a `Draft`: the prompt text around the context, the answers, the
haystack that fills the context and the texts (needles) inserted into it. `fit` chooses the
largest haystack that keeps prompt + generation budget within max_seq_length ("fill" sizing);
`fit_reference` takes the size RULER's search found for the set ("ruler" sizing,
sb_eval.ruler.sizing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .haystacks import Haystack, interleave
from .sizing import ReferenceSize
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
    # Which context elements (units or inserts) hold an answer, for their depth; None: no depth.
    answers_in: Callable[[str], bool] | None = None


@dataclass
class FittedSample:
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int  # tokens of `input`, special tokens included
    # Where the answers sit: each answer-holding element's first token in `input` (0-based), and
    # its depth, in percent of the context's tokens before it.
    needle_tokens: list[int] = field(default_factory=list)
    needle_depths: list[float] = field(default_factory=list)


def fit(draft: Draft, max_seq_length: int, tokens_to_generate: int, counter: TokenCounter, exact: bool = False) -> FittedSample:
    """The sample with the most haystack units such that length + tokens_to_generate <= max_seq_length.

    Lengths are sums of memoised piece counts unless `exact`, where each candidate prompt is
    tokenized whole (for tokenizers whose counts are not additive over pieces).
    """
    head = draft.head
    if draft.example is not None:
        head = _after_example(draft, _fit_example(draft.example, max_seq_length, tokens_to_generate, counter, exact))
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
        sample = _render(draft, head, units, counter, exact)
        if sample.length <= allowed:
            return _located(draft, head, units, sample, counter, exact)
        if not units:
            raise TooShortError(
                f"max_seq_length={max_seq_length} is too short for this task's prompt ({sample.length} "
                f"tokens) plus {tokens_to_generate} generated tokens"
            )
        budget -= sample.length - allowed


def _after_example(draft: Draft, example: FittedSample) -> str:
    """The draft's head behind its solved example: the example's prompt and answers, then the separator."""
    return example.input + " " + " ".join(example.outputs) + draft.example.separator + draft.head


def fit_reference(draft: Draft, size: ReferenceSize, counter: TokenCounter, exact: bool = False) -> FittedSample:
    """The sample with RULER's haystack size for its set, a step smaller at a time while its input
    (counted without special tokens, as RULER counts) has more than `size.allowed` tokens."""
    head = draft.head
    if draft.example is not None:
        if size.example_units is None:
            raise ValueError("this task shows a solved example, but its ReferenceSize gives no example_units")
        example = draft.example.draft
        head = _after_example(draft, _render(example, example.head, example.haystack.take(size.example_units), counter, exact))
    units_count = size.units
    while True:
        units = draft.haystack.take(units_count) if units_count > 0 else []
        if len(units) < max(1, draft.min_units):
            raise TooShortError(
                f"max_seq_length={size.max_seq_length} leaves {max(0, units_count)} units of haystack at RULER's "
                f"size (steps of {size.step}), too few for this task: RULER's own generator cannot make this set. "
                f"Use a longer max_seq_length, or sizing='fill'."
            )
        sample = _render(draft, head, units, counter, exact)
        if sample.length - counter.special_tokens <= size.allowed:
            return _located(draft, head, units, sample, counter, exact)
        units_count -= size.step


def _render(draft: Draft, head: str, units: list[str], counter: TokenCounter, exact: bool) -> FittedSample:
    """The prompt of `draft` with `units` of haystack after `head`, and its token count."""
    pieces = _pieces(draft, units)
    text = head + "".join(pieces)
    if exact:
        return FittedSample(text, draft.answer_prefix, draft.outputs, counter.count([text])[0])
    # The context's ends may merge with the text around them into one token (its last newline
    # with the tail's, the head's last space with the first word): each end is counted with its
    # neighbour, the repeated middle piece by piece.
    first, middle, last = head + pieces[0], pieces[1:-3], "".join(pieces[-3:]) if len(pieces) > 3 else "".join(pieces[1:])
    return FittedSample(text, draft.answer_prefix, draft.outputs, counter.prompt(first, middle + [last]))


def _pieces(draft: Draft, units: list[str]) -> list[str]:
    """The prompt after its head: the context's elements (units and inserts) with their separator
    before all but the first, then the tail and the answer prefix."""
    positions = draft.place(len(units))
    if len(positions) != len(draft.inserts) or not all(0 <= p <= len(units) for p in positions):
        raise ValueError(
            f"Draft.place({len(units)}) returned {positions}: it must give one unit index in "
            f"0..{len(units)} for each of the {len(draft.inserts)} inserts"
        )
    elements = interleave(units, draft.inserts, positions, draft.keep_empty_gaps)
    separator = draft.haystack.separator
    if separator:
        elements[1:] = [separator + element for element in elements[1:]]
    return elements + [draft.tail, draft.answer_prefix]


def _located(draft: Draft, head: str, units: list[str], sample: FittedSample, counter: TokenCounter, exact: bool) -> FittedSample:
    """`sample` with the token position and depth of each context element that holds an answer:
    the index of the token that holds the element's first character."""
    if draft.answers_in is None:
        return sample
    separator = draft.haystack.separator
    pieces = _pieces(draft, units)[:-2]
    counts = [0] * len(pieces) if exact else counter.pieces(pieces)
    context_start = counter.count([head])[0] if exact else counter.prompt(head, [])
    offset, cumulative, firsts = len(head), context_start, []  # (character, token) of each element's start
    for piece, count, before in zip(pieces, counts, [""] + [separator] * len(pieces)):
        if draft.answers_in(piece[len(before):]):
            # Its first character is in the piece's first token, or in the one after its separator.
            firsts.append((offset + len(before), cumulative + counter.pieces([piece[: len(before) + 1]])[0] - 1))
        offset, cumulative = offset + len(piece), cumulative + count
    if exact:
        context_end = counter.count([sample.input[:offset]])[0]
        tokens = [count - 1 for count in counter.count([sample.input[: character + 1] for character, _ in firsts])]
    else:
        context_end, tokens = cumulative, [token for _, token in firsts]
    span = max(1, context_end - context_start)
    sample.needle_tokens = tokens
    sample.needle_depths = [round(100 * (token - context_start) / span, 2) for token in tokens]
    return sample


def _fit_example(example: Example, max_seq_length: int, tokens_to_generate: int, counter: TokenCounter, exact: bool) -> FittedSample:
    length = example.max_seq_length
    while True:
        try:
            return fit(example.draft, length, tokens_to_generate, counter, exact)
        except TooShortError as error:
            length = (length // EXAMPLE_LENGTH_STEP + 1) * EXAMPLE_LENGTH_STEP
            if length >= max_seq_length:
                raise TooShortError(f"the task's solved example does not fit in max_seq_length={max_seq_length}: {error}") from error
