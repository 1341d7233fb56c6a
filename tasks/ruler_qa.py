"""The data RULER's QA tasks read: SQuAD v2.0's and HotpotQA's dev sets, as RULER's JSON files.

`qa_data_file(dataset, metadata)` finds one, in this order:

1. `--metadata '{"squad": PATH}'` (or `"hotpotqa"`): PATH is RULER's file itself (`dev-v2.0.json`,
   `hotpot_dev_distractor_v1.json`), or a folder holding the data set in `datasets`' form (written
   by `save_to_disk`, or files `datasets.load_dataset(PATH)` reads, with a validation split);
2. the file converted from `datasets` before, `<data dir>/qa/<dataset>.json`;
3. the Hub's copy (`rajpurkar/squad_v2`; `hotpotqa/hotpot_qa`, its distractor configuration),
   validation split, where `datasets` already holds it in its local cache (nothing is downloaded),
   written out as 2.

Rows of `datasets` are written back into RULER's schema, so that one reader
(sb_eval.ruler.qa) serves both; the file's sha256 goes into the generator's parameters, so that
cached sample sets follow the data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import datasets

from sb_eval.data.datasets_cache import load_cached_dataset
from sb_eval.files import write_atomically
from sb_eval.ruler.corpora import MissingCorpusError, data_dir, file_sha256
from sb_eval.ruler.qa import DATASETS

# dataset -> (Hub name, configuration, split)
HUB = {
    "squad": ("rajpurkar/squad_v2", None, "validation"),
    "hotpotqa": ("hotpotqa/hotpot_qa", "distractor", "validation"),
}
TASK_NAMES = {"squad": "sb_ruler_qa_1", "hotpotqa": "sb_ruler_qa_2"}


def qa_data_file(dataset: str, metadata: dict[str, Any]) -> tuple[Path, str]:
    """RULER's JSON file of `dataset` and its sha256 (see the module's docstring for the order)."""
    named = metadata.get(dataset)
    if named is not None:
        if not isinstance(named, str) or not named:
            raise ValueError(f"metadata {dataset}={named!r} must be a path: {_what_to_pass(dataset)}")
        path = Path(named)
        if path.is_file():
            return path, file_sha256(path)
        if path.is_dir():
            return _write(dataset, _rows_from_folder(dataset, path))
        raise FileNotFoundError(f"metadata {dataset}={named!r}: no such file or folder. {_what_to_pass(dataset)}")
    converted = converted_path(dataset)
    if converted.is_file():
        return converted, file_sha256(converted)
    name, configuration, split = HUB[dataset]
    try:
        rows = load_cached_dataset(name, configuration, split)
    except Exception as error:  # not cached, or a cache datasets cannot read: the same advice
        raise MissingCorpusError(
            f"{TASK_NAMES[dataset]} needs {DATASETS[dataset]}, which is neither passed nor in the datasets cache "
            f"({type(error).__name__}: {error}); sb-eval downloads nothing. {_what_to_pass(dataset)} "
            f"Where there is a network, datasets.load_dataset({name!r}, {configuration!r}, split={split!r})"
            ".save_to_disk(PATH) makes such a folder."
        ) from error
    return _write(dataset, rows)


def converted_path(dataset: str) -> Path:
    return data_dir() / "qa" / f"{dataset}.json"


def _what_to_pass(dataset: str) -> str:
    file = "dev-v2.0.json" if dataset == "squad" else "hotpot_dev_distractor_v1.json"
    return (
        f"Pass it with --metadata '{{\"{dataset}\": \"PATH\"}}', PATH being RULER's {file} or a folder holding "
        f"the data set for datasets (save_to_disk, or its files with a validation split)."
    )


def _rows_from_folder(dataset: str, folder: Path) -> datasets.Dataset:
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(str(folder))
    except Exception as error:
        raise ValueError(f"metadata {dataset}={str(folder)!r}: datasets cannot read this folder ({error}). {_what_to_pass(dataset)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if "validation" not in loaded:
            raise ValueError(f"metadata {dataset}={str(folder)!r} has splits {sorted(loaded)}, no validation split")
        loaded = loaded["validation"]
    return loaded


def _write(dataset: str, rows: datasets.Dataset) -> tuple[Path, str]:
    """`rows` in RULER's schema at converted_path(dataset)."""
    expected = {"squad": {"title", "context", "question", "answers"}, "hotpotqa": {"question", "answer", "context"}}[dataset]
    missing = expected - set(rows.column_names)
    if missing:
        raise ValueError(f"the {dataset} rows have no column {', '.join(sorted(missing))}: not {DATASETS[dataset]} in datasets' form")
    document = _squad_json(rows) if dataset == "squad" else _hotpotqa_json(rows)
    raw = json.dumps(document, ensure_ascii=False).encode("utf-8")
    path = converted_path(dataset)
    write_atomically(path, raw)
    return path, hashlib.sha256(raw).hexdigest()


def _squad_json(rows: datasets.Dataset) -> dict:
    """SQuAD v2.0's schema: articles by title, paragraphs by context, in the rows' order; a
    question without answers is impossible."""
    articles: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        paragraphs = articles.setdefault(row["title"], {})
        answers = [{"text": text, "answer_start": start} for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"])]
        paragraphs.setdefault(row["context"], []).append(
            {"id": row.get("id"), "question": row["question"], "answers": answers, "is_impossible": not answers}
        )
    return {
        "version": "v2.0",
        "data": [
            {"title": title, "paragraphs": [{"context": context, "qas": qas} for context, qas in paragraphs.items()]}
            for title, paragraphs in articles.items()
        ],
    }


def _hotpotqa_json(rows: datasets.Dataset) -> list[dict]:
    """HotpotQA's schema: context as [title, sentences] pairs."""
    return [
        {
            "_id": row.get("id"),
            "question": row["question"],
            "answer": row["answer"],
            "type": row.get("type"),
            "level": row.get("level"),
            "supporting_facts": [list(pair) for pair in zip(*(row.get("supporting_facts") or {"title": [], "sent_id": []}).values())],
            "context": [[title, list(sentences)] for title, sentences in zip(row["context"]["title"], row["context"]["sentences"])],
        }
        for row in rows
    ]
