"""`documents(source)`: the documents of a fetched corpus, of local files or of a `datasets`
dataset, each one string."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sb_eval.ruler.corpora import LONG_DOCUMENTS, MissingCorpusError, data_dir, fetch_command

from .corpora import CORPORA
from .datasets_cache import load_cached_dataset


class DocumentSourceError(ValueError):
    """A document source that names nothing readable, or that could not be loaded."""


HF_PREFIX = "hf:"
SOURCE_JOINER = "+"
DEFAULT_HF_SPLIT = "test"
# Columns tried, in order, for a dataset's document text ("page": Wikitext's document-level form).
HF_TEXT_COLUMNS = ("text", "page")


def documents(source: str) -> list[str]:
    """The documents of `source`, in order, each one string:

    - the name of a fetched document corpus (`sb-eval data list`; "aa-lcr": 30 long reports,
      "books": 7 novels);
    - a .txt file (one document), a .jsonl file (one JSON object a line, its "text" one document)
      or a folder of such files (its own files only, in name order);
    - "hf:NAME[:CONFIG[:SPLIT]]": a dataset through `datasets` (from its cache, or the network
      where there is one), split "test" unless given, the column "text" or "page", else its only
      string column;
    - several of these joined by "+" ("aa-lcr+books"): their documents one source after another
      (a path that exists is read as one source, "+" and all).

    Raises MissingCorpusError (with the fetch command) for a corpus not fetched yet, and
    DocumentSourceError, listing what is valid, for anything else it cannot read.
    """
    if not isinstance(source, str) or not source:
        raise DocumentSourceError(f"document source {source!r} must be a non-empty string; {_VALID_SOURCES}")
    path = Path(source).expanduser()
    if SOURCE_JOINER in source and not path.exists():
        return [text for part in source.split(SOURCE_JOINER) for text in documents(part)]
    if source.startswith(HF_PREFIX):
        return _hf_documents(source)
    if source in CORPORA:
        return _corpus_documents(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _DOCUMENT_READERS)
        if not files:
            raise DocumentSourceError(f"document source {source}: the folder has no .txt or .jsonl files; {_VALID_SOURCES}")
        return [text for file in files for text in _DOCUMENT_READERS[file.suffix](file)]
    if path.is_file() and path.suffix in _DOCUMENT_READERS:
        return _DOCUMENT_READERS[path.suffix](path)
    problem = "is not a .txt or .jsonl file" if path.is_file() else "is neither a corpus name nor an existing file or folder"
    raise DocumentSourceError(f"document source {source!r} {problem}; {_VALID_SOURCES}")


def _corpus_documents(name: str) -> list[str]:
    corpus = CORPORA[name]
    if corpus.documents is None:
        raise DocumentSourceError(f"corpus {name!r} is not a document corpus; {_VALID_SOURCES}")
    path = data_dir() / corpus.documents
    if not path.is_file():
        raise MissingCorpusError(f"The document corpus {name} is not in {path.parent}. Fetch it once with: {fetch_command(name)}")
    return _jsonl_documents(path)


def _text_document(path: Path) -> list[str]:
    return [path.read_text(encoding="utf-8")]


def _jsonl_documents(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DocumentSourceError(f"{path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DocumentSourceError(f'{path}, line {number}: expected a JSON object with a string field "text"')
            texts.append(record["text"])
    return texts


_DOCUMENT_READERS: dict[str, Callable[[Path], list[str]]] = {".txt": _text_document, ".jsonl": _jsonl_documents}


def _hf_documents(source: str) -> list[str]:
    name, config, split, *extra = source[len(HF_PREFIX) :].split(":") + [None, None]
    if not name or any(extra):
        raise DocumentSourceError(f"document source {source!r} must read hf:NAME[:CONFIG[:SPLIT]]; {_VALID_SOURCES}")
    split = split or DEFAULT_HF_SPLIT
    try:
        dataset = load_cached_dataset(name, config or None, split)
    except Exception as error:  # datasets raises many kinds (not cached, missing config, split, ...)
        raise DocumentSourceError(
            f"could not load document source {source!r} from the datasets cache (dataset {name!r}, config "
            f"{config!r}, split {split!r}): {type(error).__name__}: {error}. sb-eval reads only what datasets "
            f"has cached and downloads nothing: cache it once where there is a network "
            f"(datasets.load_dataset({name!r}, {config!r}, split={split!r})), fetch a corpus instead "
            f"({fetch_command(LONG_DOCUMENTS)}) or pass a folder of .txt / .jsonl files."
        ) from error
    strings = [column for column, feature in dataset.features.items() if getattr(feature, "dtype", None) == "string"]
    column = next((c for c in HF_TEXT_COLUMNS if c in strings), strings[0] if len(strings) == 1 else None)
    if column is None:
        raise DocumentSourceError(
            f"document source {source!r}: no text column; expected one of {', '.join(HF_TEXT_COLUMNS)} "
            f"or a single string column, found {', '.join(dataset.column_names)}"
        )
    return list(dataset[column])


_VALID_SOURCES = (
    "valid: a fetched document corpus ("
    + ", ".join(name for name, corpus in CORPORA.items() if corpus.documents is not None)
    + "), a .txt or .jsonl file or a folder of them, or hf:NAME[:CONFIG[:SPLIT]]; several joined by '+'"
)

