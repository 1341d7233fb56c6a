"""Retrieval practice for training: samples in the form of the evaluation tasks, sharing nothing else
with them, packed into training rows.

A small model answers RULER's prompts only if it has seen their form. The training samples come
from the very generators the tasks use, with other seeds and other vocabularies:

| | evaluation sets | training samples |
|---|---|---|
| NIAH word keys | adjective-noun pairs | verb-noun pairs (never equal to an adjective-noun one) |
| NIAH essay haystack | Paul Graham's essays, from their start | sentences of the training documents, from a random sentence |
| variable names | 5 letters | 4 or 6 letters |
| MQRAR | 256 keys and values | 384 keys and values |
| seeds | the tasks' (42 by default) | `seed` here, and other generator parameters |

A sample is a prompt and the answer that follows it, ending with end-of-text. Rows of a batch are
filled with samples back to back (a row's free end is padding); only answer tokens are scored,
so the model learns to answer, not to predict random needles.

A NIAH sample gives one answer (about five tokens) per thousand tokens or so, and models of tens
of millions of parameters trained for a few thousand steps on such samples (and on a few million
tokens of text) learnt the answers' form but never to retrieve them. Dense recall rows
(`dense_recall_rows`) pack the same skill tightly: needle statements, then one question after
another about them, each answered in place, every answer scored: some 60 answers per 2048
tokens, where MQRAR, which small models do learn, has hundreds of targets per sequence.

Repeated segments (`RepeatedSegments`) are the plainest copying there is: a random run of tokens,
then the same run again and again, every repeat scored; the in-context lookup that retrieval
builds on (induction heads, Olsson et al. 2022). The default stick-breaking model learnt it
in its first 400 steps, on such rows alone; 100 steps into the mixture that followed, it answered
0.82 of held-out retrieval practice tokens (sb_eval/default_model/README.md).
"""

from __future__ import annotations

import logging
import os
import random
from bisect import bisect_right
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sb_eval.ruler import mqrar
from sb_eval.ruler.fitting import TooShortError
from sb_eval.ruler.generate import generate
from sb_eval.ruler.niah import NEEDLE, prompt_parts
from sb_eval.ruler.registry import TaskSpec
from sb_eval.ruler.values import value_drawer

from .trainer import IGNORE, Batch, SequencePool

logger = logging.getLogger(__name__)

# A key space larger than the evaluation's 256 keys and values.
TRAINING_MQRAR_VOCABULARY = mqrar.Vocabulary(num_keys=384, num_values=384)


def retrieval_specs(essay_file: str | Path) -> dict[str, TaskSpec]:
    """Training variants of ruler_niah's eight tasks and of variable tracking (see the module's
    table); NIAH essay haystacks read `essay_file` (sb_eval.data.write_sentences)."""

    def niah(type_haystack: str, type_needle_k: str = "words", type_needle_v: str = "numbers", **counts: int) -> TaskSpec:
        params = dict(type_haystack=type_haystack, type_needle_k=type_needle_k, type_needle_v=type_needle_v, key_words="verb-noun", **counts)
        if type_haystack == "essay":
            params.update(essay_file=str(essay_file), essay_start="random")
        return TaskSpec("niah", 128, params)

    return {
        "niah_repeat": niah("repeat"),
        "niah_essay_numbers": niah("essay"),
        "niah_essay_uuids": niah("essay", type_needle_v="uuids"),
        "niah_essay_multikey": niah("essay", num_needle_k=4),
        "niah_needle_words": niah("needle"),
        "niah_needle_uuids": niah("needle", type_needle_k="uuids", type_needle_v="uuids"),
        "niah_essay_multivalue": niah("essay", num_needle_v=4),
        "niah_essay_multiquery": niah("essay", num_needle_q=4),
        "vt_names_4": TaskSpec("variable_tracking", 30, dict(num_chains=1, num_hops=4, name_length=4)),
        "vt_names_6": TaskSpec("variable_tracking", 30, dict(num_chains=1, num_hops=4, name_length=6)),
    }


@dataclass(frozen=True)
class PromptAnswer:
    """Token ids of a prompt and of its answer (the answer ends with end-of-text)."""

    prompt: list[int]
    answer: list[int]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def retrieval_samples(
    tokenizer: PreTrainedTokenizerBase,
    essay_file: str | Path,
    lengths: Sequence[int],
    samples_per_set: int,
    seed: int,
    mqrar_pairs: Sequence[int] = (16, 32, 64),
    workers: int | None = None,
) -> list[PromptAnswer]:
    """`samples_per_set` samples of each training variant (retrieval_specs) at each of `lengths`
    (tokens, prompt plus generation budget), and as many MQRAR instances for each pair count in
    `mqrar_pairs` and length, with sequences of as many symbols as the length holds at the most
    tokens a symbol takes. A variant that a length cannot hold (variable tracking's solved example
    alone takes RULER's 500 tokens, more with a small vocabulary) is left out at that length, with
    a warning. Sets are made by `workers` processes (default: one per CPU); the result does not
    depend on it."""
    ruler_sets = [(name, spec, length) for name, spec in retrieval_specs(essay_file).items() for length in lengths]
    symbol_tokens = _tokens_per_mqrar_symbol(tokenizer)
    mqrar_symbols = [length // symbol_tokens - 2 for length in lengths]  # room for the answer and end-of-text
    sets = [(spec, length) for _, spec, length in ruler_sets]
    sets += [(num_pairs, symbols) for num_pairs in mqrar_pairs for symbols in mqrar_symbols if symbols > 2 * num_pairs]
    make = partial(_set_samples, tokenizer, samples_per_set, seed)
    per_set = _map_in_processes(make, sets, workers, "retrieval samples", "set")
    kept, left_out = [], 0
    for (name, _, length), (samples, reason) in zip(ruler_sets, per_set):
        if reason:
            logger.warning("retrieval practice: %s left out at %d tokens: %s", name, length, reason)
            left_out += 1
        # RULER fits a prompt and the task's generation budget into the length; an answer that
        # takes the whole budget (a long uuid under a small vocabulary) leaves end-of-text outside.
        fitting = [sample for sample in samples if len(sample) <= length]
        if len(fitting) < len(samples):
            logger.warning("retrieval practice: %d %s samples longer than %d tokens with end-of-text left out",
                           len(samples) - len(fitting), name, length)
        kept += fitting
    if left_out == len(ruler_sets):
        raise ValueError(f"lengths {list(lengths)} hold no retrieval practice task; use longer ones")
    return kept + [sample for samples, _ in per_set[len(ruler_sets):] for sample in samples]


def _map_in_processes(function, arguments: list[tuple], workers: int | None, desc: str, unit: str, chunksize: int = 1) -> list:
    """[function(*args) for args in arguments] with a progress bar, in `workers` processes (default
    one per CPU) unless 1; `function` must then be picklable."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [function(*args) for args in tqdm(arguments, desc=desc, unit=unit)]
    with ProcessPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(function, *zip(*arguments), chunksize=chunksize), total=len(arguments), desc=desc, unit=unit))


def _set_samples(
    tokenizer: PreTrainedTokenizerBase, samples_per_set: int, seed: int, task: TaskSpec | int, size: int
) -> tuple[list[PromptAnswer], str | None]:
    """One set and, when `size` cannot hold it, no samples and why: a RULER-form task at `size`
    tokens, or MQRAR with `task` pairs in sequences of `size` symbols."""
    if isinstance(task, TaskSpec):
        try:
            samples = generate(task, size, tokenizer, samples_per_set, seed, use_cache=False)
        except TooShortError as error:
            return [], str(error)
        # RULER's answers join as its solved examples do; the scorer looks for each in turn.
        return [_encode(tokenizer, sample["input"], " ".join(sample["outputs"]), sample["input"].endswith(" ")) for sample in samples], None
    # the dense layout, as the default checkpoint learnt it (its data stay as they were)
    instances = mqrar.instances(samples_per_set, size, task, TRAINING_MQRAR_VOCABULARY, seed, queries_per_sequence=1, layout="dense")
    return [_encode(tokenizer, instance["context"], instance["answer"], False) for instance in instances], None


def _tokens_per_mqrar_symbol(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most tokens any training MQRAR symbol takes with its leading space."""
    symbols = TRAINING_MQRAR_VOCABULARY.symbols
    return max(len(ids) for ids in tokenizer([" " + symbol for symbol in symbols], add_special_tokens=False).input_ids)


def _encode(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, prompt_ends_with_space: bool) -> PromptAnswer:
    answer_text = answer if prompt_ends_with_space else " " + answer
    return PromptAnswer(
        tokenizer(prompt, add_special_tokens=False).input_ids,
        tokenizer(answer_text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id],
    )


class PackedSamples:
    """Batches of `batch_size` rows of `length` tokens, each filled with samples drawn at random
    (seeded by step) back to back: while a row has room, a sample that fits the room is drawn
    uniformly; the rest is padding with end-of-text. targets[b, t] is the next token where that
    token belongs to an answer, IGNORE elsewhere."""

    def __init__(self, samples: Sequence[PromptAnswer], length: int, batch_size: int, seed: int, pad_id: int):
        if not samples:
            raise ValueError("PackedSamples needs at least one sample")
        too_long = [len(sample) for sample in samples if len(sample) > length]
        if too_long:
            raise ValueError(f"{len(too_long)} samples are longer than the rows' {length} tokens (longest {max(too_long)})")
        self.samples = sorted(samples, key=len)
        self.sizes = [len(sample) for sample in self.samples]
        self.length, self.batch_size, self.seed, self.pad_id = length, batch_size, seed, pad_id

    def batch(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        inputs = torch.full((self.batch_size, self.length), self.pad_id, dtype=torch.long)
        targets = torch.full((self.batch_size, self.length), IGNORE, dtype=torch.long)
        for row in range(self.batch_size):
            filled = 0
            while (fitting := self._count_fitting(self.length - filled)) > 0:
                sample = self.samples[int(torch.randint(fitting, (1,), generator=generator))]
                tokens = torch.tensor(sample.prompt + sample.answer)
                inputs[row, filled:filled + len(tokens)] = tokens
                answer_start = filled + len(sample.prompt)
                targets[row, answer_start - 1:answer_start - 1 + len(sample.answer)] = torch.tensor(sample.answer)
                filled += len(tokens)
        return Batch(inputs, targets)

    def _count_fitting(self, room: int) -> int:
        """How many samples (a prefix of the list sorted by size) are at most `room` tokens long."""
        return bisect_right(self.sizes, room)


class RepeatedSegments:
    """Batches of `batch_size` rows of `length` tokens (seeded by step): each row is a segment of
    uniformly random ids from `token_ids`, of a length drawn uniformly from `segment_lengths`
    (inclusive bounds), repeated to the row's end. targets[b, t] is the next token from the first
    repeat's second token on, IGNORE before: a copy can be predicted only once a token has been
    seen repeating, not where the first segment ends."""

    def __init__(self, token_ids: Sequence[int], length: int, batch_size: int, seed: int, segment_lengths: tuple[int, int]):
        shortest, longest = segment_lengths
        if not 1 <= shortest <= longest < length:
            raise ValueError(f"segment_lengths must satisfy 1 <= shortest <= longest < length {length}, got {segment_lengths}")
        if len(token_ids) < 2:
            raise ValueError(f"token_ids needs at least 2 ids to draw from, got {len(token_ids)}")
        self.token_ids = torch.tensor(token_ids, dtype=torch.long)
        self.length, self.batch_size, self.seed, self.segment_lengths = length, batch_size, seed, segment_lengths

    def batch(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        sizes = torch.randint(self.segment_lengths[0], self.segment_lengths[1] + 1, (self.batch_size,), generator=generator)
        segments = self.token_ids[torch.randint(len(self.token_ids), (self.batch_size, self.segment_lengths[1]), generator=generator)]
        positions = torch.arange(self.length + 1)
        rows = torch.gather(segments, 1, positions % sizes[:, None])  # [B, length + 1]: each segment tiled
        targets = rows[:, 1:].masked_fill(positions[None, 1:] <= sizes[:, None], IGNORE)
        return Batch(rows[:, :-1], targets)


# Dense recall rows: needle statements per row, then questions until the row is full.
DENSE_STATEMENTS = (4, 32)
DENSE_VALUE_TYPES = ("numbers", "uuids")


def dense_recall_rows(
    tokenizer: PreTrainedTokenizerBase, length: int, count: int, batch_size: int, seed: int, workers: int | None = None
) -> SequencePool:
    """`count` rows of `length` tokens, as a SequencePool of `batch_size` rows a batch. A row holds
    4 to 32 NIAH needle statements (fewer where they would take more than half the row) ("One of the special magic numbers for KEY is: VALUE.", verb-noun
    keys, values 7-digit numbers or uuids, one kind per row), one a line, then NIAH's singular
    question and answer prefix about a random one of them followed by its value and ".", a line
    each, while they fit; the value's tokens are the targets (IGNORE elsewhere; the row's unused
    end is end-of-text padding). Made by `workers` processes (default one per CPU); the rows do
    not depend on it."""
    make = partial(_dense_recall_row, tokenizer, length)
    seeds = [seed * 1_000_003 + index for index in range(count)]
    rows = _map_in_processes(make, [(row_seed,) for row_seed in seeds], workers, "dense recall rows", "row", chunksize=64)
    return SequencePool([inputs for inputs, _ in rows], [targets for _, targets in rows], batch_size, seed)


def _dense_recall_row(tokenizer: PreTrainedTokenizerBase, length: int, row_seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(row_seed)
    value_type = rng.choice(DENSE_VALUE_TYPES)
    draw_key, draw_value = value_drawer("words", "key_words", "verb-noun"), value_drawer(value_type, "type_needle_v")
    pairs = [(draw_key(rng), draw_value(rng)) for _ in range(rng.randint(*DENSE_STATEMENTS))]
    _, tail, answer_prefix = prompt_parts(value_type, singular=True)
    while True:  # the statements take at most half the row, so that questions fill the rest
        statements = "\n".join(NEEDLE.format(type_needle_v=value_type, key=key, value=value) for key, value in pairs)
        inputs = tokenizer(statements, add_special_tokens=False).input_ids
        if len(inputs) <= length // 2 or len(pairs) == 1:
            break
        pairs.pop()
    is_answer = [False] * len(inputs)
    while True:
        key, value = rng.choice(pairs)
        question, answer, end = (
            tokenizer(text, add_special_tokens=False).input_ids
            for text in (tail.format(query=key) + answer_prefix.format(query=key), " " + value, ".")
        )
        if len(inputs) + len(question) + len(answer) + len(end) > length:
            break
        inputs += question + answer + end
        is_answer += [False] * len(question) + [True] * len(answer) + [False] * len(end)
    if not any(is_answer):
        raise ValueError(f"a dense recall row of {length} tokens holds no question after its statements ({len(inputs)} tokens)")
    # targets[t] is what position t predicts: inputs[t + 1] where that is a value's token.
    targets = [token if scored else IGNORE for token, scored in zip(inputs[1:], is_answer[1:])] + [IGNORE]
    pad = length - len(inputs)
    return inputs + [tokenizer.eos_token_id] * pad, targets + [IGNORE] * pad
