"""sb_eval.tasks: the RULER YAMLs under lm-eval, the docs' worked examples, and an lm-eval run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import lm_eval.tasks
import pytest
import yaml
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import TaskIndex
from test_ruler_helpers import write_hotpotqa_standin, write_squad_standin, write_standin_essays
from tiny_models import write_tiny_llama
from transformers import AutoTokenizer

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.ruler.corpora import MissingCorpusError
from sb_eval.ruler.generate import generate
from sb_eval.ruler.qa import read_questions
from sb_eval.ruler.registry import GENERATORS, TASKS
from sb_eval.tasks import ruler_qa, ruler_tasks
from sb_eval.tokenization import byte_level_tokenizer

TASKS_DIR = Path(ruler_tasks.__file__).parent
DOCS = Path(__file__).parents[1] / "docs" / "adding-tasks.md"
NIAH_YAMLS = sorted(TASKS_DIR.glob("sb_niah_*.yaml"))


class _FunctionsAsText(yaml.SafeLoader):
    """Reads task YAMLs without importing the functions they name."""


_FunctionsAsText.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _task_config(path: Path) -> dict:
    config = yaml.load(path.read_text(), Loader=_FunctionsAsText)  # noqa: S506 (a SafeLoader)
    if "include" in config:
        return _task_config(path.parent / config.pop("include")) | config
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Llama with the byte-level tokenizer, saved like any local checkpoint."""
    return write_tiny_llama(
        tmp_path_factory.mktemp("checkpoint"), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
    )


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path))
    write_standin_essays(tmp_path)
    return tmp_path


def test_names_do_not_clash_with_lm_evals_own_tasks():
    configs = [_task_config(path) for path in TASKS_DIR.glob("[!_]*.yaml")]
    ours = {config.get("group") or config["task"] for config in configs}
    niah = {f"sb_{name}" for name in TASKS if name.startswith("niah_")}
    others = {f"sb_ruler_{name}" for name in TASKS if not name.startswith("niah_")}
    assert ours == niah | others | {"ruler_niah", "sb_ruler", "mqrar", "sb_ppl", "sb_wikitext"}
    # lm-eval's own folder alone: an installed sb-eval adds its tasks to every TaskManager
    lm_evals_own = TaskIndex().build([Path(lm_eval.tasks.__file__).parent])
    assert not ours & set(lm_evals_own)


def test_each_task_generates_as_much_as_ruler_and_the_groups_average_their_tasks():
    ruler_yamls = NIAH_YAMLS + sorted(TASKS_DIR.glob("sb_ruler_*.yaml"))
    assert len(ruler_yamls) == len(TASKS) == 13
    for path in ruler_yamls:
        config = _task_config(path)
        spec = TASKS[config["dataset_kwargs"]["ruler_task"]]
        assert config["generation_kwargs"]["max_gen_toks"] == spec.tokens_to_generate, path.name
        assert config["generation_kwargs"]["do_sample"] is False
    group = _task_config(TASKS_DIR / "ruler_niah.yaml")
    assert sorted(group["task"]) == sorted(path.stem for path in NIAH_YAMLS)
    assert sorted(_task_config(TASKS_DIR / "sb_ruler.yaml")["task"]) == sorted(path.stem for path in ruler_yamls)
    lengths = [m["metric"] for m in _task_config(NIAH_YAMLS[0])["metric_list"]]
    assert [m["metric"] for m in group["aggregate_metric_list"]] == lengths
    assert all(m["weight_by_size"] is False for m in group["aggregate_metric_list"])


def test_custom_dataset_reads_lengths_samples_seed_and_tokenizer_from_metadata(data_dir, checkpoint):
    metadata = dict(max_seq_lengths=[1024, 2048], num_samples=3, seed=5, pretrained=str(checkpoint), version=1.0, dtype="float32")
    docs = ruler_tasks.custom_dataset(ruler_task="niah_multikey_2", **metadata)["test"]
    assert docs["max_length"] == [1024, 2048] * 3
    same = generate("niah_multikey_2", 2048, byte_level_tokenizer(), 3, seed=5)
    assert [doc["input"] for doc in docs if doc["max_length"] == 2048] == [s["input"] for s in same]
    filled = ruler_tasks.custom_dataset(ruler_task="niah_multikey_2", sizing="fill", **metadata)["test"]
    assert [doc["input"] for doc in filled if doc["max_length"] == 2048] == [
        s["input"] for s in generate("niah_multikey_2", 2048, byte_level_tokenizer(), 3, seed=5, sizing="fill")
    ]
    for doc in docs:
        assert ruler_tasks.doc_to_text(doc) + doc["answer_prefix"] == doc["input"]
        assert ruler_tasks.process_results(doc, [" " + doc["outputs"][0]]) == {str(doc["max_length"]): 100.0}


def test_custom_dataset_without_a_tokenizer_counts_with_the_default_checkpoints(data_dir, caplog):
    ruler_tasks._warn_default_tokenizer.cache_clear()
    with caplog.at_level(logging.WARNING):
        split = ruler_tasks.custom_dataset(ruler_task="niah_single_1", max_seq_lengths=[1024], num_samples=2)
        ruler_tasks.custom_dataset(ruler_task="niah_single_2", max_seq_lengths=[2048], num_samples=1)
    assert caplog.text.count("no tokenizer, pretrained or model named") == 1  # once, not per task
    assert "--model_args pretrained=PATH" in caplog.text
    default_tokenizer = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    for sample in split["test"]:
        assert len(default_tokenizer(sample["input"]).input_ids) <= 1024 - 128


def test_custom_dataset_errors_name_what_is_missing(data_dir, checkpoint):
    with pytest.raises(ValueError, match=r"max_seq_lengths='4096' must be a list"):
        ruler_tasks.custom_dataset(ruler_task="niah_single_1", max_seq_lengths="4096", tokenizer=str(checkpoint))
    with pytest.raises(ValueError, match=r"ruler_task='niah_single_7' is not one of"):
        ruler_tasks.custom_dataset(ruler_task="niah_single_7", tokenizer=str(checkpoint))
    with pytest.raises(ValueError, match=r"generator and tokens_to_generate"):
        ruler_tasks.custom_dataset(generator="niah", tokenizer=str(checkpoint))
    with pytest.raises(ValueError, match=r"sizing='RULER' is not a sizing; valid: \['ruler', 'fill'\]"):
        ruler_tasks.custom_dataset(ruler_task="niah_single_1", sizing="RULER", tokenizer=str(checkpoint))


def _squad_rows(path: Path) -> datasets.Dataset:
    """SQuAD v2.0 in the form `datasets` gives it (rajpurkar/squad_v2): a row per question."""
    data = json.loads(path.read_text())["data"]
    return datasets.Dataset.from_list([
        {"id": qa["id"], "title": article["title"], "context": paragraph["context"], "question": qa["question"],
         "answers": {"text": [a["text"] for a in qa["answers"]], "answer_start": [a["answer_start"] for a in qa["answers"]]}}
        for article in data for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    ])


def _hotpotqa_rows(path: Path) -> datasets.Dataset:
    """HotpotQA's distractor setting in the form `datasets` gives it (hotpotqa/hotpot_qa)."""
    return datasets.Dataset.from_list([
        {"id": item["_id"], "question": item["question"], "answer": item["answer"], "type": item["type"], "level": item["level"],
         "supporting_facts": {"title": [t for t, _ in item["supporting_facts"]], "sent_id": [i for _, i in item["supporting_facts"]]},
         "context": {"title": [t for t, _ in item["context"]], "sentences": [s for _, s in item["context"]]}}
        for item in json.loads(path.read_text())
    ])


@pytest.mark.parametrize(("dataset", "write", "rows"), [("squad", write_squad_standin, _squad_rows), ("hotpotqa", write_hotpotqa_standin, _hotpotqa_rows)])
def test_qa_data_is_rulers_file_or_datasets_and_is_named_when_missing(dataset, write, rows, data_dir, tmp_path, monkeypatch):
    original = write(tmp_path / f"{dataset}.json")
    assert ruler_qa.qa_data_file(dataset, {dataset: str(original)})[0] == original
    # A folder of the data set in datasets' form is written back into RULER's schema.
    datasets.DatasetDict({"validation": rows(original)}).save_to_disk(str(tmp_path / "saved"))
    converted, _ = ruler_qa.qa_data_file(dataset, {dataset: str(tmp_path / "saved")})
    assert read_questions(dataset, converted) == read_questions(dataset, original)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # Once converted, the data directory serves later runs offline.
    assert ruler_qa.qa_data_file(dataset, {})[0] == converted
    converted.unlink()
    task = {"squad": "sb_ruler_qa_1", "hotpotqa": "sb_ruler_qa_2"}[dataset]
    with pytest.raises(MissingCorpusError, match=rf"{task} needs .*ConnectionError.*--metadata '{{\"{dataset}\": \"PATH\"}}'"):
        ruler_qa.qa_data_file(dataset, {})
    with pytest.raises(FileNotFoundError, match=rf"metadata {dataset}='{tmp_path / 'none'}': no such file or folder"):
        ruler_qa.qa_data_file(dataset, {dataset: str(tmp_path / "none")})


def test_the_sb_ruler_group_stops_on_missing_qa_data_naming_what_to_pass(data_dir, checkpoint, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    metadata = {"tokenizer": str(checkpoint), "max_seq_lengths": [8192], "num_samples": 1}
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    with pytest.raises(MissingCorpusError, match=r"sb_ruler_qa_1 needs SQuAD v2.0's dev set.*--metadata"):
        manager.load(["sb_ruler"])


def test_qa_scores_any_reference_answer(data_dir, checkpoint, tmp_path):
    path = write_squad_standin(tmp_path / "dev-v2.0.json")
    docs = ruler_tasks.custom_dataset(ruler_task="qa_1", squad=str(path), tokenizer=str(checkpoint), max_seq_lengths=[8192], num_samples=2)["test"]
    for doc in docs:
        assert doc["metric"] == "string_match_part"
        assert ruler_tasks.process_results(doc, [f" {doc['outputs'][-1]}"]) == {"8192": 100.0}
        assert ruler_tasks.process_results(doc, [" no idea"]) == {"8192": 0.0}


def _docs_files() -> dict[str, str]:
    """The files docs/adding-tasks.md writes out: fenced blocks with a title="path"."""
    blocks = re.findall(r'```\w+ title="([^"]+)"\n(.*?)```', DOCS.read_text(), flags=re.S)
    return dict(blocks)


def test_the_docs_worked_examples_run(data_dir, checkpoint, tmp_path):
    files = _docs_files()
    assert set(files) == {"my_tasks/niah_uuid_keys.yaml", "my_tasks/passkey.py", "my_tasks/passkey.yaml"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    # Byte tokens: RULER's 500-word essay steps do not fit 1024 of them, so the variant fills.
    metadata = {"tokenizer": str(checkpoint), "max_seq_lengths": [1024, 4096], "num_samples": 4, "sizing": "fill"}
    manager = TaskManager(include_path=str(tmp_path / "my_tasks"), include_defaults=False, metadata=metadata)
    try:
        tasks = manager.load(["niah_uuid_keys", "passkey"])["tasks"]
        variant = list(tasks["niah_uuid_keys"].test_docs())
        assert len(variant) == 8
        for doc in variant:
            assert len(doc["outputs"]) == 2 and all(re.fullmatch(r"\d{7}", v) for v in doc["outputs"])
            keys = re.findall(r"One of the special magic numbers for ([0-9a-f-]{36}) is: \d{7}\.", doc["input"])
            assert len(keys) == 3 and doc["length"] + 128 <= doc["max_length"]
        for doc in tasks["passkey"].test_docs():
            assert f"The pass key is {doc['outputs'][0]}. Remember it." in doc["input"]
            assert 0.9 * doc["max_length"] <= doc["length"] + 16 <= doc["max_length"]
    finally:
        GENERATORS.pop("passkey", None)


def test_lm_eval_runs_ruler_niah_at_two_lengths(data_dir, checkpoint, tmp_path):
    output = tmp_path / "results"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint}",
        "--tasks", "ruler_niah", "--include_path", str(TASKS_DIR), "--device", "cpu", "--batch_size", "8",
        # Byte tokens: RULER's 500-word essay steps do not fit these lengths, so the samples fill.
        "--metadata", json.dumps({"max_seq_lengths": [1024, 2048], "num_samples": 2, "sizing": "fill"}),
        "--output_path", str(output), "--log_samples",
    ]
    # run outside the repository, whose own sb_eval/ folder would shadow the installed package
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                         env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = output.glob("**/results_*.json")
    results = json.loads(results_file.read_text())["results"]
    for name in ["ruler_niah"] + [path.stem for path in NIAH_YAMLS]:
        for length in ["1024", "2048"]:
            assert 0.0 <= results[name][f"{length},none"] <= 100.0
    for samples_file in output.glob("**/samples_sb_niah_*.jsonl"):
        for line in samples_file.read_text().splitlines():
            logged = json.loads(line)
            assert logged["arguments"]["gen_args_0"]["arg_0"] == logged["doc"]["input"]
            assert logged["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 128
