"""sizing="ruler": the haystack sizes NVIDIA's own RULER generator chooses, and the random draws
behind them.

RECORDED holds what RULER's generator (nvidia-long-context-eval 26.3's data/synthetic scripts,
run as its prepare.py runs them with --random_seed 42 and the base template) printed as its
haystack size on these stand-in files: the essays of write_standin_essays, the QA files of
write_squad_standin and write_hotpotqa_standin, written into its json/ folder; tokenizers
given by --tokenizer_type hf. Variable tracking prints two sizes: its solved example's (noise
paragraphs at 500 tokens), then the task's.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from test_ruler_helpers import merging_bpe_tokenizer, write_hotpotqa_standin, write_squad_standin, write_standin_essays
from transformers import AutoTokenizer

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.ruler.generate import generate, haystack_size
from sb_eval.ruler.reference_random import NumpyLegacyRandom, SortedPairs, shuffled_as_ruler
from sb_eval.ruler.registry import TASKS
from sb_eval.ruler.sizing import ReferenceSize

LENGTHS = (2048, 4096, 8192)
RECORDED = {
    "bpe": {
        "niah_single_1": [45, 100, 200],
        "niah_single_2": [500, 1000, 2500],
        "niah_single_3": [500, 1000, 2500],
        "niah_multikey_1": [500, 1000, 2500],
        "niah_multikey_2": [75, 150, 325],
        "niah_multikey_3": [20, 50, 100],
        "niah_multivalue": [500, 1000, 2500],
        "niah_multiquery": [500, 1000, 2500],
        "vt": [(5, 30), (5, 90), (5, 200)],
        "cwe": [200, 50, 290],
        "fwe": [469, 938, 1621],
        "qa_1": [10, 10, 40],
        "qa_2": [10, 30, 50],
    },
    "default checkpoint": {
        "niah_single_1": [60, 125, 250],
        "niah_single_2": [500, 1000, 2500],
        "niah_single_3": [500, 1000, 2500],
        "niah_multikey_1": [500, 1000, 2500],
        "niah_multikey_2": [80, 150, 350],
        "niah_multikey_3": [20, 50, 100],
        "niah_multivalue": [500, 1000, 2500],
        "niah_multiquery": [500, 1000, 2500],
        "vt": [(10, 40), (10, 110), (10, 250)],
        "cwe": [240, 70, 330],
        "fwe": [725, 1322, 2645],
        "qa_1": [10, 20, 40],
        "qa_2": [10, 30, 60],
    },
}
TOKENIZERS = {"bpe": merging_bpe_tokenizer, "default checkpoint": lambda: AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ruler-data")
    write_standin_essays(folder)
    return {"dir": folder, "squad": write_squad_standin(folder / "squad.json"), "hotpotqa": write_hotpotqa_standin(folder / "hotpotqa.json")}


def _spec(task, data):
    spec = TASKS[task]
    if spec.generator == "qa":
        return replace(spec, params={**spec.params, "data_file": str(data[spec.params["dataset"]])})
    return spec


@pytest.mark.parametrize(("tokenizer", "task"), [(tokenizer, task) for tokenizer in RECORDED for task in RECORDED[tokenizer]])
def test_haystack_sizes_are_rulers(tokenizer, task, data, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(data["dir"]))
    counting = TOKENIZERS[tokenizer]()
    for length, recorded in zip(LENGTHS, RECORDED[tokenizer][task]):
        size = haystack_size(_spec(task, data), length, counting)
        assert ((size.example_units, size.units) if task == "vt" else size.units) == recorded, (task, length)


def test_each_sample_keeps_the_sets_size_unless_it_does_not_fit(data, monkeypatch):
    """RULER draws every sample at the set's size and shrinks one that does not fit a step at a
    time; the samples' haystacks are that size, or a step or so less."""
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(data["dir"]))
    tokenizer = merging_bpe_tokenizer()
    size = haystack_size("niah_multikey_2", 4096, tokenizer)
    lines = [len(sample["input"].split("\n")) - 3 for sample in generate("niah_multikey_2", 4096, tokenizer, 20)]
    assert set(lines) <= {size.units, size.units - size.step} and size.units in lines
    filled = [len(sample["input"].split("\n")) - 3 for sample in generate("niah_multikey_2", 4096, tokenizer, 20, sizing="fill")]
    assert min(filled) > size.units


def test_numpys_legacy_randint_is_reproduced():
    # np.random.seed(42); [np.random.randint(10000, 99999) for _ in range(5)], numpy 2.3
    values = NumpyLegacyRandom(42)
    assert [values.randint(10000, 99999) for _ in range(5)] == [25795, 10860, 86820, 64886, 16265]


def test_sorted_pairs_index_like_the_sorted_list_they_stand_for():
    # Hyphenated first words interleave with shorter ones; a space or an apostrophe sorts before "-".
    firsts = ["old", "old-fashioned", "a b", "a", "x-rated", "x", "o'clock", "teeny-tiny", "teeny"]
    seconds = ["tiny", "fashioned-cat", "b", "cat", "rated", "dog", "zebra", "b-c"]
    pairs = SortedPairs(firsts, seconds)
    expected = sorted({f"{first}-{second}" for first in firsts for second in seconds})
    assert len(pairs) == len(expected) and list(pairs) == expected


def test_shuffled_as_ruler_is_random_shuffle_with_the_seed():
    items = [f"w{i}" for i in range(50)]
    shuffled = list(items)
    random.Random(42).shuffle(shuffled)
    assert shuffled_as_ruler(items, 42) == shuffled


def test_a_size_ruler_cannot_fit_is_named(data, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(data["dir"]))
    assert haystack_size("niah_single_2", 1024, merging_bpe_tokenizer()) == ReferenceSize(0, 500, 1024 - 128, 1024)
    with pytest.raises(ValueError, match=r"max_seq_length=1024 leaves 0 units of haystack at RULER's size"):
        generate("niah_single_2", 1024, merging_bpe_tokenizer(), 2)
