"""RULER's question answering (scripts/data/synthetic/qa.py): QA-1 on SQuAD, QA-2 on HotpotQA.

Sample i asks the data set's i-th answerable question over documents: the question's own
(SQuAD: its paragraph; HotpotQA: its ten context paragraphs), then others of the same article
(SQuAD), then random others, as many as the length holds, in RULER's order for that many
documents. Any one reference answer found in the reply counts (string_match_part).

The data is read as RULER reads it, from the JSON files RULER downloads: SQuAD v2.0's dev set
(`dev-v2.0.json`) and HotpotQA's dev set in the distractor setting
(`hotpot_dev_distractor_v1.json`). Nothing here downloads; sb_eval.tasks.ruler_qa finds them.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .corpora import MissingCorpusError, file_sha256
from .fitting import Draft
from .reference_random import shuffled_as_ruler
from .registry import Sampler, register_generator
from .sizing import ReferenceCounter, ReferenceSize, SizingTarget, reference_search, stepped_size
from .tokens import TokenCounter

TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
ANSWER_PREFIX = " Answer:"
DOCUMENT = "Document {number}:\n"
DOCUMENT_SEPARATOR = "\n\n"
# RULER's search step, in documents.
STEP = 10
# What each data set is, for errors that say what to pass.
DATASETS = {
    "squad": "SQuAD v2.0's dev set (dev-v2.0.json)",
    "hotpotqa": "HotpotQA's dev set, distractor setting (hotpot_dev_distractor_v1.json)",
}


@dataclass(frozen=True)
class Question:
    query: str
    outputs: list[str]
    documents: list[int]  # the question's own documents (indices into the document list)
    related: list[int]  # documents of the same article (SQuAD), drawn before any other


@register_generator("qa")
def qa(set_rng: random.Random, target: SizingTarget, *, dataset: str, data_file: str | None = None, data_sha256: str | None = None) -> Sampler:
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not a RULER QA data set; valid: {sorted(DATASETS)}")
    if data_file is None:
        raise MissingCorpusError(f"RULER's QA on {dataset} needs {DATASETS[dataset]}: pass data_file=PATH to it")
    questions, documents = read_questions(dataset, data_file, data_sha256)
    template_head, _, template_tail = TEMPLATE.partition("{context}")

    def draw(rng: random.Random, index: int) -> Draft:
        if index >= len(questions):
            raise ValueError(f"{data_file} holds {len(questions)} answerable questions; ask for at most that many samples")
        question = questions[index]
        gold = {documents[i] for i in question.documents}
        haystack = Documents(documents, question, rng, target.seed)
        return Draft(
            template_head,
            template_tail.format(query=question.query),
            ANSWER_PREFIX,
            question.outputs,
            haystack,
            min_units=2 * len(question.documents),
            answers_in=gold.__contains__,
        )

    def reference_size() -> ReferenceSize:
        def search(counter: ReferenceCounter) -> ReferenceSize:
            rng = random.Random(target.seed)
            question = questions[0]
            excluded = set(question.documents + question.related)
            others = [i for i in range(len(documents)) if i not in excluded]

            def tokens_at(size: int, threshold: int) -> int:
                if size < len(documents):
                    if size - len(question.documents) > len(question.related):
                        drawn = rng.sample(others, size - len(question.documents) - len(question.related))
                        chosen = question.documents + question.related + drawn
                    else:
                        chosen = question.documents + rng.sample(question.related, size - len(question.documents))
                    texts = [documents[i] for i in chosen]
                else:
                    texts = list(documents)
                ending = [template_tail.format(query=question.query), ANSWER_PREFIX + f" {question.outputs}"]
                return counter.tokens(size, threshold, lambda: (template_head, _labelled(shuffled_as_ruler(texts, target.seed)) + ending))

            units = stepped_size(tokens_at, target, STEP, most=len(documents))
            return ReferenceSize(units, STEP, target.max_seq_length - target.tokens_to_generate, target.max_seq_length)

        return reference_search(search, target.counter)

    return Sampler(draw, reference_size)


class Documents:
    """One question's documents: its own, then related ones in a random order, then random others
    drawn as far as asked; a context of `count` of them is the first `count` in RULER's order
    for that many. Units are the labels and the documents ("Document 1:\\n", text, "\\n\\nDocument
    2:\\n", ...; no separator), so that each document is tokenized once across samples."""

    separator = ""

    def __init__(self, documents: list[str], question: Question, rng: random.Random, seed: int):
        self.documents, self.seed, self._rng = documents, seed, rng
        self._order = question.documents + rng.sample(question.related, len(question.related))
        self._taken = set(self._order)

    def take(self, count: int) -> list[str]:
        if count >= len(self.documents):
            return _labelled(shuffled_as_ruler(self.documents, self.seed))
        self._grow(count)
        return _labelled(shuffled_as_ruler([self.documents[i] for i in self._order[:count]], self.seed))

    def fill(self, budget: int, counter: TokenCounter) -> list[str]:
        """The most documents whose texts and labels fit `budget` tokens."""
        total, count = 0, 0
        while count < len(self.documents):
            self._grow(count + 1)
            label = DOCUMENT.format(number=count + 1)
            more = sum(counter.pieces([label if count == 0 else DOCUMENT_SEPARATOR + label, self.documents[self._order[count]]]))
            if total + more > budget:
                break
            total, count = total + more, count + 1
        return self.take(count) if count else []

    def _grow(self, count: int) -> None:
        """Random other documents, distinct, until `count` are chosen."""
        while len(self._order) < min(count, len(self.documents)):
            index = self._rng.randrange(len(self.documents))
            if index not in self._taken:
                self._taken.add(index)
                self._order.append(index)


def _labelled(texts: list[str]) -> list[str]:
    """RULER's context as pieces: "Document 1:\\n", the first text, "\\n\\nDocument 2:\\n", ..."""
    pieces = []
    for number, text in enumerate(texts, start=1):
        pieces += [(DOCUMENT_SEPARATOR if number > 1 else "") + DOCUMENT.format(number=number), text]
    return pieces


def read_questions(dataset: str, path: str | os.PathLike, sha256: str | None = None) -> tuple[list[Question], list[str]]:
    """The answerable questions and the sorted distinct documents of `path`, as RULER reads them;
    `sha256`, when given, must be the file's."""
    path = Path(path)
    if not path.is_file():
        raise MissingCorpusError(f"data_file={path}: no such file ({DATASETS[dataset]})")
    stat = path.stat()
    return _read(dataset, str(path), stat.st_size, stat.st_mtime_ns, sha256)


@lru_cache(maxsize=4)
def _read(dataset: str, path: str, size: int, mtime_ns: int, sha256: str | None) -> tuple[list[Question], list[str]]:
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"{path} changed: its sha256 is not data_sha256={sha256}")
    try:
        data = json.loads(Path(path).read_bytes())
        return (_read_squad if dataset == "squad" else _read_hotpotqa)(data)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not {DATASETS[dataset]} in its JSON schema: {error!r}") from error


def _read_squad(data: dict) -> tuple[list[Question], list[str]]:
    """Every paragraph of every article is a document; a question's related documents are its
    article's other paragraphs; impossible questions are left out."""
    documents = sorted({paragraph["context"] for article in data["data"] for paragraph in article["paragraphs"]})
    index = {text: number for number, text in enumerate(documents)}
    questions = []
    for article in data["data"]:
        article_documents = [index[paragraph["context"]] for paragraph in article["paragraphs"]]
        for paragraph in article["paragraphs"]:
            own = index[paragraph["context"]]
            for qa in paragraph["qas"]:
                if not qa["is_impossible"]:
                    related = [number for number in article_documents if number != own]
                    questions.append(Question(qa["question"], [answer["text"] for answer in qa["answers"]], [own], related))
    return questions, documents


def _read_hotpotqa(data: list) -> tuple[list[Question], list[str]]:
    """Each context paragraph, "title\\nsentences joined", is a document; a question's own are
    its ten context paragraphs."""

    def document(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    documents = sorted({document(title, sentences) for item in data for title, sentences in item["context"]})
    index = {text: number for number, text in enumerate(documents)}
    questions = [
        Question(item["question"], [item["answer"]], [index[document(title, sentences)] for title, sentences in item["context"]], [])
        for item in data
    ]
    return questions, documents
