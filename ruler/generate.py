"""`generate`: seeded sample sets of a RULER task, fitted to a length with a tokenizer, cached.

Every generator module is imported here, so that its generators are registered before any set is
made (sb_eval.ruler.registry).
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from . import cache, niah, variable_tracking  # noqa: F401  (niah and variable_tracking register their generators)
from .fitting import FittedSample, fit
from .registry import GENERATORS, TASKS, Generator, TaskSpec
from .tokens import TokenCounter

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Exact lengths are checked on this many samples per set; if any differs from the sum of its
# pieces, the tokenizer is not additive over pieces and every sample is tokenized whole.
VERIFIED_SAMPLES = 3


def task_spec(task: str | TaskSpec) -> TaskSpec:
    if isinstance(task, TaskSpec):
        spec = task
    elif task in TASKS:
        spec = TASKS[task]
    else:
        raise ValueError(f"task={task!r} is not a RULER task here; valid: {sorted(TASKS)}")
    if spec.generator not in GENERATORS:
        raise ValueError(f"generator={spec.generator!r} is not registered; valid: {sorted(GENERATORS)}")
    accepted = list(inspect.signature(GENERATORS[spec.generator].prepare).parameters)[1:]
    unknown = sorted(set(spec.params) - set(accepted))
    if unknown:
        raise ValueError(f"generator {spec.generator!r} has no parameter {', '.join(unknown)}; valid: {', '.join(accepted)}")
    return spec


def generate(
    task: str | TaskSpec,
    max_seq_length: int,
    tokenizer: Any,
    num_samples: int,
    seed: int = 42,
    *,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    progress: Callable[[Iterable[T]], Iterable[T]] | None = None,
) -> list[dict]:
    """`num_samples` samples of `task` fitted to `max_seq_length` tokens of `tokenizer`.

    Each sample is {"input": prompt ending with the answer prefix, "answer_prefix", "outputs":
    expected answers, "length": tokens of input, "max_length": max_seq_length}; length plus the
    task's tokens_to_generate is at most max_seq_length. The samples depend only on (task,
    max_seq_length, num_samples, seed, tokenizer); unless `use_cache` is false, a set made once is
    read back from `cache_dir` (default: <data dir>/ruler-cache). `progress` wraps the loop over
    samples (tqdm.tqdm, say).
    """
    spec = task_spec(task)
    if max_seq_length <= spec.tokens_to_generate:
        raise ValueError(f"max_seq_length={max_seq_length} must exceed the task's {spec.tokens_to_generate} generated tokens")
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1")
    counter = TokenCounter(tokenizer)
    generator = GENERATORS[spec.generator]
    key = {
        "generator": spec.generator,
        "generator_version": generator.version,
        "params": spec.params,
        "tokens_to_generate": spec.tokens_to_generate,
        "max_seq_length": max_seq_length,
        "num_samples": num_samples,
        "seed": seed,
        "tokenizer": counter.fingerprint(),
    }
    path = cache.path_for(key, cache_dir)
    if use_cache and (samples := cache.load(path, key)) is not None:
        return samples
    samples = _generate_set(spec, generator, max_seq_length, counter, num_samples, seed, progress)
    if use_cache:
        cache.store(path, key, samples)
    return samples


def _generate_set(
    spec: TaskSpec,
    generator: Generator,
    max_seq_length: int,
    counter: TokenCounter,
    num_samples: int,
    seed: int,
    progress: Callable[[Iterable[int]], Iterable[int]] | None,
) -> list[dict]:
    # One random.Random per (task, length, seed): samples never depend on what else runs.
    identity = json.dumps([spec.generator, spec.params, max_seq_length, seed], sort_keys=True)
    set_rng = random.Random(identity)
    draw = generator.prepare(random.Random(set_rng.getrandbits(64)), **spec.params)
    # Each sample draws from its own seed, so its needles do not depend on how long the earlier
    # samples' haystacks came out with this tokenizer.
    sample_seeds = [set_rng.getrandbits(64) for _ in range(num_samples)]

    def fitted(exact: bool) -> Iterator[FittedSample]:
        for sample_seed in (progress or _no_progress)(sample_seeds):
            draft = draw(random.Random(sample_seed))
            yield fit(draft, max_seq_length, spec.tokens_to_generate, counter, exact)

    samples = list(fitted(exact=False))
    checked = samples[:: max(1, len(samples) // VERIFIED_SAMPLES)][:VERIFIED_SAMPLES]
    measured = counter.count([sample.input for sample in checked])
    if any(sample.length != tokens for sample, tokens in zip(checked, measured)):
        logger.warning(
            "%s at %d: this tokenizer's counts are not additive over prompt pieces; tokenizing "
            "every sample whole (slower)", spec.generator, max_seq_length
        )
        samples = list(fitted(exact=True))
    return [
        {
            "index": index,
            "input": sample.input,
            "answer_prefix": sample.answer_prefix,
            "outputs": sample.outputs,
            "length": sample.length,
            "max_length": max_seq_length,
        }
        for index, sample in enumerate(samples)
    ]


def _no_progress(items: Iterable[T]) -> Iterable[T]:
    return items
