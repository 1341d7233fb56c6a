"""RULER's variable tracking generator (scripts/data/synthetic/variable_tracking.py), offline.

Chains of assignments ("VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ...) hidden in repeated
noise; the model names every variable that ends up holding the value. A one-shot example of the
same task, fitted to `example_length` tokens (RULER: 500) with 3-letter names, comes first.
"""

from __future__ import annotations

import random
import string

from .fitting import Draft, Example
from .haystacks import NOISE, RepeatedText
from .registry import DrawSample, register_generator

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


@register_generator("variable_tracking")
def variable_tracking(
    set_rng: random.Random, *, num_chains: int = 1, num_hops: int = 4, example_length: int = 500, name_length: int = 5
) -> DrawSample:
    """RULER names variables with 5 letters (3 in the example); training samples with names of
    another `name_length` share no variable with the evaluation sets."""
    for name, count in (("num_chains", num_chains), ("num_hops", num_hops), ("example_length", example_length), ("name_length", name_length)):
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{name}={count!r} must be a positive integer")
    if len(string.ascii_uppercase) ** name_length < 2 * num_chains * (num_hops + 1):
        raise ValueError(f"name_length={name_length} leaves too few names for {num_chains} chains of {num_hops} hops")

    def draw(rng: random.Random) -> Draft:
        example = _chains_draft(rng, num_chains, min(10, num_hops), name_length=3)
        draft = _chains_draft(rng, num_chains, num_hops, name_length=name_length)
        draft.example = Example(example, example_length, EXAMPLE_SEPARATOR)
        return draft

    return draw


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
    )
