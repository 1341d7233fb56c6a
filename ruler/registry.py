"""Generators by name, and RULER's task configurations.

A generator is one function registered by name. It is called once per sample set with that set's
random generator, what the set is sized for (a `SizingTarget`) and the task's parameters, and
returns a `Sampler`: the function that draws one sample (a `Draft`) from a per-sample random
generator and the sample's index, and RULER's search for the set's haystack size. Everything else
(length fitting, seeding, caching) is shared by all generators (sb_eval.ruler.generate).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .fitting import Draft
from .sizing import ReferenceSize

DrawSample = Callable[[random.Random, int], Draft]


@dataclass(frozen=True)
class Sampler:
    """What a generator makes of one set's parameters.

    `draw(rng, index)` is sample `index` of the set, drawn from `rng`; `reference_size()` replays
    RULER's search for the set's haystack size (None where the generator or these parameters have
    no RULER counterpart: such sets fill their context whatever the sizing).
    """

    draw: DrawSample
    reference_size: Callable[[], ReferenceSize] | None = None


PrepareGenerator = Callable[..., Sampler]


@dataclass(frozen=True)
class Generator:
    name: str
    prepare: PrepareGenerator
    version: int  # bump when the samples it makes change; part of cache keys


GENERATORS: dict[str, Generator] = {}


def register_generator(name: str, version: int = 1) -> Callable[[PrepareGenerator], PrepareGenerator]:
    """Decorator: `@register_generator("passkey")` over `def passkey(set_rng, target, **params) -> Sampler`."""

    def register(prepare: PrepareGenerator) -> PrepareGenerator:
        # Executing the same module again (lm-eval reloads a task folder's .py files when they
        # change) replaces its generator; another function under a taken name is a mistake.
        if name in GENERATORS and _origin(GENERATORS[name].prepare) != _origin(prepare):
            raise ValueError(f"a generator named {name!r} is already registered, by {_origin(GENERATORS[name].prepare)}")
        GENERATORS[name] = Generator(name, prepare, version)
        return prepare

    return register


def _origin(function: Callable) -> str:
    return f"{function.__module__}.{function.__qualname__}"


@dataclass(frozen=True)
class TaskSpec:
    """A generator, its parameters, the generation budget RULER gives the task and its metric
    (a name in sb_eval.ruler.scoring.METRICS)."""

    generator: str
    tokens_to_generate: int
    params: dict[str, Any] = field(default_factory=dict)
    metric: str = "string_match_all"


# NVIDIA RULER's synthetic.yaml (its 13-task configuration), with tokens_to_generate from its
# constants.py and the metric its evaluation gives each task.
TASKS: dict[str, TaskSpec] = {
    "niah_single_1": TaskSpec("niah", 128, dict(type_haystack="repeat", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_2": TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers")),
    "niah_single_3": TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="uuids")),
    "niah_multikey_1": TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4)),
    "niah_multikey_2": TaskSpec("niah", 128, dict(type_haystack="needle", type_needle_k="words", type_needle_v="numbers")),
    "niah_multikey_3": TaskSpec("niah", 128, dict(type_haystack="needle", type_needle_k="uuids", type_needle_v="uuids")),
    "niah_multivalue": TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4)),
    "niah_multiquery": TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4)),
    "vt": TaskSpec("variable_tracking", 30, dict(num_chains=1, num_hops=4)),
    "cwe": TaskSpec("cwe", 120, dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": TaskSpec("fwe", 50, dict(alpha=2.0)),
    "qa_1": TaskSpec("qa", 32, dict(dataset="squad"), metric="string_match_part"),
    "qa_2": TaskSpec("qa", 32, dict(dataset="hotpotqa"), metric="string_match_part"),
}
