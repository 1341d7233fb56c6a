"""sb_eval.ruler: fitting, needles and answers, RULER's wording, determinism, caching, scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from test_ruler_helpers import merging_bpe_tokenizer, write_standin_essays

from sb_eval.ruler import registry
from sb_eval.ruler.corpora import MissingCorpusError
from sb_eval.ruler.fitting import Draft
from sb_eval.ruler.generate import generate
from sb_eval.ruler.haystacks import NOISE, RepeatedText
from sb_eval.ruler.registry import TASKS, TaskSpec
from sb_eval.ruler.scoring import string_match_all
from sb_eval.tokenization import byte_level_tokenizer

NIAH_TASKS = [name for name, spec in TASKS.items() if spec.generator == "niah"]
TOKENIZERS = {"bytes": byte_level_tokenizer, "bpe": merging_bpe_tokenizer}


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """A data directory holding a stand-in essay corpus; the sample cache lives there too."""
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path))
    write_standin_essays(tmp_path)
    return tmp_path


def _generate(task, length=4096, tokenizer="bpe", num_samples=6, seed=42, **kwargs):
    return generate(task, length, TOKENIZERS[tokenizer](), num_samples, seed, **kwargs)


# RULER's essay steps are 500 words, more than 2048 byte tokens hold: there its sizing has no size.
SIZED = [
    (task, tokenizer, length, sizing)
    for task, tokenizer in [(t, k) for t in NIAH_TASKS for k in TOKENIZERS] + [("vt", "bpe")]
    for length in (2048, 8192)
    for sizing in ("ruler", "fill")
    if not (sizing == "ruler" and tokenizer == "bytes" and length == 2048 and TASKS[task].params.get("type_haystack") == "essay")
]


@pytest.mark.parametrize(("task", "tokenizer", "length", "sizing"), SIZED)
def test_every_sample_fits_its_budget_and_fill_fills_it(task, tokenizer, length, sizing):
    budget = TASKS[task].tokens_to_generate
    samples = _generate(task, length, tokenizer, sizing=sizing)
    tokenizer = TOKENIZERS[tokenizer]()
    counted = tokenizer([s["input"] for s in samples])["input_ids"]
    plain = tokenizer([s["input"] for s in samples], add_special_tokens=False)["input_ids"]
    for sample, ids, plain_ids in zip(samples, counted, plain):
        assert sample["length"] == len(ids)
        # RULER's sizes count the input without special tokens; filling counts them.
        assert (len(plain_ids) if sizing == "ruler" else len(ids)) + budget <= length
        if sizing == "fill":
            assert (sample["length"] + budget) / length >= 0.9
        assert sample["max_length"] == length
        assert sample["input"].endswith(sample["answer_prefix"])


def test_a_tokenizer_that_does_not_count_additively_is_checked_sample_by_sample():
    # Four characters a token, rounded down: the sum of the pieces' counts undercounts the whole.
    def tokenizer(text):
        return list(range(len(text) // 4))

    samples = generate("niah_multikey_2", 4096, tokenizer, 5, use_cache=False)
    for sample in samples:
        assert sample["length"] == len(sample["input"]) // 4
        assert sample["length"] + 128 <= 4096


def _needles(text):
    # Word keys are "adjective-noun" pairs of wonderwords' lists, some with spaces ("ad hoc").
    return re.findall(r"One of the special magic (\w+) for (.+?) is: (\S+)\.", text)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_needles_hold_the_answers_to_the_question(task):
    params = TASKS[task].params
    num_keys = max(params.get("num_needle_k", 1), params.get("num_needle_q", 1))
    num_values = params.get("num_needle_v", 1)
    for sample in _generate(task, num_samples=10):
        text = sample["input"]
        question = text[text.rindex("\nWhat "):]
        queried = re.search(r" for (.+) mentioned in the provided text\?", question).group(1)
        queried_keys = re.split(r", and |, ", queried)
        assert len(queried_keys) == params.get("num_needle_q", 1)
        planted = [n for n in _needles(text) if n[1] in queried_keys]
        assert sorted(value for _, _, value in planted) == sorted(sample["outputs"])
        assert len(sample["outputs"]) == len(queried_keys) * num_values
        if params["type_haystack"] != "needle":
            assert len(_needles(text)) == num_keys * num_values
        patterns = {"numbers": r"\d{7}", "uuids": r"[0-9a-f-]{36}", "words": r"\S.*-.*\S"}
        assert all(re.fullmatch(patterns[params["type_needle_v"]], v) for v in sample["outputs"])
        assert all(re.fullmatch(patterns[params["type_needle_k"]], k) for k in queried_keys)


def test_niah_wording_is_rulers_singular_for_one_answer_plural_otherwise():
    single = _generate("niah_single_1", num_samples=1)[0]
    key = single["input"].split("What is the special magic number for ")[1].split(" mentioned")[0]
    assert single["input"].startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the number afterwards.\nThe grass is green. The sky is blue. "
    )
    assert single["input"].endswith(
        f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )
    assert single["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    multi = _generate("niah_multiquery", num_samples=1)[0]
    query = multi["input"].split("What are all the special magic numbers for ")[1].split(" mentioned")[0]
    assert re.fullmatch(r"\S+, \S+, \S+, and \S+", query)
    assert multi["input"].startswith("Some special magic numbers are hidden within the following text.")
    assert multi["input"].endswith(f"The special magic numbers for {query} mentioned in the provided text are")


def test_noise_and_needle_haystacks_are_lines_and_the_essay_haystack_is_the_corpus_start(data_dir):
    noise = _generate("niah_single_1", num_samples=1)[0]["input"].split("\n")[1:-1]
    assert sorted(set(noise))[1:] == [NOISE] and len(_needles("\n".join(noise))) == 1
    distractors = _generate("niah_multikey_2", num_samples=1)[0]["input"].split("\n")[1:-1]
    assert len(distractors) > 20 and all(_needles(line) for line in distractors)
    corpus = " ".join(write_standin_essays(data_dir))
    for sample in _generate("niah_single_2", num_samples=20):
        context = sample["input"].split("afterwards.\n", 1)[1].rsplit("\nWhat is", 1)[0]
        (needle,) = re.findall(r"One of the special magic numbers for .+? is: \d+\.", context)
        haystack = context.replace(needle, "").replace("  ", " ").strip()
        assert corpus.startswith(haystack + " ")


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needle_depths_spread_over_the_samples(task):
    depths = []
    for sample in _generate(task, num_samples=200):
        text = sample["input"]
        start, end = text.index("afterwards.\n"), text.rindex("\nWhat is")
        needle = f"for {text[end:].split(' for ')[1].split(' mentioned')[0]} is:"
        depths.append((text.index(needle) - start) / (end - start))
    quarters = Counter(min(3, int(depth * 4)) for depth in depths)
    assert all(30 <= quarters[q] <= 70 for q in range(4)), quarters


def test_variable_tracking_hides_one_chain_after_a_solved_example():
    for sample in _generate("vt", num_samples=5):
        text = sample["input"]
        example, prompt = text.split("\n\n\n\n")
        assert example.startswith("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        assert re.search(r"they are:  [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}$", example)
        names = sample["outputs"]
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", name) for name in names)
        value = re.search(rf"VAR {names[0]} = (\d{{5}}) ", prompt).group(1)
        statements = [f"VAR {names[0]} = {value} "] + [f"VAR {b} = VAR {a}  " for a, b in zip(names, names[1:])]
        positions = [prompt.index(statement) for statement in statements]
        assert positions == sorted(positions)
        assert prompt.endswith(
            f"\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
            f"According to the chain(s) of variable assignment in the text above, 5 variables are assgined "
            f"the value {value}, they are: "
        )


def test_the_solved_example_grows_past_500_tokens_only_where_500_cannot_hold_it():
    def example_length(sample, tokenizer):
        example_input = sample["input"].split("they are: ")[0] + "they are: "
        return len(TOKENIZERS[tokenizer]()(example_input)["input_ids"])

    assert all(example_length(s, "bpe") + 30 <= 500 for s in _generate("vt"))
    assert all(500 < example_length(s, "bytes") + 30 <= 1000 for s in _generate("vt", tokenizer="bytes"))


def test_samples_depend_on_task_length_and_seed_only():
    alone = _generate("niah_multikey_1", use_cache=False)
    for other in ["niah_single_1", "vt", "niah_multikey_3"]:
        _generate(other, use_cache=False)
    assert _generate("niah_multikey_1", use_cache=False) == alone
    assert _generate("niah_multikey_1", seed=7, use_cache=False) != alone
    # The needles do not depend on the tokenizer either, only where the haystack ends.
    with_bytes = _generate("niah_multikey_1", length=8192, tokenizer="bytes", use_cache=False)
    assert [s["outputs"] for s in with_bytes] == [s["outputs"] for s in _generate("niah_multikey_1", length=8192)]


def test_a_set_is_read_back_from_the_cache(monkeypatch, tmp_path):
    first = _generate("niah_single_3", cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_generation(*args):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr("sb_eval.ruler.generate._generate_set", no_generation)
    assert _generate("niah_single_3", cache_dir=tmp_path / "cache") == first
    with pytest.raises(AssertionError, match="generated again"):
        _generate("niah_single_3", tokenizer="bytes", cache_dir=tmp_path / "cache")
    with pytest.raises(AssertionError, match="generated again"):
        _generate("niah_single_3", num_samples=5, cache_dir=tmp_path / "cache")


def test_string_match_all_is_rulers_percentage_of_answers_found():
    assert string_match_all(" 1234567 and 7654321.", ["1234567", "7654321"]) == 100.0
    assert string_match_all("1234567, and then 42", ["1234567", "7654321"]) == 50.0
    assert string_match_all("ABCDEF01-...", ["abcdef01"]) == 100.0
    assert string_match_all("", ["QWERT"]) == 0.0
    assert string_match_all(" QWE\x00RT ", ["QWE\nRT"]) == 100.0


def test_a_registered_generator_gets_the_same_fitting_seeding_and_caching():
    @registry.register_generator("test_passkey")
    def passkey(set_rng, target, digits):
        def draw(rng, index):
            key = str(rng.randrange(10 ** (digits - 1), 10**digits))
            depth = rng.random()
            return Draft(
                head="Remember the pass key.\n",
                tail="\nWhat is the pass key?",
                answer_prefix=" The pass key is",
                outputs=[key],
                haystack=RepeatedText(NOISE, " "),
                inserts=[f"The pass key is {key}. Remember it."],
                place=lambda units: [int(depth * units)],
            )

        return registry.Sampler(draw)

    try:
        # Without a RULER counterpart the default sizing fills the context.
        spec = TaskSpec("test_passkey", 16, {"digits": 6})
        samples = generate(spec, 2048, merging_bpe_tokenizer(), 4)
        assert all(f"The pass key is {s['outputs'][0]}. Remember it." in s["input"] for s in samples)
        assert all(2048 * 0.9 <= s["length"] + 16 <= 2048 for s in samples)
    finally:
        del registry.GENERATORS["test_passkey"]


def test_bad_arguments_are_named_with_what_is_valid(data_dir):
    with pytest.raises(ValueError, match=r"task='niah_single_9'.*niah_single_1"):
        _generate("niah_single_9")
    with pytest.raises(ValueError, match=r"type_needle_v='colours'.*numbers"):
        _generate(TaskSpec("niah", 128, {"type_needle_v": "colours"}))
    with pytest.raises(ValueError, match=r"'niah' has no parameter num_needles; valid: type_haystack, "):
        _generate(TaskSpec("niah", 128, {"num_needles": 2}))
    with pytest.raises(ValueError, match=r"generator='haiku' is not registered; valid: .*niah"):
        _generate(TaskSpec("haiku", 16))
    with pytest.raises(ValueError, match=r"type_haystack='poems'.*essay"):
        _generate(TaskSpec("niah", 128, {"type_haystack": "poems"}))
    with pytest.raises(ValueError, match=r"max_seq_length=300 .*longer max_seq_length"):
        _generate("niah_multikey_2", length=300, tokenizer="bytes")
    with pytest.raises(ValueError, match=r"max_seq_length=300 is too short for this task's prompt"):
        _generate("niah_single_2", length=300, tokenizer="bytes", sizing="fill")
    with pytest.raises(ValueError, match=r"max_seq_length=300 leaves 0 units of haystack at RULER's size"):
        _generate("niah_single_2", length=300, tokenizer="bytes")
    with pytest.raises(ValueError, match=r"sizing='fit' is not a sizing; valid: \['ruler', 'fill'\]"):
        _generate("niah_single_2", sizing="fit")
    with pytest.raises(ValueError, match=r"solved example does not fit in max_seq_length=700"):
        _generate("vt", length=700, tokenizer="bytes")

    @registry.register_generator("test_unplaced")
    def unplaced(set_rng, target):  # inserts a needle but does not say where
        return registry.Sampler(lambda rng, index: Draft("Head.\n", "\nTail?", " Answer:", ["x"], RepeatedText(NOISE, " "), ["x"]))

    try:
        with pytest.raises(ValueError, match=r"Draft.place\(\d+\) returned \[\]: it must give one unit index"):
            generate(TaskSpec("test_unplaced", 16), 1024, merging_bpe_tokenizer(), 1, use_cache=False)
    finally:
        del registry.GENERATORS["test_unplaced"]
    (data_dir / "essays" / "sentences.json").unlink()
    with pytest.raises(MissingCorpusError, match="sb-eval data fetch essays"):
        _generate("niah_single_2", use_cache=False)
