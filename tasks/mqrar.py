"""The functions tasks/mqrar.yaml names: MQRAR instances from --metadata, and accuracy per pair count.

`custom_dataset` reads from the metadata (`--metadata` merged over `--model_args`):
num_pairs (a list of pair counts, or one; default the paper's 32..192), seq_length in symbols
(default 768, the paper's), or max_seq_lengths as a list of one length (what a length sweep
passes; it must agree with seq_length when both are given), num_samples sequences per pair count
(default 100), queries_per_sequence (default 4), seed (default 42), task ("mqrar", the default,
or "mqar", the control without reassignments), layout ("power-law", the paper's and the default,
or "dense"), filler ("values", the default, or "constant", Zoology's, for "mqar" only), num_keys and num_values (default 4096 each, the paper's vocabulary). Instances are
cut right after a query key; the answer is the key's current value (sb_eval.ruler.mqrar). No
tokenizer is involved: lengths count symbols, which are tokens for a model trained on the token
form with a word-level tokenizer over its symbols.
"""

from __future__ import annotations

from typing import Any

import datasets
from tqdm import tqdm

from sb_eval.ruler import mqrar

from .ruler_tasks import TOKENIZER_KEYS, check_metadata, positive_int

# mqrar's --metadata settings.
SETTINGS = ("num_pairs", "seq_length", "max_seq_lengths", "num_samples", "queries_per_sequence", "seed", "num_keys",
            "num_values", "task", "layout", "filler", *TOKENIZER_KEYS)

DEFAULT_NUM_SAMPLES = 100
DEFAULT_QUERIES_PER_SEQUENCE = 4
DEFAULT_SEED = 42


def custom_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The test split: every pair count's instances, interleaved (instance 0 of each count, then
    instance 1, ...) so that `--limit N` takes about N / len(num_pairs) instances of each. Counts
    can have fewer instances than others (many pairs leave a short sequence fewer queries than
    queries_per_sequence): a count that runs out drops out of the rotation."""
    check_metadata(kwargs, SETTINGS, "mqrar")
    pair_counts = _int_list(kwargs.get("num_pairs", list(mqrar.PAPER_NUM_PAIRS)), "num_pairs")
    seq_length = _seq_length(kwargs)
    num_samples = positive_int(kwargs.get("num_samples", DEFAULT_NUM_SAMPLES), "metadata num_samples")
    queries = positive_int(kwargs.get("queries_per_sequence", DEFAULT_QUERIES_PER_SEQUENCE), "metadata queries_per_sequence")
    seed = kwargs.get("seed", DEFAULT_SEED)
    task = _choice(kwargs.get("task", "mqrar"), mqrar.TASKS, "task")
    layout = _choice(kwargs.get("layout", "power-law"), mqrar.LAYOUTS, "layout")
    filler = _choice(kwargs.get("filler", "values"), mqrar.FILLERS, "filler")
    vocabulary = mqrar.Vocabulary(
        positive_int(kwargs.get("num_keys", mqrar.DEFAULT_NUM_KEYS), "metadata num_keys"),
        positive_int(kwargs.get("num_values", mqrar.DEFAULT_NUM_VALUES), "metadata num_values"),
    )
    for num_pairs in pair_counts:  # every count checked before any count's sequences are made
        try:
            mqrar.check_settings(seq_length, num_pairs, vocabulary, task, layout, filler)
        except ValueError as error:
            raise ValueError(f"metadata num_pairs={pair_counts!r}, seq_length={seq_length}: {error}") from None
    per_count = [
        mqrar.instances(num_samples, seq_length, num_pairs, vocabulary, seed, queries, task, layout, filler)
        for num_pairs in tqdm(pair_counts, desc=f"{task} sequences of {seq_length} symbols", leave=False)
    ]
    longest = max(len(instances) for instances in per_count)
    interleaved = [instances[i] for i in range(longest) for instances in per_count if i < len(instances)]
    return {"test": datasets.Dataset.from_list(interleaved)}


def doc_to_target(doc: dict) -> str:
    """The answer symbol after the space that separates symbols."""
    return " " + doc["answer"]


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    """Greedy accuracy (1 when the answer is the model's most likely continuation, token by
    token), under "acc" (all pair counts) and "acc_{num_pairs}"."""
    (_, is_greedy) = results[0]
    correct = float(is_greedy)
    return {"acc": correct, f"acc_{doc['num_pairs']}": correct}


def _seq_length(kwargs: dict) -> int:
    seq_length = kwargs.get("seq_length")
    if "max_seq_lengths" in kwargs:
        lengths = kwargs["max_seq_lengths"]
        lengths = [lengths] if isinstance(lengths, int) else lengths
        if not isinstance(lengths, list) or len(lengths) != 1:
            raise ValueError(
                f"metadata max_seq_lengths={kwargs['max_seq_lengths']!r}: mqrar takes one sequence length "
                "per run (its metrics are named by pair count); run it once per length, e.g. with sb-eval sweep"
            )
        length = positive_int(lengths[0], "metadata max_seq_lengths")
        if seq_length is not None and seq_length != length:
            raise ValueError(f"metadata seq_length={seq_length!r} and max_seq_lengths={lengths!r} disagree; give one")
        return length
    return positive_int(mqrar.PAPER_SEQ_LENGTH if seq_length is None else seq_length, "metadata seq_length")


def _choice(value: Any, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"metadata {name}={value!r} must be one of {list(choices)}")
    return value


def _int_list(value: Any, name: str) -> list[int]:
    values = [value] if isinstance(value, int) else value
    if not isinstance(values, list) or not values:
        raise ValueError(f"metadata {name}={value!r} must be a positive integer or a list of them, e.g. [32, 64]")
    return [positive_int(item, f"metadata {name}") for item in values]
