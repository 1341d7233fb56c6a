"""The functions the RULER task YAMLs name: dataset, prompt, scoring.

`custom_dataset` receives lm-eval's metadata (`--metadata` merged over `--model_args`) plus the
task's `dataset_kwargs`. From the metadata: max_seq_lengths (list of ints, default [4096]),
num_samples per length (default 500, as RULER), seed (default 42), sizing ("ruler", the
default: RULER's haystack sizes; or "fill"), for the QA tasks `squad` and `hotpotqa` (where their
data is; sb_eval.tasks.ruler_qa), and the tokenizer to fit lengths with, from `tokenizer`, else
`pretrained` or `model` (a local folder or a name the transformers cache holds), else the
tokenizer of the checkpoint sb_hf evaluates without `pretrained` (with a warning). From
dataset_kwargs: either `ruler_task` (a name in sb_eval.ruler.TASKS), or `generator`,
`tokens_to_generate` and `generator_params` (a mapping).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import cache
from typing import Any

import datasets
from tqdm import tqdm
from transformers import AutoTokenizer

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import TASKS, TaskSpec
from sb_eval.ruler.scoring import METRICS
from sb_eval.ruler.sizing import check_sizing
from sb_eval.options import check_known, model_argument_names
from sb_eval.tasks.ruler_qa import qa_data_file

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTHS = [4096]
DEFAULT_NUM_SAMPLES = 500  # RULER's default
TOKENIZER_KEYS = ("tokenizer", "pretrained", "model")
# What lm-eval itself puts into every task's metadata (the YAML's metadata block, and where it came from).
LM_EVAL_METADATA = ("version", "config_source", "config", "_metadata")
# The RULER tasks' --metadata settings, and what their YAMLs' dataset_kwargs may hold.
RULER_SETTINGS = ("max_seq_lengths", "num_samples", "seed", "sizing", "squad", "hotpotqa", *TOKENIZER_KEYS)
RULER_DATASET_KWARGS = ("ruler_task", "generator", "tokens_to_generate", "generator_params", "metric")


def custom_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The test split: every length's samples, interleaved (sample 0 of each length, then sample
    1, ...) so that `--limit N` takes about N / len(max_seq_lengths) samples of every length."""
    check_metadata(kwargs, RULER_SETTINGS, f"RULER task {kwargs.get('ruler_task') or kwargs.get('generator')}", RULER_DATASET_KWARGS)
    spec = _task_spec(kwargs)
    lengths = _max_seq_lengths(kwargs.get("max_seq_lengths", DEFAULT_MAX_SEQ_LENGTHS))
    num_samples = positive_int(kwargs.get("num_samples", DEFAULT_NUM_SAMPLES), "num_samples")
    seed = kwargs.get("seed", 42)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"metadata seed={seed!r} must be an integer")
    sizing = kwargs.get("sizing", "ruler")
    if not isinstance(sizing, str):
        raise ValueError(f"metadata sizing={sizing!r} must be 'ruler' or 'fill'")
    check_sizing(sizing)
    if spec.generator == "qa":
        path, sha256 = qa_data_file(spec.params["dataset"], kwargs)
        spec = replace(spec, params={**spec.params, "data_file": str(path), "data_sha256": sha256})
    tokenizer = load_tokenizer(tokenizer_name(kwargs))
    label = kwargs.get("ruler_task") or spec.generator
    per_length = [
        generate(
            spec,
            length,
            tokenizer,
            num_samples,
            seed,
            sizing=sizing,
            progress=lambda items, length=length: tqdm(items, desc=f"{label} at {length} tokens", leave=False),
        )
        for length in lengths
    ]
    interleaved = [dict(samples[i], metric=spec.metric) for i in range(num_samples) for samples in per_length]
    return {"test": datasets.Dataset.from_list(interleaved)}


def doc_to_text(doc: dict) -> str:
    """The prompt without its answer prefix, which lm-eval appends as `gen_prefix` (in the
    assistant turn under a chat template); without a chat template the two join back into the
    sample's input exactly."""
    return doc["input"][: len(doc["input"]) - len(doc["answer_prefix"])]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The task's RULER metric (string_match_all, or string_match_part for QA; 0-100) under the
    metric named by the sample's length."""
    return {str(doc["max_length"]): METRICS[doc["metric"]](results[0], doc["outputs"])}


def _task_spec(kwargs: dict) -> TaskSpec:
    if "ruler_task" in kwargs:
        if kwargs["ruler_task"] not in TASKS:
            raise ValueError(f"dataset_kwargs ruler_task={kwargs['ruler_task']!r} is not one of {sorted(TASKS)}")
        return TASKS[kwargs["ruler_task"]]
    if "generator" not in kwargs or "tokens_to_generate" not in kwargs:
        raise ValueError(
            "a RULER task's dataset_kwargs need either ruler_task (one of "
            f"{sorted(TASKS)}) or generator and tokens_to_generate plus the generator's parameters"
        )
    params = dict(kwargs.get("generator_params") or {})
    return TaskSpec(kwargs["generator"], positive_int(kwargs["tokens_to_generate"], "tokens_to_generate"), params, kwargs.get("metric", "string_match_all"))


def _max_seq_lengths(value: Any) -> list[int]:
    lengths = [value] if isinstance(value, int) else value
    if not isinstance(lengths, list) or not lengths:
        raise ValueError(f"metadata max_seq_lengths={value!r} must be a list of token counts, e.g. [4096, 8192]")
    return [positive_int(length, "max_seq_lengths") for length in lengths]


def check_metadata(kwargs: dict, settings: tuple[str, ...], task: str, dataset_kwargs: tuple[str, ...] = ()) -> None:
    """Raises ValueError for a key of the task's metadata that is none of its `settings` (listed
    in the message), none of its YAML's `dataset_kwargs`, none that lm-eval adds, and no model
    argument (lm-eval merges --model_args into the metadata): a misspelt setting would otherwise
    be ignored and its default used, silently."""
    check_known(kwargs, settings, f"{task}'s --metadata",
                also_accepted={*dataset_kwargs, *LM_EVAL_METADATA, *model_argument_names()})


def positive_int(value: Any, name: str) -> int:
    """`value`, checked to be a positive integer; `name` is what the error calls it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def tokenizer_name(kwargs: dict) -> str:
    """The tokenizer lm-eval's metadata names: `tokenizer`, else `pretrained` or `model`, else
    the default checkpoint's (with a warning)."""
    for key in TOKENIZER_KEYS:
        if isinstance(kwargs.get(key), str) and kwargs[key]:
            return kwargs[key]
    _warn_default_tokenizer()
    return str(DEFAULT_CHECKPOINT)


@cache
def _warn_default_tokenizer() -> None:
    """Once per process: every task of a group would otherwise repeat it."""
    logger.warning(
        "no tokenizer, pretrained or model named; the tasks count tokens with the default checkpoint's tokenizer "
        "(%s), which sb_hf evaluates without pretrained. For another model pass --model_args pretrained=PATH, "
        "or --metadata '{\"tokenizer\": \"PATH\"}'", DEFAULT_CHECKPOINT,
    )


@cache
def load_tokenizer(name: str):
    """One tokenizer per name for the whole process, however many tasks ask for it."""
    return AutoTokenizer.from_pretrained(name)
