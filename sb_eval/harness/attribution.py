"""The measuring behind `sb-eval attribution` (sb_eval.commands.attribution) and sb_hf's
`attribution=PATH` model argument: where each head looked when the model answered a RULER or MQRAR
sample.

Each model's tokenizer fits the samples (sb_eval.ruler.generate, sb_eval.ruler.mqrar); the needles
are found in each prompt from its generator's templates (sb_eval.ruler.needles) and mapped to
tokens through the tokenizer's offsets; the model answers greedily while the attention of each
answering query is split over the spans (sb_eval.analysis.attribution); the answer is scored as
the task scores it. A model's result is a JSON document (docs/attribution.md has its schema),
rewritten after every batch so that a rerun resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from sb_eval.analysis.attribution import (
    CONTEXT,
    FIRST_NEEDLE,
    AnswerSpanMass,
    RecordedSpanMass,
    answer_steps,
    collecting_span_mass,
    prompt_span_indices,
    summarize,
    token_ranges,
)
from sb_eval.files import write_atomically
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.ruler import mqrar
from sb_eval.ruler.fitting import TooShortError
from sb_eval.ruler.generate import generate
from sb_eval.ruler.needles import NeedleNotFoundError, locate
from sb_eval.ruler.registry import TASKS
from sb_eval.ruler.scoring import string_match_all
from sb_eval.tasks.task_files import RULER_GROUPS, RULER_TASKS

from .sweep import ModelSpec, SweepArgumentError, model_class, parse_lengths, split_model_spec

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MODELS = ("sb_hf", "hf")
MQRAR_TASK = "mqrar"
# The settings a model's JSON must share with a run that resumes it.
RESUMED_SETTINGS = ("seed", "answer_tokens", "max_new_tokens", "mqrar_pairs")


class AttributionArgumentError(ValueError):
    """An argument of `sb-eval attribution` that cannot work; the message says what is valid."""


class AttributionError(ValueError):
    """A sample whose needles cannot be attributed (not found in its prompt, cut away)."""


# ---------------------------------------------------------------------------------------------
# Samples and where their spans sit.


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


@dataclass
class PromptLayout:
    """Where a prompt's spans sit among the real tokens of its row of a batch (padding excluded):
    each real token's span index, and per needle its tokens [first, end) and answer."""

    span_indices: list[int]
    needles: list[tuple[int, int, str]]
    question: tuple[int, int]
    distractor_tokens: int

    @property
    def num_spans(self) -> int:
        return FIRST_NEEDLE + len(self.needles)


def prompt_layout(tokenizer, generator: str, prompt: str, answers: list[str], row_ids: list[int]) -> PromptLayout:
    """The layout of `prompt` in a row whose real (unpadded) token ids are row_ids: the prompt's
    tokens without special tokens, after any special tokens the encoding put first, or their last
    ones when the row was cut from the left. Raises AttributionError when the ids do not match
    or a needle was cut away."""
    try:
        spans = locate(generator, prompt, answers)
    except NeedleNotFoundError as error:
        raise AttributionError(str(error)) from None
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    content = encoding["input_ids"]
    kept = min(len(content), len(row_ids))
    if content[len(content) - kept :] != row_ids[len(row_ids) - kept :]:
        raise AttributionError("the prompt's tokens with offsets do not match the tokens the model was given")
    shift = len(row_ids) - len(content)  # row position of the prompt's token 0 (< 0: cut)
    ranges = token_ranges(encoding["offset_mapping"], [spans.question] + spans.distractors + [(n.start, n.end) for n in spans.needles])

    def in_row(first: int, end: int) -> tuple[int, int]:
        return max(0, first + shift), max(0, end + shift)

    question, *rest = [in_row(*r) for r in ranges]
    distractors, needles = rest[: len(spans.distractors)], rest[len(spans.distractors) :]
    if any(first == end for first, end in needles):
        raise AttributionError(f"a needle was cut away with the prompt's first {-shift} tokens")
    return PromptLayout(
        prompt_span_indices(len(row_ids), question, distractors, needles),
        [(first, end, needle.answer) for (first, end), needle in zip(needles, spans.needles)],
        question,
        sum(end - first for first, end in distractors),
    )


def batch_span_indices(layouts: list[PromptLayout | None], attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[B, width] span indices of a left-padded batch (padding and rows without a layout:
    CONTEXT) and the number of spans the batch needs."""
    indices = torch.full(attention_mask.shape, CONTEXT, dtype=torch.int32)
    for row, layout in enumerate(layouts):
        if layout is not None:
            real = int(attention_mask[row].sum())
            indices[row, attention_mask.shape[1] - real :] = torch.tensor(layout.span_indices, dtype=torch.int32)
    return indices, max((layout.num_spans for layout in layouts if layout is not None), default=FIRST_NEEDLE)


def sample_record(sample: Sample | dict, layout: PromptLayout, mass: torch.Tensor, remainder: torch.Tensor,
                  answer: dict, tokens: list[str]) -> dict:
    """A sample's JSON entry: `sample` (a Sample, or lm-eval's task, length and index), its
    layout, its recorded mass [steps, L, H, spans] and remainder [steps, L, H], `answer` (the
    prediction, score, correct and found per answer) and the tokens the steps produced."""
    prompt_tokens = len(layout.span_indices)
    info = asdict(sample) if isinstance(sample, Sample) else dict(sample)
    for dropped in ("prompt", "generator", "max_new_tokens"):
        info.pop(dropped, None)
    needles = [
        {"answer": text, "found": found, "tokens": [first, end], "depth": round(first / prompt_tokens, 4)}
        for (first, end, text), found in zip(layout.needles, answer["found"])
    ]
    return {
        **info,
        "prompt_tokens": prompt_tokens,
        "prediction": answer["prediction"],
        "score": answer["score"],
        "correct": answer["correct"],
        "depth": needles[0]["depth"],
        "needles": needles,
        "question_tokens": list(layout.question),
        "distractor_tokens": layout.distractor_tokens,
        "steps": answer_steps(mass, remainder, len(needles), tokens),
    }


def ruler_answer(prediction: str, answers: list[str]) -> dict:
    """RULER's scoring: string_match_all over every answer, and each answer on its own."""
    score = string_match_all(prediction, answers)
    found = [string_match_all(prediction, [answer]) == 100.0 for answer in answers]
    return {"prediction": prediction, "score": score, "correct": all(found), "found": found}


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
    models = [ModelSpec(args.model, args.model_args)] + ([parse_model_spec(args.compare)] if args.compare else [])
    arguments = [model_arguments(model, args) for model in models]
    return models, arguments, labels(models), settings


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


def parse_model_spec(spec: str) -> ModelSpec:
    model = split_model_spec(spec)
    if model is None or model.name not in MODELS:
        raise AttributionArgumentError(
            f"--compare {spec!r} must be NAME:ARGS with NAME one of {', '.join(MODELS)}, e.g. "
            "hf:pretrained=/path/to/softmax-model or sb_hf:pretrained=/path/to/checkpoint"
        )
    return model


def model_arguments(model: ModelSpec, args: argparse.Namespace) -> dict:
    """The model's constructor arguments: its model_args (a local pretrained folder; sb_hf may
    leave it out for the default checkpoint) with --device and --dtype applied."""
    try:
        arguments = simple_parse_args_string(model.args)
    except ValueError as error:
        raise AttributionArgumentError(f"model arguments {model.args!r} of {model.name}: {error}") from None
    if "pretrained" not in arguments and model.name != "sb_hf":
        raise AttributionArgumentError(f"model arguments {model.args!r} of {model.name} need pretrained=PATH")
    if "pretrained" in arguments and not Path(str(arguments["pretrained"])).expanduser().is_dir():
        raise AttributionArgumentError(
            f"pretrained={arguments['pretrained']} of {model.name} is not a local folder; sb-eval downloads "
            "nothing: save the model to a folder first and pass that folder"
        )
    arguments["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype:
        arguments["dtype"] = args.dtype
    return arguments


def labels(models: list[ModelSpec]) -> list[str]:
    """File-name labels NAME-FOLDER (sb_hf without pretrained: NAME-default_model), numbered
    where two models would share one."""
    names = []
    for model in models:
        pretrained = simple_parse_args_string(model.args).get("pretrained")
        folder = Path(str(pretrained)).expanduser().resolve().name if pretrained else "default_model"
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name}-{folder}").strip("-")
        names.append(label if label not in names else f"{label}-{len(names) + 1}")
    return names


def attribute_model(model: ModelSpec, arguments: dict, label: str, settings: Settings, output: Path) -> dict:
    """Every (task, length) of the settings for one model, shortest length first; returns its JSON
    document, which is also written to OUTPUT/<label>.json after every batch. Samples the file
    already holds (made with the same settings) are kept, not rerun."""
    path = output / f"{label}.json"
    lm = model_class(model.name)(**arguments)
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
        write_document(path, document, settings)
        return document
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
        records.append(sample_record(sample, layout, recorded.mass[:, row, ..., : layout.num_spans], recorded.remainder[:, row], answer, tokens))
    return records


def answer_ids(generated: list[int], budget: int, end_of_text: int) -> list[int]:
    """A row's answer: its first `budget` generated tokens, up to and including end-of-text."""
    ids = generated[:budget]
    return ids[: ids.index(end_of_text) + 1] if end_of_text in ids else ids


def write_document(path: Path, document: dict, settings: Settings) -> None:
    document["summary"] = summarize(document["samples"], settings.threshold)
    write_atomically(path, (json.dumps(document) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# sb_hf's attribution=PATH: the same inside an lm-eval run.


class AttributionRecorder:
    """Attributes the answers of sb_hf's generate_until requests of RULER tasks (the lm-eval task
    names of sb_eval.tasks.task_files) and keeps them in a JSON file, rewritten after every
    generate_until call. Requests of other tasks are answered as usual and not attributed.

    The answer steps' tokens are the answer re-tokenized: lm-eval hands back text."""

    def __init__(self, lm, path: str | Path, info: dict, answer_tokens: int) -> None:
        self.lm, self.path, self.answer_tokens = lm, Path(path), answer_tokens
        config = lm.model.config
        self.document = {
            "schema_version": SCHEMA_VERSION, **info, "attention": "stick-breaking",
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads, "samples": [],
        }
        self._collection = ExitStack()
        self.recorder = self._collection.enter_context(collecting_span_mass(lm.model))
        self._expected: dict[str, list] = {}  # context -> requests of the generate_until call
        self._armed: list[tuple[str, PromptLayout | None]] | None = None
        self._answered: dict[str, list[tuple[PromptLayout, RecordedSpanMass, int]]] = {}
        self._skipped: set[str] = set()
        self.write()

    def expect(self, requests: list) -> None:
        """The requests of a generate_until call, before lm-eval encodes them."""
        for request in requests:
            if request.task_name in RULER_TASKS:
                self._expected.setdefault(request.args[0], []).append(request)
            elif request.task_name not in self._skipped:
                self._skipped.add(request.task_name)
                logger.warning("attribution covers RULER's tasks; %s is answered without it", request.task_name)

    def arm(self, contexts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """A batch is encoded and about to be generated: the previous batch's generation is over."""
        self._collect()
        layouts = []
        for row, context in enumerate(contexts):
            request = (self._expected.get(context) or [None])[0]
            layout = None
            if request is not None:
                generator = TASKS[RULER_TASKS[request.task_name]].generator
                row_ids = input_ids[row][attention_mask[row].bool()].tolist()
                try:
                    layout = prompt_layout(self.lm.tokenizer, generator, context, list(request.doc["outputs"]), row_ids)
                except AttributionError as error:
                    logger.warning("%s, sample %s: not attributed: %s", request.task_name, request.doc.get("index"), error)
            layouts.append(layout)
        self._armed = list(zip(contexts, layouts))
        span_indices, num_spans = batch_span_indices(layouts, attention_mask)
        self.recorder.start(span_indices.to(self.lm.device), num_spans, self.answer_tokens)

    def _collect(self) -> None:
        if self._armed is None:
            return
        recorded = self.recorder.finish()
        for row, (context, layout) in enumerate(self._armed):
            if layout is not None and recorded.mass.shape[0] > 0:
                self._answered.setdefault(context, []).append((layout, recorded, row))
        self._armed = None

    def answered(self, requests: list, results: list[str]) -> None:
        """The generate_until call is over: records each attributed request with its answer."""
        self._collect()
        self._expected.clear()
        for request, prediction in zip(requests, results):
            pending = self._answered.get(request.args[0])
            if request.task_name not in RULER_TASKS or not pending:
                continue
            layout, recorded, row = pending.pop(0)
            doc = request.doc
            # an answer cut at once by a stop sequence still had its first step
            tokens = [self.lm.tok_decode([t]) for t in self.lm.tok_encode(prediction)] or [""]
            sample = {"task": request.task_name, "length": doc["max_length"], "index": doc["index"], "answers": list(doc["outputs"])}
            self.document["samples"].append(sample_record(
                sample, layout, recorded.mass[:, row, ..., : layout.num_spans], recorded.remainder[:, row],
                ruler_answer(prediction, list(doc["outputs"])), tokens,
            ))
        self.write()

    def write(self) -> None:
        write_atomically(self.path, (json.dumps(self.document, default=str) + "\n").encode())

    def close(self) -> None:
        """Writes the file a last time and stops attributing; the model is left as it was."""
        self.write()
        self._collection.close()

