"""Attributed answers, shared by `sb-eval attribution` (sb_eval.harness.attribution) and sb_hf's
`attribution=PATH` model argument (AttributionRecorder, below): where a prompt's needles sit
among the tokens of its row of a batch, the span index of every key, and a sample's JSON entry
from its recorded span mass (sb_eval.analysis.attribution) and its scored answer.

A needle's characters are found from its generator's templates (sb_eval.ruler.needles) and
mapped to tokens through the tokenizer's offsets.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from sb_eval.analysis.attribution import (
    CONTEXT,
    FIRST_NEEDLE,
    RecordedSpanMass,
    answer_steps,
    collecting_span_mass,
    prompt_span_indices,
    token_ranges,
)
from sb_eval.files import write_atomically
from sb_eval.ruler.needles import NeedleNotFoundError, locate
from sb_eval.ruler.registry import TASKS
from sb_eval.ruler.scoring import string_match_all
from sb_eval.tasks.task_files import RULER_TASKS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class AttributionError(ValueError):
    """A sample whose needles cannot be attributed (not found in its prompt, cut away)."""


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


def sample_record(identity: dict, layout: PromptLayout, mass: torch.Tensor, remainder: torch.Tensor,
                  answer: dict, tokens: list[str]) -> dict:
    """A sample's JSON entry: `identity` (its task, length, index, answers and, for MQRAR,
    num_pairs), its layout, its recorded mass [steps, L, H, spans] and remainder [steps, L, H],
    `answer` (the prediction, score, correct and found per answer) and the tokens the steps
    produced."""
    prompt_tokens = len(layout.span_indices)
    needles = [
        {"answer": text, "found": found, "tokens": [first, end], "depth": round(first / prompt_tokens, 4)}
        for (first, end, text), found in zip(layout.needles, answer["found"])
    ]
    return {
        **identity,
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
