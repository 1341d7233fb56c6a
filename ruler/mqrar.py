"""Multi-query repeated associative recall (MQRAR; Tan et al., "Scaling Stick-Breaking Attention",
ICLR 2025, section 5.1), as token ids for training small models and as text for lm-eval.

A sequence starts with `num_pairs` assignments "key value" of distinct keys, then a stream of
queries "key new_value" over those keys to its end. At each queried key the answer is the key's
current value, the one of its most recent assignment, and the query then reassigns the key:

    inputs   B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4
    targets  - - - - - - - - - - 3 - 6 - 2 - 1 -

(the second E must answer 2, not the 3 of its first assignment). A key's first occurrence is its
assignment and every later one is a query, so no separator marks where the queries start. The
target of a query sits at the key's own position, as next-token prediction reads it: the model
predicts the answer right after reading the key, although the token that follows in the input is
the new value. A new value always differs from the current one, so recalling an outdated value is
always wrong.

Token form: `sequences(...)` returns inputs and targets (IGNORE where there is no target) with key
and value ids from disjoint ranges of one vocabulary (`Vocabulary`). Text form: the same ids as
space-separated symbols (`Vocabulary.text`), so that a word-level tokenizer over
`Vocabulary.symbols` encodes it back to exactly these ids; `instances(...)` cuts sequences right
after query keys, with the current value's symbol as the answer. Greedy accuracy on those
instances is the token form's accuracy at the sampled query positions.

Standard library only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

IGNORE = -100  # target at positions without one (PyTorch's cross-entropy ignore_index)

# The paper sweeps 32 to 192 key-value pairs, so at least 192 distinct keys must exist; 256 (the
# next power of two) leaves every pair count drawing its keys from a larger pool, as in MQAR
# (Arora et al., 2023), so that no key is present in every sequence. 256 values keep a blind guess
# at 1/255 (the previous value is never the answer).
DEFAULT_NUM_KEYS = 256
DEFAULT_NUM_VALUES = 256

# The paper's setting: sequences of 768 tokens with 32 to 192 initial pairs.
PAPER_SEQ_LENGTH = 768
PAPER_NUM_PAIRS = (32, 64, 96, 128, 160, 192)

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
        if self.num_values < 2:
            raise ValueError(f"num_values={self.num_values} must be at least 2: a query's new value differs from the current one")

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
) -> list[Sequence]:
    """`num_sequences` sequences of `seq_length` tokens, each with `num_pairs` initial assignments
    (2 * num_pairs tokens) followed by queries up to seq_length (an odd remainder ends with a query
    key whose reassignment falls outside the sequence).

    Deterministic in (seq_length, num_pairs, vocabulary, seed); sequence i is the same whatever
    num_sequences is, so a larger set extends a smaller one.
    """
    return [_sequence(random.Random(sequence_seed), seq_length, num_pairs, vocabulary) for sequence_seed in _sequence_seeds(num_sequences, seq_length, num_pairs, vocabulary, seed)]


def targets(inputs: list[int], vocabulary: Vocabulary | None = None) -> list[int]:
    """The task's definition: for token ids alternating key, value, key, value, ... the target at
    each position. At a key that has been assigned before, its current value (the value after its
    most recent occurrence); everywhere else (values, a key's first occurrence) IGNORE."""
    vocabulary = vocabulary or Vocabulary()
    current: dict[int, int] = {}
    result = []
    for position, token_id in enumerate(inputs):
        expected = "key" if position % 2 == 0 else "value"
        kind = "key" if 0 <= token_id < vocabulary.num_keys else "value" if token_id < vocabulary.size else None
        if kind != expected:
            raise ValueError(f"inputs[{position}]={token_id} must be a {expected} id ({vocabulary})")
        if kind == "key":
            result.append(current.get(token_id, IGNORE))
        else:
            current[inputs[position - 1]] = token_id
            result.append(IGNORE)
    return result


def instances(
    num_sequences: int,
    seq_length: int = PAPER_SEQ_LENGTH,
    num_pairs: int = 64,
    vocabulary: Vocabulary | None = None,
    seed: int = 0,
    queries_per_sequence: int = 4,
) -> list[dict]:
    """The text form of `sequences(num_sequences, seq_length, num_pairs, vocabulary, seed)`: from
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
    seeds = _sequence_seeds(num_sequences, seq_length, num_pairs, vocabulary, seed)
    for index, sequence_seed in enumerate(seeds):
        rng = random.Random(sequence_seed)
        sequence = _sequence(rng, seq_length, num_pairs, vocabulary)
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


def _sequence_seeds(num_sequences: int, seq_length: int, num_pairs: int, vocabulary: Vocabulary | None, seed: int) -> list[int]:
    _check_positive("num_sequences", num_sequences)
    _check_positive("num_pairs", num_pairs)
    _check_positive("seq_length", seq_length)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} must be an integer")
    vocabulary = vocabulary or Vocabulary()
    if num_pairs > vocabulary.num_keys:
        raise ValueError(f"num_pairs={num_pairs} needs as many distinct keys, but num_keys={vocabulary.num_keys}")
    if seq_length <= 2 * num_pairs:
        raise ValueError(f"seq_length={seq_length} leaves no room for a query after {num_pairs} pairs ({2 * num_pairs} tokens)")
    # One generator per set, then one per sequence, seeded by everything that defines the set.
    identity = json.dumps(["mqrar", seq_length, num_pairs, vocabulary.num_keys, vocabulary.num_values, seed])
    set_rng = random.Random(identity)
    return [set_rng.getrandbits(64) for _ in range(num_sequences)]


def _sequence(rng: random.Random, seq_length: int, num_pairs: int, vocabulary: Vocabulary | None) -> Sequence:
    vocabulary = vocabulary or Vocabulary()
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
    inputs = inputs[:seq_length]
    return Sequence(inputs, targets(inputs, vocabulary), num_pairs)


def _check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
