"""Where the offline corpora live and how the generators read them.

Nothing here downloads: `sb-eval data fetch` (sb_eval.data) writes the files, these functions read
them. The essays are copyrighted, so they are read at run time from the user's data directory and
never shipped with the package.
"""

from __future__ import annotations

import hashlib
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


class CorruptCorpusError(ValueError):
    """A corpus file that is not what `sb-eval data fetch` writes (cut off, overwritten); the
    message names the file and the command that restores it."""


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
    text = _json_field(path, "text")
    if not isinstance(text, str) or not text.strip():
        raise CorruptCorpusError(f"{path}: field 'text' must be a non-empty string; refetch it with: {fetch_command(ESSAYS)}")
    return re.sub(r"\s+", " ", text)


@lru_cache(maxsize=4)
def _read_sentences(path: str, size: int, mtime_ns: int) -> list[str]:
    """Cached per file version (size and mtime are part of the key)."""
    sentences = _json_field(path, "sentences")
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) for s in sentences):
        raise CorruptCorpusError(
            f"{path}: field 'sentences' must be a non-empty list of strings; "
            f"refetch it with: {fetch_command(ESSAYS)}"
        )
    return sentences


def _json_field(path: str, field: str):
    """A field of the essay file's JSON object; CorruptCorpusError for a file that is none."""
    try:
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptCorpusError(f"{path} is not the JSON file sb-eval wrote ({type(error).__name__}: cut off or "
                                 f"overwritten?); refetch it with: {fetch_command(ESSAYS)}") from None
    if not isinstance(document, dict):
        raise CorruptCorpusError(f"{path} holds a JSON {type(document).__name__}, not an object with {field!r}; "
                                 f"refetch it with: {fetch_command(ESSAYS)}")
    return document.get(field)


def corpus_fingerprint() -> str:
    """A short hash of the essay files in the data directory (size, time and content), or
    "absent": part of the sample cache's keys, so that samples of a refetched or changed corpus
    are made again."""
    parts = []
    for relative in (ESSAY_TEXT_FILE, ESSAY_SENTENCES_FILE):
        path = data_dir() / relative
        if path.is_file():
            parts.append(file_sha256(path))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16] if parts else "absent"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read once per version of the file (size and time)."""
    stat = os.stat(path)
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
