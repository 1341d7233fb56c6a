"""RULER's needle-in-a-haystack generator (scripts/data/synthetic/niah.py), offline.

Parameters keep RULER's names, so a line of RULER's synthetic.yaml is a valid parameter set:
type_haystack (repeat | essay | needle), type_needle_k and type_needle_v (words | numbers |
uuids), num_needle_k, num_needle_v, num_needle_q. Three more make training samples that share
nothing with the evaluation sets but their form: key_words (RULER's adjective-noun pairs, or
verb-noun), essay_file (another text's sentences as the essay haystack) and essay_start
(RULER's beginning of the text, or a random sentence per sample); with those, samples are
not RULER's and fill their context (sizing="fill").
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from .corpora import essay_sentences, essay_text
from .fitting import Draft
from .haystacks import (
    NOISE,
    DistractorPool,
    Essay,
    PoolSample,
    RepeatedText,
    TextRunFrom,
    depth_positions,
    evenly_spaced_depths,
    interleave,
)
from .reference_random import adjective_noun_pairs
from .registry import DrawSample, Sampler, register_generator
from .sizing import ReferenceCounter, ReferenceSize, SizingTarget, reference_search, stepped_size
from .values import value_drawer

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

# Depths (percent of the essay) that RULER draws essay needle positions from.
DEPTHS = evenly_spaced_depths(40)
HAYSTACKS = ("repeat", "essay", "needle")
ESSAY_STARTS = ("beginning", "random")
# A random essay start leaves at least this share of the text after it, for the longest contexts.
RANDOM_START_SHARE = 0.8
# RULER's haystack steps: essay words, noise lines or distractor lines (fewer below 4K).
ESSAY_STEP, LINE_STEP, SHORT_LINE_STEP, SHORT_CONTEXT = 500, 25, 5, 4096


@register_generator("niah", version=2)
def niah(
    set_rng: random.Random,
    target: SizingTarget,
    *,
    type_haystack: str = "essay",
    type_needle_k: str = "words",
    type_needle_v: str = "numbers",
    num_needle_k: int = 1,
    num_needle_v: int = 1,
    num_needle_q: int = 1,
    key_words: str = "adjective-noun",
    essay_file: str | None = None,
    essay_start: str = "beginning",
) -> DrawSample:
    draw_key = value_drawer(type_needle_k, "type_needle_k", key_words)
    draw_value = value_drawer(type_needle_v, "type_needle_v")
    if essay_start not in ESSAY_STARTS:
        raise ValueError(f"essay_start={essay_start!r} is not one of {list(ESSAY_STARTS)}")
    if type_haystack != "essay" and (essay_file is not None or essay_start != "beginning"):
        raise ValueError(f"essay_file and essay_start apply to type_haystack='essay' only, not {type_haystack!r}")
    for name, count in (("num_needle_k", num_needle_k), ("num_needle_v", num_needle_v), ("num_needle_q", num_needle_q)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}={count!r} must be a positive integer")
    num_needle_k = max(num_needle_k, num_needle_q)
    num_needles = num_needle_k * num_needle_v
    if type_haystack == "essay" and num_needles > len(DEPTHS):
        raise ValueError(f"the essay haystack places at most {len(DEPTHS)} needles; got {num_needles}")
    head, tail, answer_prefix = prompt_parts(type_needle_v, singular=num_needle_q * num_needle_v == 1)

    if type_haystack == "essay":
        essay = Essay(essay_text(essay_file), essay_sentences(essay_file))
    elif type_haystack == "needle":
        pool = DistractorPool(
            lambda rng: NEEDLE.format(type_needle_v=type_needle_v, key=draw_key(rng), value=draw_value(rng)),
            set_rng.getrandbits(64),
        )
    elif type_haystack != "repeat":
        raise ValueError(f"type_haystack={type_haystack!r} is not a haystack; valid: {list(HAYSTACKS)}")

    def draw(rng: random.Random, index: int) -> Draft:
        keys, values, needles = [], [], []
        for _ in range(num_needle_k):
            keys.append(draw_key(rng))
            values.append([draw_value(rng) for _ in range(num_needle_v)])
            needles += [NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value) for value in values[-1]]
        rng.shuffle(needles)
        queried = rng.sample(range(num_needle_k), num_needle_q)
        queries = [keys[i] for i in queried]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        answered = {NEEDLE.format(type_needle_v=type_needle_v, key=keys[i], value=value) for i in queried for value in values[i]}
        prompt = dict(
            head=head,
            tail=tail.format(query=query),
            answer_prefix=answer_prefix.format(query=query),
            outputs=[value for i in queried for value in values[i]],
            inserts=needles,
            answers_in=answered.__contains__,
        )
        if type_haystack == "essay":
            depths = rng.sample(DEPTHS, num_needles)
            haystack = essay
            if essay_start == "random":
                haystack = TextRunFrom(essay, rng.randrange(max(1, int(len(essay.units) * RANDOM_START_SHARE))))
            return Draft(**prompt, haystack=haystack, place=lambda units: depth_positions(units, depths), keep_empty_gaps=True)
        haystack = RepeatedText(NOISE, "\n") if type_haystack == "repeat" else PoolSample(pool, random.Random(rng.getrandbits(64)), "\n")
        position_seed = rng.getrandbits(64)
        return Draft(
            **prompt,
            haystack=haystack,
            place=lambda units: random.Random(position_seed).sample(range(units), num_needles),
            min_units=num_needles,
        )

    def reference_size() -> ReferenceSize:
        step = ESSAY_STEP if type_haystack == "essay" else LINE_STEP if target.max_seq_length >= SHORT_CONTEXT else SHORT_LINE_STEP
        search_sample = _reference_search_sample(
            target.seed, type_haystack, type_needle_k, type_needle_v, num_needle_k, num_needle_v, num_needle_q, essay if type_haystack == "essay" else None
        )

        def search(counter: ReferenceCounter) -> ReferenceSize:
            draw_at = search_sample()
            units = stepped_size(
                lambda size, threshold: counter.tokens(size, threshold, draw_at(size)),
                target,
                step,
                most=essay.words if type_haystack == "essay" else None,
                cap_before_step=True,
            )
            return ReferenceSize(units, step, target.max_seq_length - target.tokens_to_generate, target.max_seq_length)

        return reference_search(search, target.counter)

    rulers = key_words == "adjective-noun" and essay_file is None and essay_start == "beginning"
    return Sampler(draw, reference_size if rulers else None)


def _reference_search_sample(
    seed: int,
    type_haystack: str,
    type_needle_k: str,
    type_needle_v: str,
    num_needle_k: int,
    num_needle_v: int,
    num_needle_q: int,
    essay: Essay | None,
) -> Callable[[], Callable[[int], Callable[[], tuple[str, list[str]]]]]:
    """RULER's search samples: a function that starts RULER's random stream afresh and returns
    the function that makes, at each size in turn, RULER's draws in RULER's order, and returns
    the function building that sample's prompt as (head, the rest of its pieces with the answers
    appended), to be called only if its tokens are counted."""

    def start() -> Callable[[int], Callable[[], tuple[str, list[str]]]]:
        rng = random.Random(seed)
        (draw_key, key_text), (draw_value, value_text) = _reference_drawer(rng, type_needle_k), _reference_drawer(rng, type_needle_v)
        head, tail, answer_prefix = prompt_parts(type_needle_v, singular=num_needle_q * num_needle_v == 1)

        def needle(key: object, value: object) -> str:
            return NEEDLE.format(type_needle_v=type_needle_v, key=key_text(key), value=value_text(value))

        def sample_at(size: int) -> Callable[[], tuple[str, list[str]]]:
            keys, values, needles = [], [], []
            for _ in range(num_needle_k):
                keys.append(draw_key())
                values.append([])
                for _ in range(num_needle_v):
                    values[-1].append(draw_value())
                    needles.append(needle(keys[-1], values[-1][-1]))
            random.Random(seed).shuffle(needles)
            distractors = []
            if essay is not None:
                units = essay.take(size)
                positions = depth_positions(len(units), rng.sample(DEPTHS, len(needles)))
            else:
                if type_haystack == "needle":
                    distractors = [(draw_key(), draw_value()) for _ in range(size)]
                positions = sorted(rng.sample(range(size), len(needles)), reverse=True)
            queried = rng.sample(range(num_needle_k), num_needle_q)

            def prompt() -> tuple[str, list[str]]:
                queries = [key_text(keys[i]) for i in queried]
                query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
                if essay is None:
                    lines = [needle(key, value) for key, value in distractors] if distractors else [NOISE] * size
                elements = interleave(units if essay is not None else lines, needles, positions, keep_empty_gaps=essay is not None)
                separator = " " if essay is not None else "\n"
                answers = " ".join(value_text(value) for i in queried for value in values[i])
                return head, elements[:1] + [separator + element for element in elements[1:]] + [
                    tail.format(query=query), answer_prefix.format(query=query) + answers
                ]

            return prompt

        return sample_at

    return start


def _reference_drawer(rng: random.Random, value_type: str) -> tuple[Callable[[], object], Callable[[object], str]]:
    """RULER's generate_random for `value_type` from its global `random`: the draw, and the text
    of what it drew (made only when a prompt is built)."""
    if value_type == "numbers":
        return (lambda: rng.randint(10**6, 10**7 - 1)), str
    if value_type == "words":
        pairs = adjective_noun_pairs()
        # random.choice(pairs) is pairs[randrange(len(pairs))], the same draw.
        return (lambda: rng.randrange(len(pairs))), pairs.__getitem__
    return (lambda: rng.getrandbits(128)), (lambda bits: str(uuid.UUID(int=bits, version=4)))


def prompt_parts(type_needle_v: str, singular: bool) -> tuple[str, str, str]:
    """(head, tail, answer prefix) with {query} left to fill.

    With one expected answer RULER turns the template singular by plain replacements: "Some" ->
    "A", "are all" -> "is", "are" -> "is", "answers" -> "answer", and the value type loses its "s".
    """
    template_head, _, template_tail = TEMPLATE.partition("{context}")
    parts = [template_head, template_tail, ANSWER_PREFIX]
    if singular:
        for plural, single in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            parts = [part.replace(plural, single) for part in parts]
        type_needle_v = type_needle_v[:-1]
    return tuple(part.replace("{type_needle_v}", type_needle_v) for part in parts)
