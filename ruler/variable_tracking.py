"""RULER's variable tracking generator (scripts/data/synthetic/variable_tracking.py), offline.

Chains of assignments ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ...) hidden in repeated
noise; the model names every variable that ends up holding the value. A one-shot example of the
same task, fitted to `example_length` tokens (RULER: 500) with 3-letter names, comes first.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from .fitting import EXAMPLE_LENGTH_STEP, Draft, Example, TooShortError
from .haystacks import NOISE, RepeatedText
from .reference_random import NumpyLegacyRandom
from .registry import Sampler, register_generator
from .sizing import ReferenceCounter, ReferenceSize, SizingTarget, reference_search, stepped_size

TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
# "assgined" is RULER's own spelling (constants.py); kept so that prompts match RULER's.
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assgined the value {query}, they are: "
)
EXAMPLE_SEPARATOR = "\n\n" + "\n\n"  # RULER ends the example with a blank line, then adds one more
# RULER's search steps, in noise paragraphs: for the example, then for the task.
EXAMPLE_STEP, STEP = 5, 10
# RULER draws its example again until one fits; a search whose step cannot fit is a bug, not luck.
EXAMPLE_DRAWS = 1000


@register_generator("variable_tracking", version=2)
def variable_tracking(
    set_rng: random.Random,
    target: SizingTarget,
    *,
    num_chains: int = 1,
    num_hops: int = 4,
    example_length: int = 500,
    name_length: int = 5,
) -> Sampler:
    """RULER names variables with 5 letters (3 in the example); training samples with names of
    another `name_length` share no variable with the evaluation sets."""
    for name, count in (("num_chains", num_chains), ("num_hops", num_hops), ("example_length", example_length), ("name_length", name_length)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}={count!r} must be a positive integer")
    if len(string.ascii_uppercase) ** name_length < 2 * num_chains * (num_hops + 1):
        raise ValueError(f"name_length={name_length} leaves too few names for {num_chains} chains of {num_hops} hops")

    def draw(rng: random.Random, index: int) -> Draft:
        example = _chains_draft(rng, num_chains, min(10, num_hops), name_length=3)
        draft = _chains_draft(rng, num_chains, num_hops, name_length=name_length)
        draft.example = Example(example, example_length, EXAMPLE_SEPARATOR)
        return draft

    def reference_size() -> ReferenceSize:
        def search(counter: ReferenceCounter) -> ReferenceSize:
            sample_at = _reference_search_sample(target.seed, num_chains, num_hops)
            # RULER's example: a search at example_length tokens in steps of 5 paragraphs, then
            # drawn until one fits. Where 5 paragraphs cannot fit (few characters per token),
            # RULER's breaks; here the example's length grows as under "fill".
            length = example_length
            while True:
                example_target = SizingTarget(length, target.tokens_to_generate, counter.counter, target.seed)
                example_units = stepped_size(
                    lambda size, threshold: counter.tokens(size, threshold, _with_answer(*sample_at(size, True))), example_target, EXAMPLE_STEP
                )
                if example_units >= EXAMPLE_STEP:
                    break
                length = (length // EXAMPLE_LENGTH_STEP + 1) * EXAMPLE_LENGTH_STEP
                if length >= target.max_seq_length:
                    raise TooShortError(f"the task's solved example does not fit in max_seq_length={target.max_seq_length}")
            allowed = length - target.tokens_to_generate
            for _ in range(EXAMPLE_DRAWS):
                head, pieces, names = sample_at(example_units, True)
                if counter.tokens(example_units, allowed, lambda: (head, pieces)) <= allowed:
                    break
            else:
                raise ValueError(f"RULER's example search chose {example_units} noise paragraphs, which never fit in {length} tokens")
            example_tokens = counter.exact_tokens(head + "".join(pieces) + " " + " ".join(names) + "\n\n")
            units = stepped_size(
                lambda size, threshold: counter.tokens(size, threshold, _with_answer(*sample_at(size, False))),
                target,
                STEP,
                extra_tokens=example_tokens,
            )
            return ReferenceSize(units, STEP, target.max_seq_length - target.tokens_to_generate, target.max_seq_length, example_units)

        return reference_search(search, target.counter)

    # RULER names its variables with 5 letters; other names make training samples, which fill.
    return Sampler(draw, reference_size if name_length == 5 else None)


def _chains_draft(rng: random.Random, num_chains: int, num_hops: int, name_length: int) -> Draft:
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choices(string.ascii_uppercase, k=name_length))
        if name not in names:
            names.append(name)
    chains, values = [], []
    for chain_names in (names[i : i + num_hops + 1] for i in range(0, len(names), num_hops + 1)):
        values.append(rng.randint(10000, 99998))
        chains.append(
            [f"VAR {chain_names[0]} = {values[-1]}"]
            + [f"VAR {later} = VAR {earlier} " for earlier, later in zip(chain_names, chain_names[1:])]
        )
    template_head, _, template_tail = TEMPLATE.partition("{context}")
    query = values[0]
    position_seed = rng.getrandbits(64)

    def place(num_units: int) -> list[int]:
        # Each chain's statements go, in order, before distinct random noise units.
        positions = random.Random(position_seed)
        return [p for chain in chains for p in sorted(positions.sample(range(num_units), len(chain)))]

    return Draft(
        head=template_head,
        tail=template_tail.format(query=query),
        answer_prefix=ANSWER_PREFIX.format(num_v=num_hops + 1, query=query),
        outputs=names[: num_hops + 1],
        haystack=RepeatedText(NOISE + "\n", " "),
        inserts=[statement for chain in chains for statement in chain],
        place=place,
        min_units=num_hops + 1,
        answers_in=set(chains[0]).__contains__,  # the queried chain's statements
    )


def _reference_search_sample(seed: int, num_chains: int, num_hops: int) -> Callable[[int, bool], tuple[str, list[str], list[str]]]:
    """RULER's generate_input_output, with its two random streams started afresh: a function of
    (noise paragraphs, is the example) giving the prompt as (head, pieces) and the answer."""
    rng, values = random.Random(seed), NumpyLegacyRandom(seed)
    template_head, _, template_tail = TEMPLATE.partition("{context}")

    def sample_at(num_noises: int, is_example: bool) -> tuple[str, list[str], list[str]]:
        name_length, hops = (3, min(10, num_hops)) if is_example else (5, num_hops)
        names = ["".join(rng.choices(string.ascii_uppercase, k=name_length)) for _ in range((hops + 1) * num_chains)]
        while len(set(names)) < num_chains * (hops + 1):
            names.append("".join(rng.choices(string.ascii_uppercase, k=name_length)))
        chains = []
        for start in range(0, len(names), hops + 1):
            chain_names = names[start : start + hops + 1]
            if len(chain_names) < hops + 1:
                raise ValueError(f"RULER's variable tracking drew a repeated name at seed {seed} and fails there; use another seed")
            chains.append([f"VAR {chain_names[0]} = {values.randint(10000, 99999)}"] + [
                f"VAR {later} = VAR {earlier} " for earlier, later in zip(chain_names, chain_names[1:])
            ])
        sentences = [NOISE + "\n"] * num_noises
        short = len(sentences) <= len(chains[0])
        if short:
            # Too few paragraphs for the chain: RULER cuts them into sentences, shortening the
            # chain if even those are too few.
            sentences = [part + "." if part.strip() else part for _ in range(num_noises) for part in (NOISE + "\n").split(".")]
            if len(sentences) <= len(chains[0]):
                chains = [chain[: len(sentences) - 1] for chain in chains]
        for chain in chains:
            for offset, position in enumerate(sorted(rng.sample(range(len(sentences)), len(chain)))):
                sentences.insert(position + offset, chain[offset])
        pieces = sentences[:1] + [" " + sentence for sentence in sentences[1:]]
        if short:
            pieces = ["".join(pieces).replace(". \n", ".\n")]
        query = chains[0][0].split("=")[-1].strip()
        answer_prefix = ANSWER_PREFIX.format(num_v=num_hops + 1, query=query)
        return template_head, pieces + [template_tail.format(query=query), answer_prefix], names[: hops + 1]

    return sample_at


def _with_answer(head: str, pieces: list[str], names: list[str]) -> Callable[[], tuple[str, list[str]]]:
    """The prompt with its answer appended as RULER's search appends it (the list's repr)."""
    return lambda: (head, pieces + [f" {names}"])
