"""Where the offline corpora live and how the generators read them.

Nothing here downloads: `sb-eval data fetch` (sb_eval.data) writes the files, these functions read
them. The essays are copyrighted, so they are read at run time from the user's data directory and
never shipped with the package.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path

DATA_DIR_VARIABLE = "SB_EVAL_DATA_DIR"

# RULER's essay haystack: Paul Graham's essays as RULER ships them ({"text": ...}), and split into
# sentences as RULER splits them (punkt).
ESSAYS = "essays"
ESSAY_TEXT_FILE = Path("essays") / "PaulGrahamEssays.json"
ESSAY_SENTENCES_FILE = Path("essays") / "sentences.json"

# Long documents (75K-124K GPT-2 tokens each) for long-context perplexity: AA-LCR's contexts.
LONG_DOCUMENTS = "aa-lcr"

# Public-domain novels (6 by Jane Austen, and Moby Dick: 0.43M-1.2M characters, about 100K-320K
# tokens each), from the R data sets of two Debian packages: another long-document corpus.
BOOKS = "books"


class MissingCorpusError(FileNotFoundError):
    """A corpus a task needs has not been fetched into the data directory."""


def data_dir() -> Path:
    """$SB_EVAL_DATA_DIR, or ~/.cache/sb-eval."""
    configured = os.environ.get(DATA_DIR_VARIABLE)
    return Path(configured) if configured else Path.home() / ".cache" / "sb-eval"


def fetch_command(name: str) -> str:
    return f"sb-eval data fetch {name}"


def essay_sentences(path: str | os.PathLike | None = None) -> list[str]:
    """The essay corpus as a list of sentences, in RULER's order (the essays concatenated); or the
    sentences of another file of the same format, {"sentences": [...]}, at `path`."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"essay_file={path}: no such file (a JSON object {{\"sentences\": [...]}})")
    else:
        path = data_dir() / ESSAY_SENTENCES_FILE
        if not path.is_file():
            raise MissingCorpusError(
                f"The essay haystack needs the Paul Graham essay corpus, which is not in {path.parent}. "
                f"Fetch it once with: {fetch_command(ESSAYS)}"
            )
    stat = path.stat()
    return _read_sentences(str(path), stat.st_size, stat.st_mtime_ns)


def essay_text(path: str | os.PathLike | None = None) -> str:
    """The essays with whitespace runs collapsed to one space, as RULER cuts its haystack into
    words; for another sentences file at `path`, its sentences joined by spaces."""
    if path is not None:
        return " ".join(essay_sentences(path))
    path = data_dir() / ESSAY_TEXT_FILE
    if not path.is_file():
        raise MissingCorpusError(
            f"RULER's essay haystack sizes need the essay text {path}, which is not there. "
            f"Fetch it once with: {fetch_command(ESSAYS)}"
        )
    stat = path.stat()
    return _read_text(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_text(path: str, size: int, mtime_ns: int) -> str:
    with open(path, encoding="utf-8") as file:
        text = json.load(file).get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}: field 'text' must be a non-empty string; refetch it with: {fetch_command(ESSAYS)}")
    return re.sub(r"\s+", " ", text)


@lru_cache(maxsize=4)
def _read_sentences(path: str, size: int, mtime_ns: int) -> list[str]:
    """Cached per file version (size and mtime are part of the key)."""
    with open(path, encoding="utf-8") as file:
        sentences = json.load(file).get("sentences")
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError(
            f"{path}: field 'sentences' must be a non-empty list of strings; "
            f"refetch it with: {fetch_command(ESSAYS)}"
        )
    return sentences
