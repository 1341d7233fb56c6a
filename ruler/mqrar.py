"""Multi-query repeated associative recall (MQRAR; Tan et al., "Scaling Stick-Breaking Attention",
ICLR 2025, section 5.1) and its control without reassignments (MQAR; Arora et al., "Zoology",
2023), as token ids for training small models and as text for lm-eval.

A sequence starts with `num_pairs` assignments "key value". After them come queries: a key whose
answer is its current value, the value of its most recent assignment. In MQRAR the token after a
query key is a new value that reassigns the key, so a key asked twice has two answers:

    inputs   B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4
    targets  - - - - - - - - - - 3 - 6 - 2 - 1 -

(the second E must answer 2, not the 3 of its first assignment). The rule that scores every
layout (`targets`): a key followed by a value assigns it; a key assigned before is a query whose
target is its current value; a value that follows no key is filler. The target of a query sits at
the key's own position, as next-token prediction reads it: the model predicts the answer right
after reading the key, although the token that follows in the input is the new value.

Two layouts of the queries (`layout`):

- "power-law" (the default; the paper's): as the first author's MQRAR generator, a modification
  of Zoology's MQAR generator, lays them out. After the assignments, slots of two tokens to the
  end of the sequence; `num_pairs` of the slots, drawn without replacement with probability
  proportional to i^(a - 1) for the i-th slot (a = 0.01, Zoology's power law: queries crowd near
  the assignments and thin out behind them), hold a query key; every other token is a random
  value (filler, or the reassignment right after a query key). MQRAR draws the keys of the
  assignments and of the queries with replacement (a key can be asked several times, or even be
  assigned twice among the assignments); the MQAR control draws distinct keys and distinct
  values, and asks each key once, so its answer is always the first value. 4 * num_pairs must fit
  in the sequence (Zoology's bound; 192 pairs at the paper's 768 tokens).
- "dense" (MQRAR only; this harness's first form of the task): distinct keys, then queries with
  a new value each in every slot to the end of the sequence, each new value different from the
  current one. At 32 pairs in 768 tokens every key is asked about 11 times, so most answers are
  reassigned values: a harder test of recency than the paper's, and hardest with few pairs.

What fills the tokens between the queries (`filler`):

- "values" (the default; the paper's generator): random values, as above.
- "constant" (MQAR only; Zoology's paper, whose MQAR fills them with token 0): every such token,
  and the token after each query key, is one fixed value (value 0), which is never an answer.

Token form: `sequences(...)` returns inputs and targets (IGNORE where there is no target) with key
and value ids from disjoint ranges of one vocabulary (`Vocabulary`; by default 4096 keys and 4096
values, Zoology's and the paper's vocabulary of 8192). Text form: the same ids as space-separated
symbols (`Vocabulary.text`), so that a word-level tokenizer over `Vocabulary.symbols` encodes it
back to exactly these ids; `instances(...)` cuts sequences right after query keys, with the
current value's symbol as the answer. Greedy accuracy on those instances is the token form's
accuracy at the sampled query positions.

Standard library only.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

IGNORE = -100  # target at positions without one (PyTorch's cross-entropy ignore_index)

# Zoology's MQAR and the paper's MQRAR draw keys from half of a vocabulary of 8192 ids and
# values from the other half (the first author's generator leaves id 0 unused: 4095 keys there).
DEFAULT_NUM_KEYS = 4096
DEFAULT_NUM_VALUES = 4096

# The paper's setting: sequences of 768 tokens with 32 to 192 initial pairs.
PAPER_SEQ_LENGTH = 768
PAPER_NUM_PAIRS = (32, 64, 96, 128, 160, 192)

TASKS = ("mqrar", "mqar")
FILLERS = ("values", "constant")
CONSTANT_FILLER_VALUE = 0  # the value a "constant" filler repeats; the answers are drawn from the others
LAYOUTS = ("power-law", "dense")
# Zoology's power law of the query slots: the i-th slot after the assignments (from 1) is drawn
# with probability proportional to i^(POWER_LAW_A - 1).
POWER_LAW_A = 0.01

KEY_PREFIX = "k"
VALUE_PREFIX = "v"


@dataclass(frozen=True)
class Vocabulary:
    """Ids 0 .. num_keys-1 are keys (symbols "k0", "k1", ...), then num_values values ("v0",
    "v1", ...). `size` ids in all; a trainer adds any special tokens after them."""

    num_keys: int = DEFAULT_NUM_KEYS
    num_values: int = DEFAULT_NUM_VALUES

    def __post_init__(self) -> None:
        _check_positive("num_keys", self.num_keys)
        _check_positive("num_values", self.num_values)

    @property
    def size(self) -> int:
        return self.num_keys + self.num_values

    def key_id(self, key: int) -> int:
        return key

    def value_id(self, value: int) -> int:
        return self.num_keys + value

    @property
    def symbols(self) -> list[str]:
        """The symbol of every id, in id order: `symbols[i]` is the word for id i."""
        return [f"{KEY_PREFIX}{k}" for k in range(self.num_keys)] + [f"{VALUE_PREFIX}{v}" for v in range(self.num_values)]

    def symbol(self, token_id: int) -> str:
        if not 0 <= token_id < self.size:
            raise ValueError(f"token id {token_id} is outside this vocabulary's 0..{self.size - 1}")
        if token_id < self.num_keys:
            return f"{KEY_PREFIX}{token_id}"
        return f"{VALUE_PREFIX}{token_id - self.num_keys}"

    def text(self, ids: list[int]) -> str:
        """The ids as space-separated symbols."""
        return " ".join(self.symbol(token_id) for token_id in ids)

    def ids(self, text: str) -> list[int]:
        """The inverse of `text`: whitespace-separated symbols back to ids."""
        index = {symbol: token_id for token_id, symbol in enumerate(self.symbols)}
        try:
            return [index[symbol] for symbol in text.split()]
        except KeyError as error:
            raise ValueError(f"{error.args[0]!r} is not a symbol of this vocabulary ({self})") from None


@dataclass(frozen=True)
class Sequence:
    """One MQRAR sequence. `inputs` and `targets` have the same length; targets[t] is the value id
    the model must predict at position t (the current value of the key inputs[t], when t is a
    query), else IGNORE."""

    inputs: list[int]
    targets: list[int]
    num_pairs: int

    @property
    def query_positions(self) -> list[int]:
        return [t for t, target in enumerate(self.targets) if target != IGNORE]


def sequences(
    num_sequences: int,
    seq_length: int = PAPER_SEQ_LENGTH,
    num_pairs: int = 64,
    vocabulary: Vocabulary | None = None,
    seed: int = 0,
    task: str = "mqrar",
    layout: str = "power-law",
    first: int = 0,
    filler: str = "values",
) -> list[Sequence]:
    """Sequences first .. first + num_sequences - 1 of a set, each of `seq_length` tokens with
    `num_pairs` initial assignments (2 * num_pairs tokens) followed by queries laid out as `layout`
    says (see the module's docstring); `task` "mqrar" reassigns and asks keys again, "mqar" asks
    each key once; `filler` says what lies between the queries.

    Deterministic in (seq_length, num_pairs, vocabulary, seed, task, layout, filler); sequence i
    is the same whatever num_sequences and first are, so a larger set extends a smaller one and a
    set can be made in parts.
    """
    if not isinstance(first, int) or isinstance(first, bool) or first < 0:
        raise ValueError(f"first={first!r} must be a non-negative integer")
    seeds = _sequence_seeds(first + num_sequences, seq_length, num_pairs, vocabulary, seed, task, layout, filler)[first:]
    return [_sequence(random.Random(sequence_seed), seq_length, num_pairs, vocabulary or Vocabulary(), task, layout, filler)
            for sequence_seed in seeds]


def targets(inputs: list[int], vocabulary: Vocabulary | None = None) -> list[int]:
    """The task's definition, for any layout: the target at each position of the token ids
    `inputs`. A key followed by a value assigns it that value; at a key assigned before, the
    target is its current value (the value after its most recent occurrence); everywhere else
    (values, a key's first occurrence) IGNORE. A key must be followed by a value (or end the
    sequence); a value that follows no key is filler."""
    return [target for target, _ in _answers(inputs, vocabulary or Vocabulary())]


def answer_distances(inputs: list[int], vocabulary: Vocabulary | None = None) -> list[int]:
    """At each query of `inputs` (where `targets` has a target), how many tokens back the answer
    was assigned: the query's position minus that of the key of the assignment that set the key's
    current value; IGNORE elsewhere. What a model must look back over to answer."""
    return [IGNORE if target == IGNORE else position - assigned_at
            for position, (target, assigned_at) in enumerate(_answers(inputs, vocabulary or Vocabulary()))]


def _answers(inputs: list[int], vocabulary: Vocabulary) -> list[tuple[int, int]]:
    """(target, position of the key of the assignment that set it) at each position of `inputs`;
    (IGNORE, IGNORE) where there is no target. The rule `targets` states."""
    current: dict[int, tuple[int, int]] = {}  # key -> (value, position of the key that assigned it)
    result = []
    for position, token_id in enumerate(inputs):
        if not 0 <= token_id < vocabulary.size:
            raise ValueError(f"inputs[{position}]={token_id} is outside this vocabulary's ids 0..{vocabulary.size - 1} ({vocabulary})")
        if token_id < vocabulary.num_keys:
            if position + 1 < len(inputs) and 0 <= inputs[position + 1] < vocabulary.num_keys:
                raise ValueError(f"inputs[{position + 1}]={inputs[position + 1]} must be a value id: it follows the key inputs[{position}] ({vocabulary})")
            result.append(current.get(token_id, (IGNORE, IGNORE)))
        else:
            if position > 0 and inputs[position - 1] < vocabulary.num_keys:
                current[inputs[position - 1]] = (token_id, position - 1)
            result.append((IGNORE, IGNORE))
    return result


def check_settings(seq_length: int, num_pairs: int, vocabulary: Vocabulary | None = None, task: str = "mqrar", layout: str = "power-law",
                   filler: str = "values") -> None:
    """Raises ValueError, naming the setting, where these settings make no sequence."""
    _check_positive("num_pairs", num_pairs)
    _check_positive("seq_length", seq_length)
    vocabulary = vocabulary or Vocabulary()
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if filler not in FILLERS:
        raise ValueError(f"filler={filler!r} must be one of {FILLERS}")
    if filler == "constant" and (task, layout) != ("mqar", "power-law"):
        raise ValueError(f"filler='constant' is MQAR's (task='mqar', layout='power-law'); task={task!r} and layout={layout!r} "
                         f"reassign a key with the value after each query, which a constant filler would make always the same")
    if layout == "dense":
        if task != "mqrar":
            raise ValueError(f"task={task!r} asks each key once; layout='dense' asks keys to the end of the sequence: use layout='power-law'")
        if num_pairs > vocabulary.num_keys:
            raise ValueError(f"num_pairs={num_pairs} needs as many distinct keys, but num_keys={vocabulary.num_keys}")
        if vocabulary.num_values < 2:
            raise ValueError(f"num_values={vocabulary.num_values} must be at least 2 in layout='dense': a query's new value differs from the current one")
        if seq_length <= 2 * num_pairs:
            raise ValueError(
                f"seq_length={seq_length} leaves no room for a query after {num_pairs} pairs ({2 * num_pairs} tokens); "
                f"layout='dense' takes at most {(seq_length - 1) // 2} pairs at this length"
            )
        return
    answer_values = vocabulary.num_values - (filler == "constant")  # a constant filler takes one value
    if task == "mqar" and num_pairs > min(vocabulary.num_keys, answer_values):
        raise ValueError(
            f"num_pairs={num_pairs} needs as many distinct keys and values, but num_keys={vocabulary.num_keys} "
            f"and num_values={vocabulary.num_values}" + (" (one of them the filler)" if filler == "constant" else "")
        )
    if 4 * num_pairs > seq_length:
        raise ValueError(
            f"seq_length={seq_length} cannot hold {num_pairs} pairs and as many query slots ({4 * num_pairs} tokens); "
            f"layout='power-law' takes at most {seq_length // 4} pairs at this length"
        )


def instances(
    num_sequences: int,
    seq_length: int = PAPER_SEQ_LENGTH,
    num_pairs: int = 64,
    vocabulary: Vocabulary | None = None,
    seed: int = 0,
    queries_per_sequence: int = 4,
    task: str = "mqrar",
    layout: str = "power-law",
    filler: str = "values",
) -> list[dict]:
    """The text form of `sequences(num_sequences, seq_length, num_pairs, vocabulary, seed, task,
    layout, filler=filler)`: from
    each sequence, `queries_per_sequence` of its query positions drawn uniformly without
    replacement (all of them where it has fewer), each an instance

        {"context": symbols of inputs[: position + 1], "answer": symbol of targets[position],
         "num_pairs", "seq_length", "sequence": index of the sequence, "position"}

    in sequence order, then position order. Every sequence has the same number of queries, so the
    mean accuracy over instances estimates the token form's accuracy over all query positions
    without bias, and equals it when every query is drawn.
    """
    _check_positive("queries_per_sequence", queries_per_sequence)
    vocabulary = vocabulary or Vocabulary()
    result = []
    seeds = _sequence_seeds(num_sequences, seq_length, num_pairs, vocabulary, seed, task, layout, filler)
    for index, sequence_seed in enumerate(seeds):
        rng = random.Random(sequence_seed)
        sequence = _sequence(rng, seq_length, num_pairs, vocabulary, task, layout, filler)
        queries = sequence.query_positions
        # drawn after the sequence from the same generator: the sequence does not depend on how
        # many queries are asked
        chosen = sorted(rng.sample(queries, min(queries_per_sequence, len(queries))))
        symbols = [vocabulary.symbol(token_id) for token_id in sequence.inputs[: chosen[-1] + 1]]
        for position in chosen:
            result.append(
                {
                    "context": " ".join(symbols[: position + 1]),
                    "answer": vocabulary.symbol(sequence.targets[position]),
                    "num_pairs": num_pairs,
                    "seq_length": seq_length,
                    "sequence": index,
                    "position": position,
                }
            )
    return result


def _sequence_seeds(
    num_sequences: int, seq_length: int, num_pairs: int, vocabulary: Vocabulary | None, seed: int, task: str, layout: str, filler: str
) -> list[int]:
    _check_positive("num_sequences", num_sequences)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer")
    vocabulary = vocabulary or Vocabulary()
    check_settings(seq_length, num_pairs, vocabulary, task, layout, filler)
    # One generator per set, then one per sequence, seeded by everything that defines the set but
    # the filler (the dense layout's identity is the one it had as the only layout, and the
    # filler's came later, so that the sets made before stay as they were).
    kind = ["mqrar"] if layout == "dense" else [task, layout]
    identity = json.dumps([*kind, seq_length, num_pairs, vocabulary.num_keys, vocabulary.num_values, seed])
    set_rng = random.Random(identity)
    return [set_rng.getrandbits(64) for _ in range(num_sequences)]


def _sequence(rng: random.Random, seq_length: int, num_pairs: int, vocabulary: Vocabulary, task: str, layout: str, filler: str) -> Sequence:
    if layout == "dense":
        inputs = _dense(rng, seq_length, num_pairs, vocabulary, task)
    else:
        inputs = _power_law(rng, seq_length, num_pairs, vocabulary, task, filler)
    return Sequence(inputs, targets(inputs, vocabulary), num_pairs)


def _power_law(rng: random.Random, seq_length: int, num_pairs: int, vocabulary: Vocabulary, task: str, filler: str) -> list[int]:
    if task == "mqar":  # Zoology: distinct keys and values, each key asked once, in the order assigned
        keys = rng.sample(range(vocabulary.num_keys), num_pairs)
        values = rng.sample(range(CONSTANT_FILLER_VALUE + 1, vocabulary.num_values) if filler == "constant" else range(vocabulary.num_values),
                            num_pairs)
        asked = keys
    else:  # the paper's generator draws every key and value with replacement
        keys = [rng.randrange(vocabulary.num_keys) for _ in range(num_pairs)]
        values = [rng.randrange(vocabulary.num_values) for _ in range(num_pairs)]
        asked = [rng.choice(keys) for _ in range(num_pairs)]
    inputs: list[int] = []
    for key, value in zip(keys, values):
        inputs += [vocabulary.key_id(key), vocabulary.value_id(value)]
    if filler == "constant":
        rest = [vocabulary.value_id(CONSTANT_FILLER_VALUE)] * (seq_length - len(inputs))
    else:
        rest = [vocabulary.value_id(rng.randrange(vocabulary.num_values)) for _ in range(seq_length - len(inputs))]
    for slot, key in zip(_power_law_slots(rng, (seq_length - len(inputs)) // 2, num_pairs), asked):
        rest[2 * slot] = vocabulary.key_id(key)
    return inputs + rest


def _power_law_slots(rng: random.Random, slots: int, count: int) -> list[int]:
    """`count` of the slots 0..slots-1 without replacement, slot s weighing (s + 1)^(a - 1), in the
    order successive draws would give them. Efraimidis and Spirakis' keys u^(1 / weight) (here
    their logarithms): the largest `count` keys, largest first, are distributed as successive
    weighted draws without replacement, as numpy's choice(replace=False, p=...) makes them."""
    keys = [math.log(1.0 - rng.random()) / (slot + 1) ** (POWER_LAW_A - 1) for slot in range(slots)]
    return sorted(range(slots), key=keys.__getitem__, reverse=True)[:count]


def _dense(rng: random.Random, seq_length: int, num_pairs: int, vocabulary: Vocabulary, task: str) -> list[int]:
    keys = rng.sample(range(vocabulary.num_keys), num_pairs)
    current = {key: rng.randrange(vocabulary.num_values) for key in keys}
    inputs: list[int] = []
    for key in keys:
        inputs += [vocabulary.key_id(key), vocabulary.value_id(current[key])]
    while len(inputs) < seq_length:
        key = keys[rng.randrange(num_pairs)]
        # a new value uniform over the others: shift draws at or above the current value by one
        new_value = rng.randrange(vocabulary.num_values - 1)
        current[key] = new_value + (new_value >= current[key])
        inputs += [vocabulary.key_id(key), vocabulary.value_id(current[key])]
    return inputs[:seq_length]


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
