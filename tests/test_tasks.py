"""sb_eval.tasks: the RULER YAMLs under lm-eval, the docs' worked examples, and an lm-eval run."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import lm_eval.tasks
import pytest
import yaml
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import TaskIndex
from test_ruler_helpers import write_standin_essays
from tiny_models import write_tiny_llama
from transformers import AutoTokenizer

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import GENERATORS, TASKS
from sb_eval.tasks import ruler_tasks
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
    ruler_tasks = {f"sb_{name}" for name in TASKS if name != "vt"} | {"sb_ruler_vt", "ruler_niah"}
    assert ours == ruler_tasks | {"mqrar", "sb_ppl", "sb_wikitext"}
    # lm-eval's own folder alone: an installed sb-eval adds its tasks to every TaskManager
    lm_evals_own = TaskIndex().build([Path(lm_eval.tasks.__file__).parent])
    assert not ours & set(lm_evals_own)


def test_each_task_generates_as_much_as_ruler_and_the_group_averages_all_niah_tasks():
    for path in NIAH_YAMLS + [TASKS_DIR / "sb_ruler_vt.yaml"]:
        config = _task_config(path)
        spec = TASKS[config["dataset_kwargs"]["ruler_task"]]
        assert config["generation_kwargs"]["max_gen_toks"] == spec.tokens_to_generate, path.name
        assert config["generation_kwargs"]["do_sample"] is False
    group = _task_config(TASKS_DIR / "ruler_niah.yaml")
    assert sorted(group["task"]) == sorted(path.stem for path in NIAH_YAMLS)
    lengths = [m["metric"] for m in _task_config(NIAH_YAMLS[0])["metric_list"]]
    assert [m["metric"] for m in group["aggregate_metric_list"]] == lengths
    assert all(m["weight_by_size"] is False for m in group["aggregate_metric_list"])


def test_custom_dataset_reads_lengths_samples_seed_and_tokenizer_from_metadata(data_dir, checkpoint):
    metadata = dict(max_seq_lengths=[1024, 2048], num_samples=3, seed=5, pretrained=str(checkpoint), version=1.0, dtype="float32")
    docs = ruler_tasks.custom_dataset(ruler_task="niah_multikey_2", **metadata)["test"]
    assert docs["max_length"] == [1024, 2048] * 3
    same = generate("niah_multikey_2", 2048, byte_level_tokenizer(), 3, seed=5)
    assert [doc["input"] for doc in docs if doc["max_length"] == 2048] == [s["input"] for s in same]
    for doc in docs:
        assert ruler_tasks.doc_to_text(doc) + doc["answer_prefix"] == doc["input"]
        assert ruler_tasks.process_results(doc, [" " + doc["outputs"][0]]) == {str(doc["max_length"]): 100.0}


def test_custom_dataset_without_a_tokenizer_counts_with_the_default_checkpoints(data_dir, caplog):
    ruler_tasks._warn_default_tokenizer.cache_clear()
    with caplog.at_level(logging.WARNING):
        split = ruler_tasks.custom_dataset(ruler_task="niah_single_1", max_seq_lengths=[1024], num_samples=2)
        ruler_tasks.custom_dataset(ruler_task="niah_single_2", max_seq_lengths=[1024], num_samples=1)
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
    metadata = {"tokenizer": str(checkpoint), "max_seq_lengths": [1024, 4096], "num_samples": 4}
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
        "--metadata", json.dumps({"max_seq_lengths": [1024, 2048], "num_samples": 2}),
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
