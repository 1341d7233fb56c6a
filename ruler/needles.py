"""Where a sample's needles sit in its prompt: character spans found from the prompt text and the
sample's answers, with the generators' own templates.

- `niah`: every sentence of the needle template (niah.NEEDLE) in the context. Those whose value is
  an answer are the needles, in the order of the answers; the others (multi-key distractors, the
  needle haystack) are distractors.
- `variable_tracking`: the statements "VAR NAME = ..." of the task's context (after its solved
  example). Those that assign an answer's name are the needles, in the order of the answers (the
  chain: its value first); the statements of other chains are distractors.
- `mqrar`: the query is the last key symbol; the needle is that key's most recent assignment
  "key value" before it, whose value is the answer; its earlier assignments are distractors.

The question is, for the RULER generators, the text after the prompt's last newline (the question
and the answer prefix), and for MQRAR the query key. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import mqrar, niah, variable_tracking

GENERATORS = ("niah", "variable_tracking", "mqrar")


class NeedleNotFoundError(ValueError):
    """A prompt in which an answer's needle is not where its generator puts it."""


@dataclass(frozen=True)
class Needle:
    start: int  # characters of the prompt, [start, end)
    end: int
    answer: str  # the answer it holds


@dataclass(frozen=True)
class PromptSpans:
    needles: list[Needle]  # one per answer, in the answers' order
    distractors: list[tuple[int, int]]  # character spans of same-form statements that answer nothing
    question: tuple[int, int]


def locate(generator: str, prompt: str, answers: list[str]) -> PromptSpans:
    """The spans of a prompt made by `generator` (one of GENERATORS) whose expected answers are
    `answers`; raises NeedleNotFoundError when an answer's needle is not in the prompt."""
    if generator == "niah":
        return _niah(prompt, answers)
    if generator == "variable_tracking":
        return _variable_tracking(prompt, answers)
    if generator == "mqrar":
        return _mqrar(prompt, answers)
    raise ValueError(f"no needle locator for generator {generator!r}; valid: {', '.join(GENERATORS)}")


def template_pattern(template: str, groups: dict[str, str]) -> re.Pattern:
    """A regular expression for `template`'s text with each {field} replaced by the pattern that
    `groups` gives it, captured under the field's name."""
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(part) if index % 2 == 0 else f"(?P<{part}>{groups[part]})" for index, part in enumerate(parts)))


NIAH_NEEDLE = template_pattern(niah.NEEDLE, {"type_needle_v": r"\w+", "key": r"[^\n]+?", "value": r"[^\s.]+"})
# variable_tracking's statements: "VAR NAME = 12345" and "VAR LATER = VAR EARLIER "
VT_STATEMENT = re.compile(r"VAR (?P<name>[A-Z]+) = (?:VAR [A-Z]+ |\d+)")
VT_TASK_START = variable_tracking.TEMPLATE.partition("{context}")[0]
MQRAR_SYMBOL = re.compile(r"\S+")


def _question(prompt: str) -> tuple[int, int]:
    start = prompt.rfind("\n") + 1
    if start == 0:
        raise NeedleNotFoundError("the prompt has no newline before its question")
    return start, len(prompt)


def _niah(prompt: str, answers: list[str]) -> PromptSpans:
    question = _question(prompt)
    found = list(NIAH_NEEDLE.finditer(prompt, 0, question[0]))
    return _answer_spans(found, "value", answers, question,
                         "no needle sentence holds the answer(s)", "needle sentences in the prompt")


def _variable_tracking(prompt: str, answers: list[str]) -> PromptSpans:
    task_start = prompt.rfind(VT_TASK_START)
    if task_start < 0:
        raise NeedleNotFoundError("the prompt does not hold variable tracking's task text")
    question = _question(prompt)
    statements = list(VT_STATEMENT.finditer(prompt, task_start, question[0]))
    return _answer_spans(statements, "name", answers, question, "no statement assigns the variable(s)", "statements in the task")


def _answer_spans(
    matches: list[re.Match], group: str, answers: list[str], question: tuple[int, int], missing: str, counted: str
) -> PromptSpans:
    """The first match whose `group` is each answer is its needle; matches of no answer are
    distractors. Answers that no match holds are an error: `missing`, the answers, and the number
    of matches (`counted` says what they are)."""
    by_answer = {}
    for match in matches:
        by_answer.setdefault(match[group], match)
    absent = [answer for answer in answers if answer not in by_answer]
    if absent:
        raise NeedleNotFoundError(f"{missing} {absent} ({len(matches)} {counted})")
    needles = [Needle(by_answer[answer].start(), by_answer[answer].end(), answer) for answer in answers]
    distractors = [match.span() for match in matches if match[group] not in answers]
    return PromptSpans(needles, distractors, question)


def _mqrar(prompt: str, answers: list[str]) -> PromptSpans:
    if len(answers) != 1:
        raise NeedleNotFoundError(f"an MQRAR query has one answer, got {answers}")
    symbols = list(MQRAR_SYMBOL.finditer(prompt))
    if len(symbols) % 2 == 0 or not symbols[-1][0].startswith(mqrar.KEY_PREFIX):
        raise NeedleNotFoundError("an MQRAR prompt alternates key and value symbols and ends with a query key")
    query = symbols[-1]
    # keys sit at even symbol positions; each is followed by the value it is assigned
    assignments = [(symbols[i], symbols[i + 1]) for i in range(0, len(symbols) - 1, 2) if symbols[i][0] == query[0]]
    if not assignments:
        raise NeedleNotFoundError(f"the query key {query[0]} is never assigned before it")
    key, value = assignments[-1]
    if value[0] != answers[0]:
        raise NeedleNotFoundError(f"the query key {query[0]} last holds {value[0]}, not the answer {answers[0]}")
    distractors = [(stale_key.start(), stale_value.end()) for stale_key, stale_value in assignments[:-1]]
    return PromptSpans([Needle(key.start(), value.end(), answers[0])], distractors, query.span())
