"""sb_eval.ruler's common and frequent words extraction and QA: answers re-derived from each prompt,
RULER's wording, and the depths each sample records."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import pytest
from test_ruler_helpers import merging_bpe_tokenizer, write_hotpotqa_standin, write_squad_standin, write_standin_essays

from sb_eval.ruler.corpora import MissingCorpusError
from sb_eval.ruler.frequent_words import CodedText, zeta
from sb_eval.ruler.generate import generate
from sb_eval.ruler.qa import read_questions
from sb_eval.ruler.registry import TASKS, TaskSpec
from sb_eval.ruler.scoring import string_match_part
from sb_eval.tokenization import byte_level_tokenizer

CWE_HEAD = "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n"
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in the list are:"


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path))
    write_standin_essays(tmp_path)
    return tmp_path


def _numbered_words(listing: str) -> list[str]:
    """The words of "1. apple 2. pear ...", checking that the numbers count up from 1."""
    parts = re.split(r"(?:^| )(\d+)\. ", listing)
    assert parts[0] == "" and [int(number) for number in parts[1::2]] == list(range(1, len(parts) // 2 + 1))
    return parts[2::2]


def _most_common(words: list[str], count: int, ignore: str | None = None) -> set[str]:
    """The `count` most frequent words, checked to be unambiguous: the next one is rarer."""
    ranked = [(word, times) for word, times in Counter(words).most_common() if word != ignore]
    assert ranked[count - 1][1] > ranked[count][1], f"a tie at the cut: {ranked[count - 1:count + 1]}"
    return {word for word, _ in ranked[:count]}


@pytest.mark.parametrize(("length", "repeats"), [(2048, (6, 1)), (8192, (30, 3))])
def test_common_words_answers_are_the_lists_ten_most_common(length, repeats):
    for sample in generate("cwe", length, merging_bpe_tokenizer(), 4):
        example, task = sample["input"].split("\n" + CWE_HEAD)
        assert example.startswith(CWE_HEAD)
        assert sample["input"].endswith(CWE_QUESTION)
        words = _numbered_words(task.removesuffix(CWE_QUESTION))
        assert _most_common(words, 10) == set(sample["outputs"])
        assert {Counter(words)[word] for word in sample["outputs"]} == {repeats[0]}
        assert set(Counter(words).values()) == set(repeats)
        # The solved example's answer is its own list's ten most common words, numbered.
        listing, answer = example.removeprefix(CWE_HEAD).split(CWE_QUESTION)
        assert _most_common(_numbered_words(listing), 10) == set(_numbered_words(answer))
        assert sample["needle_depths"] == [] and sample["needle_tokens"] == []


def test_frequent_words_answers_are_the_three_most_frequent_coded_words():
    head = "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. "
    question = (
        "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared "
        "words in the above coded text? Answer: According to the coded text above, the three most frequently appeared words are:"
    )
    tokenizer = merging_bpe_tokenizer()
    for sizing in ("ruler", "fill"):
        samples = generate("fwe", 4096, tokenizer, 4, sizing=sizing)
        for sample in samples:
            assert sample["input"].startswith(head) and sample["input"].endswith(question)
            words = sample["input"].removeprefix(head).removesuffix(question).split(" ")
            assert Counter(words).most_common(1)[0][0] == "..."
            assert all(re.fullmatch(r"[a-z]{6}", word) for word in words if word != "...")
            assert _most_common(words, 3, ignore="...") == set(sample["outputs"])
            # RULER sizes FWE's prompt to max_seq_length itself, without the generated tokens.
            budget = 4096 if sizing == "ruler" else 4096 - 50
            assert len(tokenizer(sample["input"], add_special_tokens=sizing == "fill").input_ids) <= budget
        # The vocabulary is drawn afresh for each sample.
        assert len({tuple(sample["outputs"]) for sample in samples}) == len(samples)


@pytest.fixture
def squad(tmp_path):
    return TaskSpec("qa", 32, {"dataset": "squad", "data_file": str(write_squad_standin(tmp_path / "dev-v2.0.json"))}, "string_match_part")


def test_qa_sample_i_asks_the_ith_answerable_question_over_its_paragraph_and_others(squad):
    data = json.loads(open(squad.params["data_file"]).read())
    answerable = [(qa, paragraph["context"]) for article in data["data"] for paragraph in article["paragraphs"]
                  for qa in paragraph["qas"] if not qa["is_impossible"]]
    tokenizer = merging_bpe_tokenizer()
    samples = generate(squad, 4096, tokenizer, 5)
    for sample, (qa, paragraph) in zip(samples, answerable):
        assert sample["outputs"] == [answer["text"] for answer in qa["answers"]]
        text = sample["input"]
        assert text.endswith(f"\n\nQuestion: {qa['question']} Answer:")
        documents = re.findall(r"Document (\d+):\n(.*?)(?=\n\nDocument \d+:\n|\n\nAnswer the question)", text, flags=re.S)
        assert [int(number) for number, _ in documents] == list(range(1, len(documents) + 1))
        assert paragraph in [document for _, document in documents]
        # The one gold paragraph's depth: its first token decodes to its start.
        (token,) = sample["needle_tokens"]
        ids = tokenizer(text).input_ids
        assert tokenizer.decode(ids[token:]).startswith(paragraph[:20])
        assert 0 <= sample["needle_depths"][0] <= 100
        assert string_match_part(f" {qa['answers'][0]['text']}.", sample["outputs"]) == 100.0


def test_hotpotqa_keeps_all_ten_context_paragraphs_of_its_question(tmp_path):
    path = write_hotpotqa_standin(tmp_path / "hotpot_dev_distractor_v1.json")
    spec = replace(TASKS["qa_2"], params={"dataset": "hotpotqa", "data_file": str(path)})
    items = json.loads(path.read_text())
    for sample, item in zip(generate(spec, 8192, merging_bpe_tokenizer(), 3), items):
        assert sample["outputs"] == [item["answer"]]
        for title, sentences in item["context"]:
            assert f":\n{title}\n{''.join(sentences)}" in sample["input"]
        assert len(sample["needle_depths"]) == 10


def test_qa_names_the_data_it_needs(squad, tmp_path):
    with pytest.raises(MissingCorpusError, match=r"SQuAD v2.0's dev set \(dev-v2.0.json\): pass data_file=PATH"):
        generate(TASKS["qa_1"], 4096, merging_bpe_tokenizer(), 1)
    with pytest.raises(MissingCorpusError, match=r"data_file=.*nothing.json: no such file"):
        generate(replace(squad, params={**squad.params, "data_file": str(tmp_path / "nothing.json")}), 4096, merging_bpe_tokenizer(), 1)
    questions, _ = read_questions("squad", squad.params["data_file"])
    with pytest.raises(ValueError, match=rf"holds {len(questions)} answerable questions"):
        generate(squad, 2048, merging_bpe_tokenizer(), len(questions) + 1, sizing="fill")
    (tmp_path / "wrong.json").write_text(json.dumps({"data": [{"title": "x"}]}))
    with pytest.raises(ValueError, match=r"wrong.json is not SQuAD v2.0's dev set .* in its JSON schema"):
        generate(replace(squad, params={"dataset": "squad", "data_file": str(tmp_path / "wrong.json")}), 2048, merging_bpe_tokenizer(), 1)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_2", "niah_multivalue", "vt"])
def test_each_sample_records_where_its_answers_sit(task):
    tokenizer = byte_level_tokenizer()
    marker = "VAR " if task == "vt" else "One of the special magic"
    for sample in generate(task, 8192, tokenizer, 4):
        expected = 5 if task == "vt" else len(sample["outputs"])
        assert len(sample["needle_tokens"]) == len(sample["needle_depths"]) == expected
        assert sample["needle_depths"] == sorted(sample["needle_depths"]) and all(0 <= d <= 100 for d in sample["needle_depths"])
        ids = tokenizer(sample["input"]).input_ids
        for token in sample["needle_tokens"]:
            assert tokenizer.decode(ids[token:]).startswith(marker)
        for value in sample["outputs"] if task != "vt" else []:
            needle = re.search(rf"One of the special magic \w+ for [^\n]*? is: {value}\.", sample["input"]).group()
            assert any(tokenizer.decode(ids[token:]).startswith(needle) for token in sample["needle_tokens"])


def test_parameters_that_would_make_answers_ambiguous_are_refused():
    with pytest.raises(ValueError, match=r"freq_cw=3 must exceed freq_ucw=3, or the common words tie"):
        generate(TaskSpec("cwe", 120, {"freq_cw": 3, "freq_ucw": 3}), 4096, merging_bpe_tokenizer(), 1)
    # FWE's rank 4 and rank 5 come apart from about 74 words of text on.
    text = CodedText(["...", "a", "b", "c", "d", "e"], lambda size: [int(size * k**-2.0 / zeta(2.0)) for k in range(1, 7)], seed=42)
    with pytest.raises(ValueError, match=r"a coded text of 20 words ties its third most frequent word with the fourth"):
        text.take(20)
    assert len(text.take(200)) > 100
