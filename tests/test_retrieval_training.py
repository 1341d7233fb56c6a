"""Retrieval practice for training: the generators' training options (verb-noun keys, another essay
file entered at a random sentence, other variable-name lengths), the samples and their packing,
the per-row loss, mixed sources, repeated segments, and scripts/train.py --data mixture end to end."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import re
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_ruler_helpers import merging_bpe_tokenizer, standin_sentences
from transformers import AutoModelForCausalLM

from sb_eval.data.corpora import write_sentences
from sb_eval.model.checks import check_checkpoint_folder
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.ruler.generate import generate, task_spec
from sb_eval.ruler.haystacks import TextRun, TextRunFrom
from sb_eval.ruler.registry import TASKS, TaskSpec
from sb_eval.ruler.tokens import TokenCounter
from sb_eval.ruler.values import random_word, value_drawer
from sb_eval.tokenization import byte_level_tokenizer
from sb_eval.training import retrieval as retrieval_training
from sb_eval.training.retrieval import (
    PackedSamples,
    PromptAnswer,
    RepeatedSegments,
    dense_recall_rows,
    retrieval_samples,
    retrieval_specs,
)
from sb_eval.training.trainer import IGNORE, Batch, ConcatenatedBatches, evaluate, position_loss

SCRIPTS = Path(__file__).parents[1] / "scripts"


def word_list(name: str) -> list[str]:
    """One of wonderwords' lists, as RULER's WORDS uses it: distinct stripped lines, sorted."""
    text = (files("wonderwords") / "assets" / f"{name}.txt").read_text(encoding="utf-8")
    return sorted({line.strip() for line in text.splitlines() if line.strip()})


ADJECTIVES, NOUNS, VERBS = (set(word_list(name)) for name in ("adjectivelist", "nounlist", "verblist"))


@pytest.fixture(autouse=True)
def empty_data_dir(tmp_path, monkeypatch):
    """No essay corpus in the data directory: a generator that ignores essay_file fails."""
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path / "data"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbered_sentences(count: int) -> str:
    """A text of `count` distinct sentences, so that a run of them tells where it starts."""
    rng = random.Random(3)
    nouns = sorted(NOUNS)
    return " ".join(f"Part {i} tells of the {rng.choice(nouns)} and the {rng.choice(nouns)}." for i in range(count))


@pytest.fixture(scope="module")
def essay_file(tmp_path_factory) -> Path:
    return write_sentences([numbered_sentences(300)], "test sentences", tmp_path_factory.mktemp("essay") / "sentences.json")


def sentences_of(path: Path) -> list[str]:
    return json.loads(path.read_text(encoding="utf-8"))["sentences"]


# --- word keys -------------------------------------------------------------------------------


def is_adjective_noun(key: str) -> bool:
    """Whether `key` is some adjective, a hyphen and a noun (the words themselves may hold hyphens)."""
    return any(key[:i] in ADJECTIVES and key[i + 1:] in NOUNS for i, char in enumerate(key) if char == "-")


def test_verb_noun_keys_are_never_adjective_noun_keys():
    draw = value_drawer("words", "type_needle_k", "verb-noun")
    rng = random.Random(0)
    keys = [draw(rng) for _ in range(3000)]
    assert not any(is_adjective_noun(key) for key in keys)
    first_words = {next(key[:i] for i, char in enumerate(key) if char == "-" and key[:i] in VERBS) for key in keys}
    assert not first_words & ADJECTIVES
    assert len(first_words) > 500  # drawn from the whole list of verbs, not a few of them


def test_adjective_noun_keys_are_drawn_as_before():
    adjectives, nouns = word_list("adjectivelist"), word_list("nounlist")
    for seed in range(20):
        before = random.Random(seed)
        expected = [f"{before.choice(adjectives)}-{before.choice(nouns)}" for _ in range(5)]
        default, named, drawer = random.Random(seed), random.Random(seed), random.Random(seed)
        assert [random_word(default) for _ in range(5)] == expected
        assert [random_word(named, "adjective-noun") for _ in range(5)] == expected
        assert [value_drawer("words", "type_needle_k")(drawer) for _ in range(5)] == expected


def test_an_unknown_kind_of_word_pair_is_named():
    with pytest.raises(ValueError, match=r"key_words='noun-verb'.*adjective-noun.*verb-noun"):
        value_drawer("words", "type_needle_k", "noun-verb")
    with pytest.raises(ValueError, match=r"key_words='noun-verb'"):
        generate(TaskSpec("niah", 128, dict(type_haystack="repeat", key_words="noun-verb")), 1024, byte_level_tokenizer(), 1, use_cache=False)


# --- NIAH training options --------------------------------------------------------------------


def essay_niah(essay_file, essay_start: str, **params) -> TaskSpec:
    return TaskSpec("niah", 128, dict(type_haystack="essay", type_needle_k="words", type_needle_v="numbers",
                                      key_words="verb-noun", essay_file=str(essay_file), essay_start=essay_start, **params))


def haystack_start(sample: dict, sentences: list[str]) -> int:
    """The index of the sentence an essay sample's haystack starts with; the haystack must be a run
    of the file's sentences from there."""
    context = sample["input"].split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
    needles = re.findall(r"One of the special magic numbers for .+? is: \d+\.", context)
    assert len(needles) == 1
    haystack = context.replace(needles[0], "").replace("  ", " ").strip()
    (start,) = [i for i, sentence in enumerate(sentences) if haystack.startswith(sentence + " ")]
    run = [sentences[start]]
    while len(" ".join(run)) < len(haystack):
        run.append(sentences[start + len(run)])
    assert " ".join(run) == haystack
    return start


def needle_keys(prompt: str) -> list[str]:
    return re.findall(r"One of the special magic (?:numbers|uuids) for (.+?) is: ", prompt)


def test_essay_haystacks_come_from_the_essay_file_from_a_random_or_the_first_sentence(essay_file):
    sentences = sentences_of(essay_file)
    assert len(sentences) == 300
    tokenizer = byte_level_tokenizer()
    beginning = generate(essay_niah(essay_file, "beginning"), 1024, tokenizer, 8, seed=1, use_cache=False)
    assert [haystack_start(sample, sentences) for sample in beginning] == [0] * 8
    # A random start leaves at least the last fifth of the text after it.
    at_random = generate(essay_niah(essay_file, "random"), 1024, tokenizer, 40, seed=1, use_cache=False)
    starts = [haystack_start(sample, sentences) for sample in at_random]
    assert len(set(starts)) >= 30 and max(starts) > 0.6 * len(sentences), starts
    assert all(0 <= start < 0.8 * len(sentences) for start in starts), starts
    for sample in beginning + at_random:
        assert sample["length"] == len(tokenizer(sample["input"]).input_ids) and sample["length"] + 128 <= 1024
        (key,) = needle_keys(sample["input"])
        assert not is_adjective_noun(key) and any(key[:i] in VERBS for i, char in enumerate(key) if char == "-")


def test_bad_essay_options_are_named(essay_file, tmp_path):
    tokenizer = byte_level_tokenizer()
    with pytest.raises(ValueError, match=r"essay_start='middle'.*beginning.*random"):
        generate(essay_niah(essay_file, "middle"), 1024, tokenizer, 1, use_cache=False)
    missing = tmp_path / "no-such-sentences.json"
    with pytest.raises(FileNotFoundError, match=r"essay_file=.*no-such-sentences\.json"):
        generate(essay_niah(missing, "random"), 1024, tokenizer, 1, use_cache=False)
    repeat = TaskSpec("niah", 128, dict(type_haystack="repeat", essay_file=str(essay_file)))
    with pytest.raises(ValueError, match=r"essay_file and essay_start apply to type_haystack='essay' only"):
        generate(repeat, 1024, tokenizer, 1, use_cache=False)


def test_write_sentences_splits_every_text_in_order(tmp_path):
    path = write_sentences(["First one here.  Second\n one!", "Third one?  Fourth."], "two texts", tmp_path / "s" / "sentences.json")
    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["sentences"] == ["First one here.", "Second one!", "Third one?", "Fourth."]
    assert document["source"] == "two texts" and "punkt" in document["splitter"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["sentences.json"]


# --- TextRun from a given unit ------------------------------------------------------------------


def word_count_tokenizer(text: str) -> list[int]:
    """A second tokenizer: one token per word (the anchor "." counts one too)."""
    return [0] * len(text.split())


def longest_fitting_run(units: list[str], separator: str, start: int, budget: int, counter: TokenCounter) -> list[str] | None:
    """Brute force: the longest run from `start` whose pieces sum to at most `budget`; None when all
    the units from `start` on fit (the haystack is too short)."""
    counts = counter.pieces([separator + unit for unit in units[start:]])
    for end in range(len(counts) + 1):
        if sum(counts[:end + 1]) > budget:
            return units[start:start + end]
    return None


def test_a_text_run_from_any_unit_is_the_longest_run_that_fits(monkeypatch):
    monkeypatch.setattr(TextRun, "CHUNK", 7)  # many chunk boundaries in a short run
    rng = random.Random(5)
    units = [" ".join(rng.choice(sorted(NOUNS)) for _ in range(rng.randint(1, 9))) for _ in range(60)]
    run = TextRun(units, " ", "test")
    counters = [TokenCounter(byte_level_tokenizer()), TokenCounter(word_count_tokenizer)]
    checked = too_short = 0
    # Starts and budgets out of order and the two counters alternating: counts cached for one
    # start or counter must serve the others correctly.
    for _ in range(300):
        counter = rng.choice(counters)
        start, budget = rng.randrange(len(units)), rng.choice([0, 1, 5, 20, 60, 150, 400, 1500])
        expected = longest_fitting_run(units, " ", start, budget, counter)
        if expected is None:
            with pytest.raises(ValueError, match=rf"test haystack holds \d+ tokens from unit {start} on"):
                run.fill(budget, counter, start)
            too_short += 1
        else:
            assert run.fill(budget, counter, start) == expected
            assert TextRunFrom(run, start).fill(budget, counter) == expected
            checked += 1
    assert checked > 100 and too_short > 20


def test_a_text_run_names_a_start_outside_it():
    run = TextRun(["One.", "Two."], " ", "test")
    counter = TokenCounter(byte_level_tokenizer())
    for start in (-1, 2):
        with pytest.raises(ValueError, match=rf"start={start} is not a unit of the test haystack \(0 \.\. 1\)"):
            run.fill(3, counter, start)
    assert run.fill(9, counter, 0) == ["One."]  # " One." and " Two." are 5 bytes each
    with pytest.raises(ValueError, match=r"test haystack holds 10 tokens from unit 0 on, no more than the 10"):
        run.fill(10, counter, 0)


# --- variable tracking names ------------------------------------------------------------------


def variables_holding(statements: str, value: int) -> set[str]:
    """Names that end up holding `value` after the statements "VAR A = 123" and "VAR B = VAR A"."""
    holding: dict[str, int] = {}
    for name, number, source in re.findall(r"VAR ([A-Z]+) = (?:(\d+)|VAR ([A-Z]+))", statements):
        holding[name] = int(number) if number else holding[source]
    return {name for name, held in holding.items() if held == value}


@pytest.mark.parametrize("name_length", [4, 6])
def test_variable_names_have_the_length_asked_for(name_length):
    spec = TaskSpec("variable_tracking", 30, dict(num_chains=1, num_hops=4, name_length=name_length))
    for sample in generate(spec, 2048, byte_level_tokenizer(), 2, seed=3, use_cache=False):
        example, prompt = sample["input"].split("\n\n\n\n")
        assert {len(name) for name in re.findall(r"VAR ([A-Z]+)", example)} == {3}
        assert {len(name) for name in re.findall(r"VAR ([A-Z]+)", prompt)} == {name_length}
        assert len(sample["outputs"]) == 5 and all(len(name) == name_length and name.isupper() for name in sample["outputs"])
        query = int(re.search(r"assigned the value (\d+) in the text above", prompt)[1])
        assert variables_holding(prompt, query) == set(sample["outputs"])


def test_impossible_variable_name_lengths_are_named():
    for name_length, message in ((0, r"name_length=0 must be a positive integer"), (1, r"name_length=1 leaves too few names for 3 chains of 4 hops")):
        spec = TaskSpec("variable_tracking", 30, dict(num_chains=3, num_hops=4, name_length=name_length))
        with pytest.raises(ValueError, match=message):
            generate(spec, 2048, byte_level_tokenizer(), 1, use_cache=False)
    # two letters are enough for the same chains
    generate(TaskSpec("variable_tracking", 30, dict(num_chains=3, num_hops=4, name_length=2)), 4096, byte_level_tokenizer(), 1, use_cache=False)


# --- training variants and their samples ------------------------------------------------------

TRAINING_ONLY = ("key_words", "essay_file", "essay_start")


def test_the_training_variants_are_rulers_niah_tasks_with_training_vocabularies(essay_file):
    specs = retrieval_specs(essay_file)
    assert sorted(specs) == sorted([
        "niah_repeat", "niah_essay_numbers", "niah_essay_uuids", "niah_essay_multikey", "niah_needle_words",
        "niah_needle_uuids", "niah_essay_multivalue", "niah_essay_multiquery", "vt_names_4", "vt_names_6",
    ])
    niah = [spec for spec in specs.values() if spec.generator == "niah"]
    without_training_options = sorted(json.dumps({k: v for k, v in spec.params.items() if k not in TRAINING_ONLY}, sort_keys=True) for spec in niah)
    assert without_training_options == sorted(json.dumps(spec.params, sort_keys=True) for spec in TASKS.values() if spec.generator == "niah")
    for spec in niah:
        assert spec.params["key_words"] == "verb-noun" and spec.tokens_to_generate == 128
        essay = spec.params["type_haystack"] == "essay"
        assert (spec.params.get("essay_file"), spec.params.get("essay_start")) == ((str(essay_file), "random") if essay else (None, None))
    assert {spec.params["name_length"] for spec in specs.values() if spec.generator == "variable_tracking"} == {4, 6}
    assert all(task_spec(spec) is spec for spec in specs.values())  # every parameter is the generator's


def expected_answer(prompt: str) -> list[str]:
    """The answer read off a prompt alone: the values of the queried NIAH keys, the variables
    holding the queried value, or the current value of the last MQRAR key."""
    if prompt.startswith("Memorize"):
        task = prompt.split("\n\n\n\n")[1]
        return sorted(variables_holding(task, int(re.search(r"assigned the value (\d+) in the text above", task)[1])))
    if prompt.startswith(("Some special magic", "A special magic")):
        question = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?", prompt)[1]
        queries = re.split(r", and |, ", question)
        needles = re.findall(r"One of the special magic \w+ for (.+?) is: ([\w-]+)\.", prompt)
        return sorted(value for key, value in needles if key in queries)
    symbols = prompt.split()
    key = symbols[-1]
    last = max(i for i, symbol in enumerate(symbols[:-1]) if symbol == key and i % 2 == 0)
    return [symbols[last + 1]]


@pytest.fixture(scope="module")
def samples(essay_file) -> list[PromptAnswer]:
    return retrieval_samples(merging_bpe_tokenizer(), essay_file, [1024], 2, seed=7, workers=1)


def test_retrieval_samples_answer_their_prompts_and_end_with_end_of_text(samples, essay_file):
    tokenizer = merging_bpe_tokenizer()
    eos = tokenizer.eos_token_id
    kinds = {"niah": 0, "vt": 0, "mqrar": 0}
    essay = set(sentences_of(essay_file))
    for sample in samples:
        assert len(sample) <= 1024 and sample.answer[-1] == eos and eos not in sample.prompt + sample.answer[:-1]
        prompt, answer = tokenizer.decode(sample.prompt), tokenizer.decode(sample.answer[:-1])
        assert tokenizer.decode(sample.prompt + sample.answer[:-1]) == prompt + answer
        assert answer.startswith(" ") != prompt.endswith(" ")  # one space between them
        if prompt.startswith("Memorize"):
            kinds["vt"] += 1
            assert len({len(name) for name in answer.split()}) == 1
        elif prompt.startswith(("Some special magic", "A special magic")):
            kinds["niah"] += 1
            assert all(not is_adjective_noun(key) for key in needle_keys(prompt))
        else:
            kinds["mqrar"] += 1
        assert sorted(answer.split()) == expected_answer(prompt), prompt[-300:]
    assert kinds == {"niah": 8 * 2, "vt": 2 * 2, "mqrar": 3 * 2}
    vt_names = {len(tokenizer.decode(s.answer[:-1]).split()[0]) for s in samples if tokenizer.decode(s.prompt).startswith("Memorize")}
    assert vt_names == {4, 6}
    essay_prompts = [s for s in samples if any(sentence in tokenizer.decode(s.prompt) for sentence in essay)]
    assert len(essay_prompts) == 5 * 2  # the five essay variants read the essay file
    mqrar_keys = {int(symbol[1:]) for s in samples for symbol in tokenizer.decode(s.prompt).split() if re.fullmatch(r"k\d+", symbol)}
    assert max(mqrar_keys) >= 256  # the training vocabulary's extra keys


def test_retrieval_samples_do_not_depend_on_the_number_of_workers(samples, essay_file):
    assert retrieval_samples(merging_bpe_tokenizer(), essay_file, [1024], 2, seed=7, workers=2) == samples
    another_seed = retrieval_samples(merging_bpe_tokenizer(), essay_file, [1024], 2, seed=8, workers=1)
    assert not {tuple(s.prompt) for s in another_seed} & {tuple(s.prompt) for s in samples}


def test_a_sample_whose_end_of_text_overruns_its_length_is_left_out_and_named(essay_file, caplog, monkeypatch):
    """RULER fits prompt + generation budget; an answer taking the whole budget puts end-of-text
    one token past the length. Such a sample (made here by lengthening one set's answers) must
    not reach the packer, which would refuse the whole pool."""
    make_set = retrieval_training._set_samples

    def one_set_overruns(tokenizer, samples_per_set, seed, task, size):
        samples, reason = make_set(tokenizer, samples_per_set, seed, task, size)
        if task == retrieval_specs(essay_file)["niah_repeat"]:
            samples = [PromptAnswer(sample.prompt, sample.answer + [0] * (size - len(sample) + 1)) for sample in samples]
        return samples, reason

    monkeypatch.setattr(retrieval_training, "_set_samples", one_set_overruns)
    with caplog.at_level(logging.WARNING, logger="sb_eval.training.retrieval"):
        samples = retrieval_samples(merging_bpe_tokenizer(), essay_file, [1024], 2, seed=7, workers=1)
    assert "2 niah_repeat samples longer than 1024 tokens with end-of-text left out" in caplog.text
    assert samples and all(len(sample) <= 1024 for sample in samples)


def test_variants_a_length_cannot_hold_are_left_out_with_a_warning(essay_file, caplog):
    # With one token per byte, variable tracking's solved example alone needs more than 1024.
    with caplog.at_level(logging.WARNING, logger="sb_eval.training.retrieval"):
        samples = retrieval_samples(byte_level_tokenizer(), essay_file, [1024], 1, seed=7, workers=1)
    tokenizer = byte_level_tokenizer()
    prompts = [tokenizer.decode(sample.prompt) for sample in samples]
    assert not any(prompt.startswith("Memorize") for prompt in prompts)
    assert sum(prompt.startswith(("Some special magic", "A special magic")) for prompt in prompts) == 8
    assert {"vt_names_4", "vt_names_6"} <= {word for record in caplog.records for word in record.getMessage().split()}
    with pytest.raises(ValueError, match="hold no retrieval practice task"):
        retrieval_samples(byte_level_tokenizer(), essay_file, [200], 1, seed=7, workers=1, mqrar_pairs=())


# --- dense recall -------------------------------------------------------------------------------

STATEMENT = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
QUESTION = re.compile(r"The special magic (?:number|uuid) for (\S+) mentioned in the provided text is$")


def test_dense_recall_rows_score_the_value_of_each_questions_key():
    tokenizer = merging_bpe_tokenizer()
    pool = dense_recall_rows(tokenizer, 512, 6, 6, seed=4, workers=1)
    batch = pool.batch(0)
    assert batch.inputs.shape == (6, 512)
    kinds = set()
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
        text = tokenizer.decode(inputs)
        found = STATEMENT.findall(text)
        kinds |= {kind for kind, _, _ in found}
        statements = {key: value for _, key, value in found}
        assert 1 <= len(statements) <= 32 and len(tokenizer(text.split("\nWhat")[0]).input_ids) <= 256
        scored = [t for t, target in enumerate(targets) if target != IGNORE]
        assert all(targets[t] == inputs[t + 1] for t in scored)
        runs = [[scored[0]]]  # consecutive scored positions: one answer each
        for t in scored[1:]:
            runs[-1].append(t) if t == runs[-1][-1] + 1 else runs.append([t])
        assert len(runs) >= 2
        for run in runs:
            key = QUESTION.search(tokenizer.decode(inputs[: run[0] + 1])).group(1)
            assert tokenizer.decode([inputs[t + 1] for t in run]) == " " + statements[key]
    assert kinds == {"numbers", "uuids"}


def test_dense_recall_rows_do_not_depend_on_the_number_of_workers():
    tokenizer = merging_bpe_tokenizer()
    one, two = (dense_recall_rows(tokenizer, 512, 5, 5, seed=2, workers=workers).batch(0) for workers in (1, 2))
    assert torch.equal(one.inputs, two.inputs) and torch.equal(one.targets, two.targets)


def test_dense_recall_rows_too_short_for_their_statements_are_refused():
    with pytest.raises(ValueError, match="row of 64 tokens holds no question"):
        dense_recall_rows(merging_bpe_tokenizer(), 64, 2, 2, seed=0, workers=1)


# --- repeated segments --------------------------------------------------------------------------

# Ids that are not 0..n-1 (a vocabulary less its special ids), many enough that a random segment
# of 3 or more of them is almost surely not itself periodic, so its row's smallest period is its length.
SPARSE_IDS = list(range(5, 3005, 3))


def smallest_period(row: list[int]) -> int:
    """The smallest p with row[t] == row[t - p] for every t >= p (len(row) when there is none)."""
    return next(p for p in range(1, len(row) + 1) if row[p:] == row[:-p])


def test_repeated_segments_tile_a_random_segment_and_score_every_repeat():
    length, shortest, longest = 40, 3, 9
    source = RepeatedSegments(SPARSE_IDS, length, batch_size=16, seed=2, segment_lengths=(shortest, longest))
    periods = []
    for step in range(8):
        batch = source.batch(step)
        assert batch.inputs.shape == batch.targets.shape == (16, length)
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64
        for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
            period = smallest_period(inputs)
            assert shortest <= period <= longest and set(inputs) <= set(SPARSE_IDS)
            # position t predicts t + 1, which repeats t + 1 - period; it is scored once t itself
            # repeats a token (t >= period), not where the first segment ends
            expected = [IGNORE if t < period else inputs[t + 1 - period] for t in range(length)]
            assert targets == expected
            periods.append(period)
    assert set(periods) == set(range(shortest, longest + 1))  # both bounds inclusive, every length drawn


def test_repeated_segments_draw_their_ids_from_all_the_given_ones():
    ids = [7, 19, 300, 41]
    batch = RepeatedSegments(ids, 12, batch_size=32, seed=0, segment_lengths=(4, 8)).batch(0)
    assert set(batch.inputs.flatten().tolist()) == set(ids)
    # a one-token segment repeats a single id, every position from the second on scored
    constant = RepeatedSegments(ids, 12, batch_size=5, seed=0, segment_lengths=(1, 1)).batch(3)
    assert all(len(set(row)) == 1 for row in constant.inputs.tolist())
    assert torch.equal(constant.targets[:, 1:], constant.inputs[:, 1:]) and (constant.targets[:, 0] == IGNORE).all()


def test_repeated_segments_are_a_function_of_seed_and_step():
    def source(seed):
        return RepeatedSegments(SPARSE_IDS, 64, batch_size=4, seed=seed, segment_lengths=(4, 16))

    first, again = source(5), source(5)
    later = first.batch(9)  # asked out of order, and of another instance
    for step in (3, 0, 9):
        assert torch.equal(first.batch(step).inputs, again.batch(step).inputs)
        assert torch.equal(first.batch(step).targets, again.batch(step).targets)
    assert torch.equal(again.batch(9).inputs, later.inputs)
    assert not torch.equal(first.batch(3).inputs, first.batch(4).inputs)
    assert not torch.equal(first.batch(3).inputs, source(6).batch(3).inputs)


def test_impossible_repeated_segments_name_the_argument():
    for bounds in ((0, 4), (5, 4), (4, 32), (-2, 3)):
        with pytest.raises(ValueError, match=rf"segment_lengths must satisfy 1 <= shortest <= longest < length 32, got \({bounds[0]}, {bounds[1]}\)"):
            RepeatedSegments(SPARSE_IDS, 32, batch_size=1, seed=0, segment_lengths=bounds)
    RepeatedSegments(SPARSE_IDS, 32, batch_size=1, seed=0, segment_lengths=(31, 31)).batch(0)  # one repeated token
    for ids in ([], [7]):
        with pytest.raises(ValueError, match=rf"token_ids needs at least 2 ids to draw from, got {len(ids)}"):
            RepeatedSegments(ids, 32, batch_size=1, seed=0, segment_lengths=(2, 4))


# --- packing ------------------------------------------------------------------------------------

PAD = 0


def distinct_samples(count: int, seed: int) -> list[PromptAnswer]:
    """Samples whose tokens name them: sample i's tokens are 1000 * i + position, its answer ends with PAD."""
    rng = random.Random(seed)
    result = []
    for i in range(1, count + 1):
        prompt_length, answer_length = rng.randint(1, 12), rng.randint(1, 5)
        tokens = [1000 * i + position for position in range(prompt_length + answer_length)]
        result.append(PromptAnswer(tokens[:prompt_length], tokens[prompt_length:] + [PAD]))
    return result


def unpack(inputs: list[int], targets: list[int], samples: list[PromptAnswer]) -> list[int]:
    """The indices of the samples packed into a row, checking each one's tokens and targets, and
    that the rest is padding scored nowhere."""
    placed, filled = [], 0
    while filled < len(inputs) and inputs[filled] != PAD:
        index = inputs[filled] // 1000 - 1
        sample = samples[index]
        tokens = sample.prompt + sample.answer
        assert inputs[filled:filled + len(tokens)] == tokens
        # the prompt is not scored; each answer token is the target one position before it
        assert targets[filled:filled + len(sample.prompt) - 1] == [IGNORE] * (len(sample.prompt) - 1)
        assert targets[filled + len(sample.prompt) - 1:filled + len(tokens) - 1] == sample.answer
        assert targets[filled + len(tokens) - 1] == IGNORE or inputs[filled + len(tokens)] != PAD
        placed.append(index)
        filled += len(tokens)
    assert inputs[filled:] == [PAD] * (len(inputs) - filled) and targets[filled:] == [IGNORE] * (len(inputs) - filled)
    assert len(inputs) - filled < min(map(len, samples))  # no sample fits what is left
    return placed


def test_packed_rows_hold_whole_samples_scoring_only_their_answers():
    samples = distinct_samples(10, seed=0)
    packed = PackedSamples(samples, length=40, batch_size=4, seed=3, pad_id=PAD)
    firsts = set()
    for step in range(60):
        batch = packed.batch(step)
        assert batch.inputs.shape == batch.targets.shape == (4, 40)
        scored = batch.targets != IGNORE
        assert torch.equal(batch.targets[:, :-1][scored[:, :-1]], batch.inputs[:, 1:][scored[:, :-1]]) and not scored[:, -1].any()
        for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
            placed = unpack(inputs, targets, samples)
            assert int((torch.tensor(targets) != IGNORE).sum()) == sum(len(samples[i].answer) for i in placed)
            firsts.add(placed[0])
    assert firsts == set(range(10))  # any sample may open a row
    assert torch.equal(packed.batch(5).inputs, packed.batch(5).inputs) and torch.equal(packed.batch(5).targets, packed.batch(5).targets)
    assert not torch.equal(packed.batch(5).inputs, packed.batch(6).inputs)
    other_seed = PackedSamples(samples, length=40, batch_size=4, seed=4, pad_id=PAD)
    assert not torch.equal(packed.batch(5).inputs, other_seed.batch(5).inputs)


def test_packing_refuses_samples_longer_than_the_rows():
    samples = distinct_samples(10, seed=0)
    longest = max(map(len, samples))
    PackedSamples(samples, length=longest, batch_size=1, seed=0, pad_id=PAD).batch(0)
    with pytest.raises(ValueError, match=rf"1 samples are longer than the rows' {longest - 1} tokens \(longest {longest}\)"):
        PackedSamples([s for s in samples if len(s) < longest] + [next(s for s in samples if len(s) == longest)], longest - 1, 1, 0, PAD)
    with pytest.raises(ValueError, match="at least one sample"):
        PackedSamples([], 40, 1, 0, PAD)


# --- loss, mixed sources, evaluation ----------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits do not depend on the inputs: [B, T, V]."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, use_cache=False):
        assert input_ids.shape == self.logits.shape[:2]
        return SimpleNamespace(logits=self.logits)


def targets_with_counts(counts: list[int], length: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.full((len(counts), length), IGNORE)
    for row, count in enumerate(counts):
        positions = torch.randperm(length, generator=generator)[:count]
        targets[row, positions] = torch.randint(vocab, (count,), generator=generator)
    return targets


def test_the_loss_is_the_mean_over_rows_of_each_rows_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(4, 12, 7)
    targets = targets_with_counts([1, 12, 0, 5], 12, 7, seed=1)
    batch = Batch(torch.zeros(4, 12, dtype=torch.long), targets)
    loss, correct, scored = position_loss(FixedLogits(logits), batch)
    row_means = []
    for row in (0, 1, 3):
        nats = [-torch.log_softmax(logits[row, t], -1)[targets[row, t]] for t in range(12) if targets[row, t] != IGNORE]
        row_means.append(sum(nats) / len(nats))
    torch.testing.assert_close(loss, sum(row_means) / 3)
    assert not math.isclose(loss.item(), F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item(), rel_tol=1e-3)
    assert scored.item() == 18
    scored_mask = targets != IGNORE
    assert correct.item() == int((logits.argmax(-1)[scored_mask] == targets[scored_mask]).sum())
    assert 0 < correct.item() < 18


def test_with_equal_scored_counts_the_loss_is_the_plain_mean():
    torch.manual_seed(1)
    logits = torch.randn(3, 10, 5)
    targets = targets_with_counts([4, 4, 4], 10, 5, seed=2)
    loss, _, _ = position_loss(FixedLogits(logits), Batch(torch.zeros(3, 10, dtype=torch.long), targets))
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


class Rows:
    """A source whose batch at `step` is `rows` rows of the value 100 * tag + step."""

    def __init__(self, tag: int, rows: int, length: int = 6, scored: int = 6):
        self.tag, self.rows, self.length, self.scored = tag, rows, length, scored

    def batch(self, step: int) -> Batch:
        inputs = torch.full((self.rows, self.length), 100 * self.tag + step)
        targets = torch.full_like(inputs, IGNORE)
        targets[:, :self.scored] = (inputs[:, :self.scored] + torch.arange(self.scored)) % 5
        return Batch(inputs, targets)


def test_concatenated_batches_stack_every_sources_rows_in_order():
    mixed = ConcatenatedBatches(Rows(1, 3), Rows(2, 1), Rows(3, 2))
    for step in (0, 4):
        batch = mixed.batch(step)
        assert batch.inputs[:, 0].tolist() == [100 + step] * 3 + [200 + step] + [300 + step] * 2
        assert torch.equal(batch.targets, torch.cat([Rows(t, r).batch(step).targets for t, r in ((1, 3), (2, 1), (3, 2))]))
    with pytest.raises(ValueError, match="at least one source"):
        ConcatenatedBatches()


def test_evaluating_named_sources_reports_each_under_its_name():
    torch.manual_seed(2)
    model = FixedLogits(torch.randn(2, 6, 5)).train()
    text, retrieval = Rows(1, 2), Rows(2, 2, scored=2)
    metrics = evaluate(model, {"text": text, "retrieval": retrieval}, 3, torch.device("cpu"))
    assert model.training  # evaluation leaves the mode as it found it
    assert sorted(metrics) == sorted(f"eval_{name}_{metric}" for name in ("text", "retrieval") for metric in ("loss", "accuracy", "positions"))
    for name, source in (("text", text), ("retrieval", retrieval)):
        alone = evaluate(model, source, 3, torch.device("cpu"))
        assert {key.replace("eval_", f"eval_{name}_"): value for key, value in alone.items()} == {k: v for k, v in metrics.items() if f"_{name}_" in k}
        losses = [position_loss(model, source.batch(step))[0].item() for step in range(3)]
        assert alone["eval_loss"] == pytest.approx(sum(losses) / 3)
    assert metrics["eval_text_positions"] == 3 * 2 * 6 and metrics["eval_retrieval_positions"] == 3 * 2 * 2


# --- scripts ------------------------------------------------------------------------------------


def test_retrieval_lengths_default_to_quarters_and_bad_ones_name_the_flag(tmp_path):
    script = load_script("train")

    def lengths(*flags):
        return script.retrieval_lengths(script.parse_args(["--attention", "softmax", "--data", "mixture", "--output", str(tmp_path), "--seq-length", "1024", *flags]))

    assert lengths() == [256, 512, 768, 1024]
    assert lengths("--retrieval-lengths", "1024,300") == [1024, 300]
    for bad, message in (("abc", r"--retrieval-lengths abc: expected comma-separated token counts"),
                         ("512,2048", r"--retrieval-lengths \[2048\] must be between 1 and --seq-length 1024"),
                         ("0", r"--retrieval-lengths \[0\] must be between 1")):
        with pytest.raises(SystemExit, match=message):
            lengths("--retrieval-lengths", bad)


def test_the_default_models_recipe_is_a_valid_mixture_run(tmp_path, monkeypatch):
    script = load_script("train_default_model")
    passed = []
    monkeypatch.setattr(script.train, "main", passed.append)
    script.main(["--attention", "softmax", "--steps", "7", "--output", str(tmp_path), "--seed", "3"])
    args = script.train.parse_args(passed[0])
    assert (args.attention, args.steps, args.output, args.seed, args.data) == ("softmax", 7, str(tmp_path), 3, "mixture")
    assert all(length <= args.seq_length for length in script.train.retrieval_lengths(args))
    assert 0 < args.retrieval_rows + args.dense_recall_rows < args.batch_size


def test_the_training_script_mixes_text_retrieval_and_copying_practice(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(3):
        (corpus / f"{index}.txt").write_text(" ".join(standin_sentences(400, seed=10 + index)), encoding="utf-8")
    tokenizer_folder = tmp_path / "tokenizer"
    merging_bpe_tokenizer().save_pretrained(tokenizer_folder)
    output = tmp_path / "run"
    load_script("train").main([
        "--attention", "stickbreaking", "--data", "mixture", "--corpus", str(corpus), "--tokenizer", str(tokenizer_folder),
        "--seq-length", "1024", "--retrieval-lengths", "512,1024", "--retrieval-samples", "2", "--retrieval-rows", "1",
        "--dense-recall-rows", "1", "--dense-recall-pool", "4", "--repeat-rows", "1", "--repeat-segment-lengths", "4,16",
        "--logit-offsets=0,-4", "--repeat-only-steps", "1",
        "--batch-size", "4", "--layers", "1", "--hidden", "32", "--heads", "2", "--steps", "2", "--eval-every", "2",
        "--eval-batches", "1", "--eval-documents", "1", "--device", "cpu", "--attention-backend", "torch", "--output", str(output),
    ])
    check_checkpoint_folder(output / "model", StickBreakingForCausalLM)
    rows = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    (evaluation,) = [row for row in rows if "eval_text_loss" in row]
    assert evaluation["step"] == 2 and math.isfinite(evaluation["eval_text_loss"]) and math.isfinite(evaluation["eval_retrieval_loss"])
    assert evaluation["eval_retrieval_positions"] > 0 and evaluation["eval_dense_recall_positions"] > 0
    assert math.isfinite(evaluation["eval_dense_recall_loss"])
    assert math.isfinite(evaluation["eval_repeats_loss"]) and 0 <= evaluation["eval_repeats_accuracy"] <= 1
    # one row of 1024 tokens whose segment of 4..16 tokens leaves 1024 - length positions scored
    assert 1024 - 16 <= evaluation["eval_repeats_positions"] <= 1024 - 4
    recorded = json.loads(capsys.readouterr().out.splitlines()[0])
    assert (recorded["repeat_rows"], recorded["repeat_segment_lengths"], recorded["logit_offsets"]) == (1, [4, 16], [0.0, -4.0])
    assert recorded["repeat_only_steps"] == 1
    # the checkpoint's query-key biases still hold the offsets (two warm-up steps barely move them)
    model = AutoModelForCausalLM.from_pretrained(output / "model")
    attention = model.transformer.h[0].attn
    q, k, _ = attention.split_heads(attention.c_attn(torch.zeros(1, 1, 32)))
    torch.testing.assert_close(attention.scale * (q * k).sum(-1).flatten(), torch.tensor([0.0, -4.0]), rtol=0, atol=0.05)
    # the held-out document is the evaluation haystack, the others the training one
    train_sentences, eval_sentences = (set(sentences_of(output / f"haystack_sentences_{name}.json")) for name in ("train", "eval"))
    assert eval_sentences and train_sentences and not eval_sentences & train_sentences
    assert all(sentence in (corpus / "0.txt").read_text(encoding="utf-8") for sentence in eval_sentences)


def test_bad_copying_and_offset_flags_name_the_flag(tmp_path):
    script = load_script("train")
    mqrar_run = ["--data", "mqrar", "--num-pairs", "4", "--seq-length", "24", "--pool-size", "8", "--batch-size", "2",
                 "--hidden", "32", "--heads", "2", "--steps", "1", "--device", "cpu", "--output", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match=r"--logit-offsets applies to --attention stickbreaking, not softmax"):
        script.main(["--attention", "softmax", "--logit-offsets=0,-4", *mqrar_run])
    for bad in ("-4", "0,-4,-8", "zero,-4", "nan,0", "0,inf"):
        with pytest.raises(SystemExit, match=rf"--logit-offsets={bad}: expected two finite numbers, FIRST,LAST"):
            script.main(["--attention", "stickbreaking", f"--logit-offsets={bad}", *mqrar_run])
    for flags, message in (
        (["--repeat-rows", "1"], "--repeat-rows and --repeat-only-steps apply to --data mixture"),
        (["--repeat-rows", "-1"], "--repeat-rows must be >= 0, got -1"),
        (["--repeat-only-steps", "-5"], "--repeat-only-steps must be >= 0, got -5"),
    ):
        with pytest.raises(SystemExit, match=message):
            script.main(["--attention", "stickbreaking", *flags, *mqrar_run])
    assert not (tmp_path / "run" / "model").exists()

    def segment_lengths(value):
        return script.repeat_segment_lengths(script.parse_args([
            "--attention", "stickbreaking", "--data", "mixture", "--output", str(tmp_path), "--seq-length", "256",
            "--repeat-rows", "1", "--repeat-segment-lengths", value,
        ]))

    assert segment_lengths("4,16") == (4, 16) and segment_lengths("255,255") == (255, 255)
    for bad in ("16", "4,8,16", "four,16"):
        with pytest.raises(SystemExit, match=rf"--repeat-segment-lengths {bad}: expected two token counts, shortest,longest"):
            segment_lengths(bad)
    for bad in ("16,4", "0,4", "4,256"):
        with pytest.raises(SystemExit, match=rf"--repeat-segment-lengths {bad}: need 1 <= shortest <= longest < --seq-length 256"):
            segment_lengths(bad)
