"""The engine of `sb-eval attribution` (sb_eval.commands.attribution): where each head looked when
the model answered RULER and MQRAR samples.

Each model's tokenizer fits the samples (sb_eval.ruler.generate, sb_eval.ruler.mqrar); the model
answers them greedily while the attention of each answering query is split over the prompt's
spans (sb_eval.harness.attributed_answers, sb_eval.analysis.attribution); each answer is scored
as its task scores it. A model's result is a JSON document (docs/attribution.md has its schema),
rewritten after every batch so that a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from sb_eval.analysis.attribution import AnswerSpanMass, collecting_span_mass, summarize
from sb_eval.files import write_atomically
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.ruler import mqrar
from sb_eval.ruler.fitting import TooShortError
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import TASKS
from sb_eval.tasks.task_files import RULER_GROUPS, RULER_TASKS

from .attributed_answers import SCHEMA_VERSION, AttributionError, batch_span_indices, prompt_layout, ruler_answer, sample_record
from .compared_models import file_labels, load_model, local_model_arguments, parse_compare
from .sweep import ModelSpec, SweepArgumentError, free_memory, parse_lengths

MQRAR_TASK = "mqrar"
# The settings a model's JSON must share with a run that resumes it.
RESUMED_SETTINGS = ("seed", "answer_tokens", "max_new_tokens", "mqrar_pairs")


class AttributionArgumentError(ValueError):
    """An argument of `sb-eval attribution` that cannot work; the message says what is valid."""


# ---------------------------------------------------------------------------------------------
# Samples.


@dataclass(frozen=True)
class Sample:
    """One prompt to answer: an lm-eval task name, the length it was made for (tokens; MQRAR:
    symbols), its index in that set, its generator and expected answers."""

    task: str
    length: int
    index: int
    generator: str
    prompt: str
    answers: list[str]
    max_new_tokens: int  # the task's generation budget
    num_pairs: int | None = None  # MQRAR only

    @property
    def key(self) -> tuple[str, int, int]:
        return self.task, self.length, self.index

    def identity(self) -> dict:
        """What names the sample in the JSON: task, length, index, answers, num_pairs."""
        return {"task": self.task, "length": self.length, "index": self.index, "answers": self.answers, "num_pairs": self.num_pairs}


def task_list(text: str) -> list[str]:
    """Comma-separated lm-eval task names (RULER tasks, the ruler_niah group, mqrar) -> the tasks,
    groups expanded, each once, in order."""
    tasks: list[str] = []
    for name in (part.strip() for part in text.split(",") if part.strip()):
        members = RULER_GROUPS[name][1] if name in RULER_GROUPS else [name]
        for member in members:
            if member not in RULER_TASKS and member != MQRAR_TASK:
                valid = [*RULER_GROUPS, *RULER_TASKS, MQRAR_TASK]
                raise AttributionArgumentError(f"--tasks: {name!r} is not a task attribution covers; valid: {', '.join(valid)}")
            if member not in tasks:
                tasks.append(member)
    if not tasks:
        raise AttributionArgumentError("--tasks names no task; e.g. --tasks ruler_niah,sb_ruler_vt,mqrar")
    return tasks


def make_samples(task: str, length: int, tokenizer, num_samples: int, seed: int, mqrar_pairs: list[int]) -> list[Sample]:
    """The first num_samples samples of an lm-eval task at `length`, as the task makes them with
    this seed: a RULER task's set (cached in the data folder), or MQRAR queries cut from
    sequences of `length` symbols, one per sequence, the pair counts taken in turn."""
    if task == MQRAR_TASK:
        per_count = math.ceil(num_samples / len(mqrar_pairs))
        instances = {pairs: mqrar.instances(per_count, length, pairs, seed=seed, queries_per_sequence=1) for pairs in mqrar_pairs}
        samples = []
        for index in range(num_samples):
            pairs = mqrar_pairs[index % len(mqrar_pairs)]
            instance = instances[pairs][index // len(mqrar_pairs)]
            # answered greedily, as the task's loglikelihood scores it: " " + the value symbol
            answer_tokens = len(tokenizer(" " + instance["answer"], add_special_tokens=False)["input_ids"])
            samples.append(Sample(task, length, index, "mqrar", instance["context"], [instance["answer"]], answer_tokens, pairs))
        return samples
    spec = TASKS[RULER_TASKS[task]]
    made = generate(spec, length, tokenizer, num_samples, seed, progress=lambda items: tqdm(items, desc=f"{task} at {length}", leave=False))
    return [Sample(task, length, sample["index"], spec.generator, sample["input"], list(sample["outputs"]), spec.tokens_to_generate) for sample in made]


# ---------------------------------------------------------------------------------------------
# `sb-eval attribution`


@dataclass(frozen=True)
class Settings:
    tasks: list[str]
    lengths: list[int]
    num_samples: int
    seed: int
    answer_tokens: int | None  # None: every generated token
    max_new_tokens: int | None  # None: each task's budget
    threshold: float
    mqrar_pairs: list[int]
    batch_size: int


def prepare(args: argparse.Namespace) -> tuple[list[ModelSpec], list[dict], list[str], Settings]:
    """The models, their constructor arguments, their file labels and the settings, from the
    parsed arguments of `sb-eval attribution`; raises AttributionArgumentError for any that
    cannot work, before a model is loaded."""
    try:
        lengths = parse_lengths(args.lengths)
    except SweepArgumentError as error:
        raise AttributionArgumentError(str(error)) from None
    settings = Settings(
        tasks=task_list(args.tasks),
        lengths=lengths,
        num_samples=_at_least(args.num_samples, 1, "--num_samples"),
        seed=args.seed,
        answer_tokens=None if args.answer_tokens == "all" else _at_least(_integer(args.answer_tokens, "--answer_tokens", "a number of tokens or all"), 1, "--answer_tokens"),
        max_new_tokens=None if args.max_new_tokens is None else _at_least(args.max_new_tokens, 1, "--max_new_tokens"),
        threshold=_threshold(args.threshold),
        mqrar_pairs=_mqrar_pairs(args.mqrar_pairs),
        batch_size=_at_least(args.batch_size, 1, "--batch_size"),
    )
    if MQRAR_TASK in settings.tasks:
        too_short = [length for length in lengths if length <= 2 * max(settings.mqrar_pairs)]
        if too_short:
            raise AttributionArgumentError(
                f"--lengths {too_short[0]} leaves no MQRAR query after {max(settings.mqrar_pairs)} pairs "
                f"({2 * max(settings.mqrar_pairs)} symbols); use longer lengths or smaller --mqrar_pairs"
            )
    models = [ModelSpec(args.model, args.model_args)] + ([parse_compare(args.compare, AttributionArgumentError)] if args.compare else [])
    arguments = [local_model_arguments(model, args.device, args.dtype, AttributionArgumentError) for model in models]
    return models, arguments, file_labels(models), settings


def _integer(text: str, name: str, what: str) -> int:
    if not re.fullmatch(r"-?\d+", str(text)):
        raise AttributionArgumentError(f"{name} {text!r} must be {what}")
    return int(text)


def _at_least(value: int, least: int, name: str) -> int:
    if value < least:
        raise AttributionArgumentError(f"{name} must be at least {least}, got {value}")
    return value


def _threshold(value: float) -> float:
    if not 0 < value < 1:
        raise AttributionArgumentError(f"--threshold {value} must be a share of a head's attention between 0 and 1")
    return value


def _mqrar_pairs(text: str) -> list[int]:
    pairs = [_integer(part.strip(), "--mqrar_pairs", "comma-separated pair counts, e.g. 32,64") for part in text.split(",")]
    return sorted({_at_least(count, 1, "--mqrar_pairs") for count in pairs})





def attribute_model(model: ModelSpec, arguments: dict, label: str, settings: Settings, output: Path) -> dict:
    """Every (task, length) of the settings for one model, shortest length first; returns its JSON
    document, which is also written to OUTPUT/<label>.json after every batch. Samples the file
    already holds (made with the same settings) are kept, not rerun."""
    path = output / f"{label}.json"
    lm = load_model(model, arguments)
    try:
        document = {
            "schema_version": SCHEMA_VERSION,
            "label": label,
            "model": model.name,
            "model_args": model.args,
            "attention": "stick-breaking" if isinstance(lm.model, StickBreakingForCausalLM) else "softmax",
            "layers": lm.model.config.num_hidden_layers,
            "heads": lm.model.config.num_attention_heads,
            "device": str(lm.device),
            "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
            "settings": asdict(settings),
            "samples": [],
        }
        done = resumed_samples(path, document)
        samples = []
        for length in settings.lengths:
            for task in settings.tasks:
                try:
                    samples += make_samples(task, length, lm.tokenizer, settings.num_samples, settings.seed, settings.mqrar_pairs)
                except TooShortError as error:
                    raise AttributionArgumentError(f"{task} at {length}: {error}") from None
        check_lengths(lm, samples, settings)
        document["samples"] = list(done.values())
        todo = [s for s in samples if s.key not in done]
        with collecting_span_mass(lm.model) as recorder, tqdm(total=len(todo), desc=label, unit="sample") as progress:
            for start in range(0, len(todo), settings.batch_size):
                batch = todo[start : start + settings.batch_size]
                document["samples"] += attribute_batch(lm, recorder, batch, settings)
                write_document(path, document, settings)
                progress.update(len(batch))
        if not todo:  # nothing was run: the file is written again with this run's summary
            write_document(path, document, settings)
        return document
    finally:
        del lm
        free_memory()


def resumed_samples(path: Path, document: dict) -> dict[tuple[str, int, int], dict]:
    """The samples of an earlier run's file for the same model, by (task, length, index); its
    settings that shape a sample must equal these."""
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AttributionArgumentError(f"{path} is not JSON ({error.msg}); move it away to start afresh") from None
    for key in ("model", "model_args", "attention"):
        if earlier.get(key) != document[key]:
            raise AttributionArgumentError(f"{path} holds another model ({key} {earlier.get(key)!r}, not {document[key]!r}); use another --output")
    for key in RESUMED_SETTINGS:
        if earlier.get("settings", {}).get(key) != document["settings"][key]:
            raise AttributionArgumentError(
                f"{path} was made with {key}={earlier.get('settings', {}).get(key)!r}, not {document['settings'][key]!r}; "
                "rerun with the same settings or use another --output"
            )
    return {(s["task"], s["length"], s["index"]): s for s in earlier.get("samples", [])}


def check_lengths(lm, samples: list[Sample], settings: Settings) -> None:
    """Every prompt plus its answer must fit the model's max_length: cut from the left, a prompt
    would lose its needles."""
    for sample in samples:
        tokens = len(lm.tok_encode(sample.prompt))
        budget = new_tokens(sample, settings)
        if tokens + budget > lm.max_length:
            raise AttributionArgumentError(
                f"{sample.task} at {sample.length}: a prompt of {tokens} tokens plus {budget} answer tokens exceeds the "
                f"model's max_length={lm.max_length}; pass max_length=N in its model_args (hf takes it from the "
                "checkpoint's max_position_embeddings)"
            )


def new_tokens(sample: Sample, settings: Settings) -> int:
    """Tokens to generate: MQRAR's answer tokens, else the task's budget or --max_new_tokens."""
    if sample.generator == "mqrar" or settings.max_new_tokens is None:
        return sample.max_new_tokens
    return min(sample.max_new_tokens, settings.max_new_tokens)


def attribute_batch(lm, recorder: AnswerSpanMass, batch: list[Sample], settings: Settings) -> list[dict]:
    """Greedy answers to a batch of samples and their attribution, one JSON entry per sample."""
    input_ids, attention_mask = lm.tok_batch_encode([sample.prompt for sample in batch])
    layouts = []
    for row, sample in enumerate(batch):
        row_ids = input_ids[row][attention_mask[row].bool()].tolist()
        try:
            layouts.append(prompt_layout(lm.tokenizer, sample.generator, sample.prompt, sample.answers, row_ids))
        except AttributionError as error:
            raise AttributionError(f"{sample.task} at {sample.length}, sample {sample.index}: {error}") from None
    span_indices, num_spans = batch_span_indices(layouts, attention_mask)
    budget = max(new_tokens(sample, settings) for sample in batch)
    steps = budget if settings.answer_tokens is None else min(budget, settings.answer_tokens)
    recorder.start(span_indices.to(lm.device), num_spans, steps)
    try:
        with torch.no_grad():
            generated = lm.model.generate(
                input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device), max_new_tokens=budget,
                do_sample=False, pad_token_id=lm.tokenizer.pad_token_id, eos_token_id=lm.eot_token_id,
            )
    finally:
        recorded = recorder.finish()
    if recorded.mass.shape[0] == 0:
        raise AttributionError("no forward pass reached the prompts' last position: the attention was not observed")
    records = []
    for row, (sample, layout) in enumerate(zip(batch, layouts)):
        ids = answer_ids(generated[row, input_ids.shape[1] :].tolist(), new_tokens(sample, settings), lm.eot_token_id)
        tokens = [lm.tok_decode([token], skip_special_tokens=False) for token in ids]
        prediction = lm.tok_decode(ids)
        if sample.generator == "mqrar":
            expected = lm.tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"]
            correct = ids == expected
            answer = {"prediction": prediction, "score": 100.0 * correct, "correct": correct, "found": [correct]}
        else:
            answer = ruler_answer(prediction, sample.answers)
        records.append(sample_record(sample.identity(), layout, recorded.mass[:, row, ..., : layout.num_spans], recorded.remainder[:, row], answer, tokens))
    return records


def answer_ids(generated: list[int], budget: int, end_of_text: int) -> list[int]:
    """A row's answer: its first `budget` generated tokens, up to and including end-of-text."""
    ids = generated[:budget]
    return ids[: ids.index(end_of_text) + 1] if end_of_text in ids else ids


def write_document(path: Path, document: dict, settings: Settings) -> None:
    document["summary"] = summarize(document["samples"], settings.threshold)
    write_atomically(path, (json.dumps(document) + "\n").encode())
