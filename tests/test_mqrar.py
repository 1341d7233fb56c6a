"""MQRAR: the task's definition on hand-written sequences (the paper's example among them), the
generated token form, its text form, and the lm-eval task run with sb_hf on a word-level model."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from sb_eval.model.configuration import tiny_config
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.ruler import mqrar
from sb_eval.ruler.mqrar import IGNORE, Vocabulary
from sb_eval.tasks import mqrar as mqrar_task
from sb_eval.tokenization import word_level_tokenizer

TASKS_DIR = Path(mqrar_task.__file__).parent
# The paper's letters and digits as ids of a small vocabulary: keys B P E X Z, values 1-6.
LETTERS = {letter: index for index, letter in enumerate("BPEXZ")}
PAPER_VOCABULARY = Vocabulary(num_keys=5, num_values=7)


def paper_ids(text: str) -> list[int]:
    return [LETTERS[s] if s in LETTERS else PAPER_VOCABULARY.value_id(int(s)) for s in text.split()]


def value(digit: int) -> int:
    return PAPER_VOCABULARY.value_id(digit)


def test_the_papers_example_answers_with_the_most_recent_assignment():
    inputs = paper_ids("B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4")
    expected = [IGNORE] * 10 + [value(3), IGNORE, value(6), IGNORE, value(2), IGNORE, value(1), IGNORE]
    # the second query of E answers 2 (its reassignment by the first query), not the distractor 3
    assert mqrar.targets(inputs, PAPER_VOCABULARY) == expected


def test_answer_distances_reach_back_to_the_assignment_that_set_the_answer():
    inputs = paper_ids("B 6 P 4 E 3 X 1 Z 2 E 2 B 1 E 5 B 4")
    distances = mqrar.answer_distances(inputs, PAPER_VOCABULARY)
    # E at 10 reaches its assignment at 4; E at 14 the reassignment made by the query at 10
    assert {t: d for t, d in enumerate(distances) if d != IGNORE} == {10: 6, 12: 12, 14: 4, 16: 4}
    for sequence in mqrar.sequences(20, 96, 8, PAPER_VOCABULARY, seed=3):
        distances = mqrar.answer_distances(sequence.inputs, PAPER_VOCABULARY)
        assert [d != IGNORE for d in distances] == [t != IGNORE for t in sequence.targets]
        for t in sequence.query_positions:  # the key asked about, followed by its answer
            assigned_at = t - distances[t]
            assert sequence.inputs[assigned_at] == sequence.inputs[t] and sequence.inputs[assigned_at + 1] == sequence.targets[t]


@pytest.mark.parametrize(
    ("text", "answers"),
    [
        ("B 1 B 2 B 3 B 4", {2: 1, 4: 2, 6: 3}),  # one key, reassigned at every query
        ("B 1 P 1 B 2 P 3 P", {4: 1, 6: 1, 8: 3}),  # equal values on two keys; ends on a query key
        ("B 6 P 4 B", {4: 6}),
        ("B 6", {}),
    ],
)
def test_hand_written_sequences(text, answers):
    inputs = paper_ids(text)
    expected = [value(answers[t]) if t in answers else IGNORE for t in range(len(inputs))]
    assert mqrar.targets(inputs, PAPER_VOCABULARY) == expected


def test_filler_values_assign_nothing_and_a_key_needs_its_value():
    # "B 6 4 B": the 4 follows a value, not a key, so B still holds 6
    assert mqrar.targets(paper_ids("B 6 4 B 1 3 B"), PAPER_VOCABULARY) == [IGNORE, IGNORE, IGNORE, value(6), IGNORE, IGNORE, value(1)]
    with pytest.raises(ValueError, match=r"inputs\[1\]=1 must be a value id: it follows the key inputs\[0\]"):
        mqrar.targets([0, 1], PAPER_VOCABULARY)
    with pytest.raises(ValueError, match=r"inputs\[2\]=12 is outside this vocabulary's ids 0..11"):
        mqrar.targets([0, 5, 12], PAPER_VOCABULARY)


@pytest.mark.parametrize("task", ["mqrar", "mqar"])
def test_power_law_sequences_follow_the_papers_code(task):
    vocabulary = Vocabulary(num_keys=40, num_values=30)
    for sequence in mqrar.sequences(30, seq_length=41, num_pairs=8, vocabulary=vocabulary, seed=3, task=task):
        inputs, targets = sequence.inputs, sequence.targets
        assert len(inputs) == len(targets) == 41 and targets == mqrar.targets(inputs, vocabulary)
        assigned = inputs[0:16:2]
        assert all(k < 40 for k in assigned) and all(v >= 40 for v in inputs[1:16:2])
        region = inputs[16:]
        asked = [(t, k) for t, k in enumerate(region) if k < 40]
        assert len(asked) == 8 and all(t % 2 == 0 for t, _ in asked)  # num_pairs query keys, each in a slot's first token
        assert {k for _, k in asked} <= set(assigned) and region[-1] >= 40  # the odd 41st token is filler
        if task == "mqar":  # Zoology's: distinct pairs, each key asked once, for its first value
            assert len(set(assigned)) == 8 and len(set(inputs[1:16:2])) == 8
            assert sorted(k for _, k in asked) == sorted(assigned)
            first_value = dict(zip(assigned, inputs[1:16:2]))
            assert all(targets[16 + t] == first_value[k] for t, k in asked)
        assert sequence.query_positions[-len(asked):] == [16 + t for t, _ in asked]


def test_mqrar_asks_keys_again_after_reassigning_them():
    sequences = mqrar.sequences(50, seq_length=128, num_pairs=16, vocabulary=Vocabulary(64, 64), seed=1)
    reassigned = [s.targets[t] != s.inputs[s.inputs.index(s.inputs[t]) + 1] for s in sequences for t in s.query_positions]
    assert 0.1 < sum(reassigned) / len(reassigned) < 0.6  # keys asked again answer their newer value


def test_query_slots_follow_zoologys_power_law():
    rng = random.Random(0)
    draws = Counter(mqrar._power_law_slots(rng, 3, 1)[0] for _ in range(20000))
    weights = [(slot + 1) ** (mqrar.POWER_LAW_A - 1) for slot in range(3)]
    for slot in range(3):
        assert draws[slot] / 20000 == pytest.approx(weights[slot] / sum(weights), abs=0.015)
    second = Counter(tuple(mqrar._power_law_slots(rng, 3, 2)) for _ in range(20000))
    # successive draws without replacement: P(0 then 1) = p0 * p1 / (1 - p0)
    p = [w / sum(weights) for w in weights]
    assert second[(0, 1)] / 20000 == pytest.approx(p[0] * p[1] / (1 - p[0]), abs=0.015)


def test_a_constant_filler_leaves_only_the_assignments_and_the_queries():
    vocabulary = Vocabulary(num_keys=40, num_values=20)
    filler = vocabulary.value_id(mqrar.CONSTANT_FILLER_VALUE)
    sequences = mqrar.sequences(30, seq_length=96, num_pairs=12, vocabulary=vocabulary, seed=2, task="mqar", filler="constant")
    for sequence in sequences:
        inputs, targets = sequence.inputs, sequence.targets
        assert targets == mqrar.targets(inputs, vocabulary)
        assert filler not in inputs[:24] and filler not in targets  # the filler is never assigned, so never an answer
        queries = sequence.query_positions
        assert len(queries) == 12 and sorted(inputs[q] for q in queries) == sorted(inputs[0:24:2])  # each key asked once
        assert all(token == filler for position, token in enumerate(inputs[24:], 24) if position not in queries)
    # the same sequence seeds as the random filler's: the same keys, assigned in the same order
    random_filler = mqrar.sequences(30, seq_length=96, num_pairs=12, vocabulary=vocabulary, seed=2, task="mqar")
    assert [s.inputs[0:24:2] for s in sequences] == [s.inputs[0:24:2] for s in random_filler]
    assert [s.inputs[24:] for s in sequences] != [s.inputs[24:] for s in random_filler]


def test_dense_sequences_ask_a_key_in_every_slot():
    vocabulary = Vocabulary(num_keys=12, num_values=5)
    sequences = mqrar.sequences(20, seq_length=41, num_pairs=6, vocabulary=vocabulary, seed=3, layout="dense")
    for sequence in sequences:
        inputs, targets = sequence.inputs, sequence.targets
        assert len(inputs) == len(targets) == 41
        keys, values = inputs[0::2], inputs[1::2]
        assert all(0 <= k < 12 for k in keys) and all(12 <= v < 17 for v in values)
        assert len(set(keys[:6])) == 6 and set(keys[6:]) <= set(keys[:6])  # queries ask assigned keys
        assert targets[:12] == [IGNORE] * 12 and targets[1::2] == [IGNORE] * 20
        assert all(t != IGNORE for t in targets[12::2])  # every later key is a query
        assert targets == mqrar.targets(inputs, vocabulary)
        # each reassignment changes the value, so an outdated value is never the answer
        assert all(inputs[t + 1] != targets[t] for t in sequence.query_positions if t + 1 < 41)
        assert sequence.query_positions == list(range(12, 41, 2))


def test_generation_is_seeded_and_a_larger_set_extends_a_smaller_one():
    small = mqrar.sequences(3, 64, 8, seed=5)
    assert mqrar.sequences(3, 64, 8, seed=5) == small
    assert mqrar.sequences(6, 64, 8, seed=5)[:3] == small
    assert mqrar.sequences(2, 64, 8, seed=5, first=1) == small[1:]  # a set made in parts
    assert mqrar.sequences(3, 64, 8, seed=6) != small
    assert mqrar.sequences(3, 64, 9, seed=5)[0].inputs[:16] != small[0].inputs[:16]
    assert mqrar.sequences(3, 64, 8, seed=5, task="mqar") != small
    assert mqrar.sequences(3, 64, 8, seed=5, layout="dense") != small


def test_the_papers_largest_setting_fills_every_slot():
    vocabulary = Vocabulary()
    assert vocabulary.size == 8192
    (sequence,) = mqrar.sequences(1, mqrar.PAPER_SEQ_LENGTH, max(mqrar.PAPER_NUM_PAIRS), vocabulary, task="mqar")
    assert sequence.query_positions == list(range(384, 768, 2))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(num_sequences=1, seq_length=64, num_pairs=17), "seq_length=64 cannot hold 17 pairs and as many query slots .* at most 16 pairs"),
        (dict(num_sequences=1, seq_length=64, num_pairs=32, layout="dense"), "seq_length=64 leaves no room for a query after 32 pairs"),
        (dict(num_sequences=1, seq_length=64, num_pairs=9, vocabulary=Vocabulary(8, 8), task="mqar"),
         "num_pairs=9 needs as many distinct keys and values, but num_keys=8"),
        (dict(num_sequences=1, seq_length=64, num_pairs=9, vocabulary=Vocabulary(8, 8), layout="dense"), "num_pairs=9 needs as many distinct keys"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, task="mqar", layout="dense"), "task='mqar' asks each key once"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, task="recall"), "task='recall' must be one of"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, layout="sparse"), "layout='sparse' must be one of"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, task="mqar", filler="zeros"), "filler='zeros' must be one of"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, filler="constant"), "filler='constant' is MQAR's .* task='mqrar'"),
        (dict(num_sequences=1, seq_length=64, num_pairs=8, vocabulary=Vocabulary(8, 8), task="mqar", filler="constant"),
         r"num_pairs=8 needs as many distinct keys and values, but num_keys=8 and num_values=8 \(one of them the filler\)"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, first=-1), "first=-1 must be a non-negative integer"),
        (dict(num_sequences=0, seq_length=64, num_pairs=4), "num_sequences=0 must be a positive integer"),
        (dict(num_sequences=1, seq_length=64, num_pairs=4, seed="x"), "seed='x' must be an integer"),
    ],
)
def test_bad_settings_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        mqrar.sequences(**arguments)


def test_bad_vocabularies_are_named():
    with pytest.raises(ValueError, match="num_values=1 must be at least 2 in layout='dense'"):
        mqrar.sequences(1, 16, 2, Vocabulary(4, 1), layout="dense")
    with pytest.raises(ValueError, match="num_keys=0 must be a positive integer"):
        Vocabulary(0, 4)


def test_symbols_round_trip_through_text_and_a_word_level_tokenizer():
    vocabulary = Vocabulary(num_keys=10, num_values=20)
    assert vocabulary.symbols[:2] == ["k0", "k1"] and vocabulary.symbols[10] == "v0"
    assert [vocabulary.symbol(i) for i in range(30)] == vocabulary.symbols
    (sequence,) = mqrar.sequences(1, 50, 5, vocabulary)
    text = vocabulary.text(sequence.inputs)
    assert vocabulary.ids(text) == sequence.inputs
    assert word_level_tokenizer(vocabulary.symbols)(text)["input_ids"] == sequence.inputs
    with pytest.raises(ValueError, match="'k10' is not a symbol"):
        vocabulary.ids("k1 v0 k10")


def _first_assignment(context_ids: list[int]) -> int:
    """A predictor that recalls a key's first value, the softmax model's mistake in the paper."""
    key = context_ids[-1]
    return context_ids[context_ids.index(key) + 1]


@pytest.mark.parametrize("layout", mqrar.LAYOUTS)
def test_instance_accuracy_is_the_token_forms_accuracy(layout):
    vocabulary = Vocabulary(num_keys=16, num_values=4)
    settings = dict(num_sequences=5, seq_length=40, num_pairs=6, vocabulary=vocabulary, seed=2, layout=layout)
    sequences = mqrar.sequences(**settings)
    token_hits = [
        _first_assignment(s.inputs[: t + 1]) == s.targets[t] for s in sequences for t in s.query_positions
    ]
    every_query = mqrar.instances(**settings, queries_per_sequence=1000)
    assert len(every_query) == len(token_hits) == sum(len(s.query_positions) for s in sequences)
    text_hits = [vocabulary.symbols[_first_assignment(vocabulary.ids(i["context"]))] == i["answer"] for i in every_query]
    assert text_hits == token_hits
    assert 0 < sum(token_hits) < len(token_hits)  # the distractor is sometimes right, sometimes not

    sampled = mqrar.instances(**settings, queries_per_sequence=3)
    assert len(sampled) == 15
    for instance in sampled:
        sequence = sequences[instance["sequence"]]
        position = instance["position"]
        assert instance["context"] == vocabulary.text(sequence.inputs[: position + 1])
        assert instance["answer"] == vocabulary.symbol(sequence.targets[position])
        assert instance["context"].split()[-1].startswith("k")
    # the sequences do not depend on how many queries are drawn from them
    assert {(i["sequence"], i["position"]) for i in sampled} <= {(i["sequence"], i["position"]) for i in every_query}


def test_custom_dataset_reads_the_metadata():
    docs = mqrar_task.custom_dataset(num_pairs=[4, 8], max_seq_lengths=[40], num_samples=3, queries_per_sequence=2,
                                     seed=1, num_keys=10, num_values=6, pretrained="ignored", version=1.0)["test"]
    assert docs["num_pairs"] == [4, 8] * 6
    assert set(docs["seq_length"]) == {40}
    expected = mqrar.instances(3, 40, 8, Vocabulary(10, 6), seed=1, queries_per_sequence=2)
    assert [d["context"] for d in docs if d["num_pairs"] == 8] == [i["context"] for i in expected]
    assert mqrar_task.process_results(docs[1], [(-0.5, True)]) == {"acc": 1.0, "acc_8": 1.0}
    assert len(mqrar_task.custom_dataset(num_pairs=32, num_samples=1)["test"]) == 4  # paper length 768
    constant = mqrar_task.custom_dataset(num_pairs=4, seq_length=40, num_samples=3, task="mqar", filler="constant",
                                         num_keys=10, num_values=6)["test"]
    filler = Vocabulary(10, 6).symbol(Vocabulary(10, 6).value_id(mqrar.CONSTANT_FILLER_VALUE))
    assert constant["context"] == [i["context"] for i in mqrar.instances(3, 40, 4, Vocabulary(10, 6), 42, 4, "mqar", filler="constant")]
    assert filler not in constant["answer"] and any(filler in context.split() for context in constant["context"])


@pytest.mark.parametrize("pair_counts", [[32, 190], [190, 32]])
def test_custom_dataset_keeps_every_instance_of_counts_with_fewer_queries(pair_counts):
    # densely, 190 pairs leave 4 of 384 symbols: 2 queries per sequence, fewer than queries_per_sequence
    docs = mqrar_task.custom_dataset(num_pairs=pair_counts, seq_length=384, num_samples=5, layout="dense")["test"]
    fewer = mqrar.instances(5, 384, 190, seed=mqrar_task.DEFAULT_SEED, layout="dense")
    assert len(fewer) == 10
    assert [d["context"] for d in docs if d["num_pairs"] == 190] == [i["context"] for i in fewer]
    assert docs["num_pairs"].count(32) == 20
    # round-robin while both counts last, then the rest of the count with more
    assert docs["num_pairs"] == pair_counts * 10 + [32] * 10


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (dict(max_seq_lengths=[1024, 2048]), "mqrar takes one sequence length per run"),
        (dict(max_seq_lengths=[1024], seq_length=768), "seq_length=768 and max_seq_lengths=\\[1024\\] disagree"),
        (dict(num_pairs="32"), "num_pairs='32' must be a positive integer or a list"),
        (dict(num_pairs=[32, 0]), "num_pairs=0 must be a positive integer"),
        (dict(num_pairs=[200], seq_length=1024, num_keys=100, task="mqar"),
         "num_pairs=200 needs as many distinct keys and values, but num_keys=100"),
        (dict(num_pairs=[32, 192], seq_length=384),
         r"num_pairs=\[32, 192\], seq_length=384: seq_length=384 cannot hold 192 pairs .* at most 96 pairs"),
        (dict(num_pairs=[32, 192], seq_length=384, layout="dense"), r"leaves no room for a query after 192 pairs .* at most 191 pairs"),
        (dict(task="recall"), r"metadata task='recall' must be one of \['mqrar', 'mqar'\]"),
        (dict(layout="sparse"), r"metadata layout='sparse' must be one of"),
    ],
)
def test_custom_dataset_errors_name_the_setting(metadata, message):
    with pytest.raises(ValueError, match=message):
        mqrar_task.custom_dataset(num_samples=1, **metadata)


@pytest.fixture(scope="module")
def word_level_checkpoint(tmp_path_factory):
    """A tiny random stick-breaking model over a small MQRAR vocabulary and its word-level
    tokenizer (end-of-text after the symbols)."""
    vocabulary = Vocabulary(num_keys=12, num_values=8)
    end = vocabulary.size
    config = tiny_config(vocab_size=end + 1, n_layer=2, n_embd=64, n_head=2, n_inner=128,
                         bos_token_id=end, eos_token_id=end, pad_token_id=end)
    folder = write_random_checkpoint(tmp_path_factory.mktemp("mqrar") / "checkpoint", config, seed=3)
    word_level_tokenizer(vocabulary.symbols).save_pretrained(folder)
    return folder, vocabulary


def test_lm_eval_scores_mqrar_with_sb_hf_as_the_token_form(word_level_checkpoint, tmp_path):
    from sb_eval.harness.stick_breaking_lm import StickBreakingLM

    folder, vocabulary = word_level_checkpoint
    model = StickBreakingLM(pretrained=str(folder), attention_backend="torch", device="cpu", batch_size=4)
    metadata = dict(num_pairs=[3, 6], max_seq_lengths=[30], num_samples=2, queries_per_sequence=3,
                    num_keys=vocabulary.num_keys, num_values=vocabulary.num_values, seed=7)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    output = lm_eval.simple_evaluate(model=model, tasks=["mqrar"], task_manager=manager, log_samples=True)
    results = output["results"]["mqrar"]
    samples = output["samples"]["mqrar"]
    assert len(samples) == 12
    assert set(results) >= {"acc,none", "acc_3,none", "acc_6,none"} and "acc_16,none" not in results
    # the same accuracy, computed on token ids: argmax of the logits at the query key's position
    network = model.model
    hits = {3: [], 6: []}
    for sample in samples:
        doc = sample["doc"]
        sequence = mqrar.sequences(2, 30, doc["num_pairs"], vocabulary, seed=7)[doc["sequence"]]
        ((context, continuation),) = sample["arguments"]
        # what the model scores: the ids of the token form, the answer as one token
        assert model._encode_pair(context, continuation) == (sequence.inputs[: doc["position"] + 1], [sequence.targets[doc["position"]]])
        with torch.no_grad():
            logits = network(torch.tensor([sequence.inputs[: doc["position"] + 1]])).logits[0, -1]
        correct = int(logits.argmax()) == sequence.targets[doc["position"]]
        assert sample["acc"] == float(correct)
        hits[doc["num_pairs"]].append(correct)
    for count, values in hits.items():
        assert results[f"acc_{count},none"] == pytest.approx(sum(values) / len(values))
    assert results["acc,none"] == pytest.approx(sum(hits[3] + hits[6]) / 12)
    json.dumps(output["results"])  # plain numbers, as sb-eval sweep records them
