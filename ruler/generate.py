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

# The generator modules register their generators when imported.
from . import cache, common_words, frequent_words, niah, qa, variable_tracking  # noqa: F401
from .corpora import corpus_fingerprint
from .fitting import FittedSample, fit, fit_reference
from .registry import GENERATORS, TASKS, Generator, TaskSpec
from .scoring import METRICS
from .sizing import ReferenceSize, SizingTarget, check_sizing
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
    accepted = list(inspect.signature(GENERATORS[spec.generator].prepare).parameters)[2:]
    unknown = sorted(set(spec.params) - set(accepted))
    if unknown:
        raise ValueError(f"generator {spec.generator!r} has no parameter {', '.join(unknown)}; valid: {', '.join(accepted)}")
    if spec.metric not in METRICS:
        raise ValueError(f"metric={spec.metric!r} is not a RULER metric; valid: {sorted(METRICS)}")
    return spec


def generate(
    task: str | TaskSpec,
    max_seq_length: int,
    tokenizer: Any,
    num_samples: int,
    seed: int = 42,
    *,
    sizing: str = "ruler",
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    progress: Callable[[Iterable[T]], Iterable[T]] | None = None,
) -> list[dict]:
    """`num_samples` samples of `task` fitted to `max_seq_length` tokens of `tokenizer`.

    Each sample is {"index", "input": prompt ending with the answer prefix, "answer_prefix",
    "outputs": expected answers, "length": tokens of input (special tokens included),
    "max_length": max_seq_length, "needle_tokens": the first token (0-based) of each context
    element that holds an answer (needle, chain statement, gold document; none for the
    aggregation tasks), "needle_depths": where those start, in percent of the context's tokens}.

    `sizing` "ruler" (default) gives the haystack the size RULER's own generator gives it for the
    same tokenizer, length and seed; "fill" the largest that fits (sb_eval.ruler.sizing); sets
    without a RULER counterpart (a generator of your own, training parameters) fill. Either
    way length plus the task's tokens_to_generate is at most max_seq_length, counting special
    tokens under "fill" and not (as RULER) under "ruler"; RULER's FWE sizes its prompt to
    max_seq_length itself, without the generated tokens, and so does "ruler" here.

    The samples depend only on (task, max_seq_length, num_samples, seed, sizing, tokenizer);
    unless `use_cache` is false, a set made once is read back from `cache_dir` (default: <data
    dir>/ruler-cache). `progress` wraps the loop over samples (tqdm.tqdm, say).
    """
    spec = task_spec(task)
    check_sizing(sizing)
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
        "sizing": sizing,
        "tokenizer": counter.fingerprint(),
        "corpus": corpus_fingerprint(),
    }
    path = cache.path_for(key, cache_dir)
    if use_cache and (samples := cache.load(path, key)) is not None:
        return samples
    samples = _generate_set(spec, generator, SizingTarget(max_seq_length, spec.tokens_to_generate, counter, seed), sizing, num_samples, progress)
    if use_cache:
        cache.store(path, key, samples)
    return samples


def haystack_size(task: str | TaskSpec, max_seq_length: int, tokenizer: Any, seed: int = 42) -> ReferenceSize:
    """The haystack size RULER's generator gives `task`'s set at `max_seq_length` tokens of
    `tokenizer` with `seed` (in the task's units: essay words, lines, noise paragraphs, words or
    documents), and the step a sample too long for it shrinks by."""
    spec = task_spec(task)
    target = SizingTarget(max_seq_length, spec.tokens_to_generate, TokenCounter(tokenizer), seed)
    sampler = GENERATORS[spec.generator].prepare(random.Random(0), target, **spec.params)
    if sampler.reference_size is None:
        raise ValueError(f"generator {spec.generator!r} has no RULER counterpart to size its haystack like")
    return sampler.reference_size()


def _generate_set(
    spec: TaskSpec,
    generator: Generator,
    target: SizingTarget,
    sizing: str,
    num_samples: int,
    progress: Callable[[Iterable[int]], Iterable[int]] | None,
) -> list[dict]:
    # One random.Random per (task, length, seed): samples never depend on what else runs.
    identity = json.dumps([spec.generator, spec.params, target.max_seq_length, target.seed], sort_keys=True)
    set_rng = random.Random(identity)
    sampler = generator.prepare(random.Random(set_rng.getrandbits(64)), target, **spec.params)
    # Each sample draws from its own seed, so its needles do not depend on how long the earlier
    # samples' haystacks came out with this tokenizer.
    sample_seeds = [set_rng.getrandbits(64) for _ in range(num_samples)]
    if sizing == "ruler" and sampler.reference_size is None:
        logger.info("%s with %s has no RULER counterpart: its samples fill their context", spec.generator, spec.params)
        sizing = "fill"
    if sizing == "ruler":
        size = sampler.reference_size()
        logger.info("%s at %d tokens: RULER's haystack size %d (step %d)", spec.generator, target.max_seq_length, size.units, size.step)

    def fitted(exact: bool) -> Iterator[FittedSample]:
        for index, sample_seed in enumerate((progress or _no_progress)(sample_seeds)):
            draft = sampler.draw(random.Random(sample_seed), index)
            if sizing == "ruler":
                yield fit_reference(draft, size, target.counter, exact)
            else:
                yield fit(draft, target.max_seq_length, target.tokens_to_generate, target.counter, exact)

    samples = list(fitted(exact=False))
    checked = samples[:: max(1, len(samples) // VERIFIED_SAMPLES)][:VERIFIED_SAMPLES]
    measured = target.counter.count([sample.input for sample in checked])
    if any(sample.length != tokens for sample, tokens in zip(checked, measured)):
        logger.warning(
            "%s at %d: this tokenizer's counts are not additive over prompt pieces; tokenizing "
            "every sample whole (slower)", spec.generator, target.max_seq_length
        )
        samples = list(fitted(exact=True))
    return [
        {
            "index": index,
            "input": sample.input,
            "answer_prefix": sample.answer_prefix,
            "outputs": sample.outputs,
            "length": sample.length,
            "max_length": target.max_seq_length,
            "needle_tokens": sample.needle_tokens,
            "needle_depths": sample.needle_depths,
        }
        for index, sample in enumerate(samples)
    ]


def _no_progress(items: Iterable[T]) -> Iterable[T]:
    return items
