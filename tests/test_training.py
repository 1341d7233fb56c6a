"""The trainer: both model kinds learn, a resumed run equals an uninterrupted one, checkpoints load."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sb_eval.checkpoint import check_checkpoint_folder
from sb_eval.tokenizer import byte_level_tokenizer, word_level_tokenizer
from sb_eval.training import (
    IGNORE, Batch, ModelSize, SequencePool, TokenWindows, TrainSettings, build_model, token_stream, train,
)

SYMBOLS = [f"s{i}" for i in range(16)]


def recall_pool(rows: int, length: int, seed: int, batch_size: int = 8) -> SequencePool:
    """Random symbols; each position from the second on must name the symbol before it, which
    only attention can see (learnt in a few dozen steps)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, len(SYMBOLS), (rows, length), generator=generator)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, 1:] = inputs[:, :-1]
    return SequencePool(inputs.tolist(), targets.tolist(), batch_size=batch_size, seed=seed)


def settings(**overrides) -> TrainSettings:
    fields = dict(steps=6, lr=3e-3, warmup_steps=2, log_every=5, eval_every=3, eval_batches=1, save_every=3, attention_backend="torch")
    fields.update(overrides)
    return TrainSettings(**fields)


@pytest.fixture
def tokenizer():
    return word_level_tokenizer(SYMBOLS)


def size(tokenizer) -> ModelSize:
    return ModelSize(layers=2, hidden=32, heads=2, vocab_size=len(tokenizer), max_length=64)


@pytest.mark.parametrize("attention", ["stickbreaking", "softmax"])
def test_training_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path, tokenizer, attention):
    torch.manual_seed(0)
    model = build_model(attention, size(tokenizer), tokenizer)
    train_source, eval_source = recall_pool(64, 32, seed=1), recall_pool(16, 32, seed=2)
    folder = train(model, tokenizer, train_source, eval_source, settings(steps=80, eval_every=80, save_every=80), tmp_path, device="cpu")

    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[0] - 0.3
    assert all(row["tokens_per_s"] > 0 for row in rows if "loss" in row)
    assert any("eval_accuracy" in row for row in rows)

    if attention == "stickbreaking":
        check_checkpoint_folder(folder)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.model_type == ("stickbreaking" if attention == "stickbreaking" else "llama")
    batch = eval_source.batch(0)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch.inputs).logits, model(input_ids=batch.inputs).logits)


def logged_steps(run: Path) -> list[tuple[int, bool]]:
    """(step, whether it is an evaluation) of every row of a run's log."""
    return [(row["step"], "eval_loss" in row) for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, tokenizer):
    def fresh_model():
        torch.manual_seed(0)
        return build_model("stickbreaking", size(tokenizer), tokenizer)

    train_source, eval_source = recall_pool(32, 16, seed=1), recall_pool(8, 16, seed=2)
    every_step = dict(log_every=1, save_every=2)  # the cut (step 3's evaluation) is a step after the saved state
    whole = train(fresh_model(), tokenizer, train_source, eval_source, settings(**every_step), tmp_path / "whole", device="cpu")

    def stop_at_first_evaluation(step, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(fresh_model(), tokenizer, train_source, eval_source, settings(**every_step), tmp_path / "cut", device="cpu", on_eval=stop_at_first_evaluation)
    assert not (tmp_path / "cut" / "model").exists()
    resumed = train(fresh_model(), tokenizer, train_source, eval_source, settings(**every_step), tmp_path / "cut", device="cpu")

    assert logged_steps(tmp_path / "cut") == logged_steps(tmp_path / "whole")  # steps after the saved state logged once
    whole_weights = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    resumed_weights = AutoModelForCausalLM.from_pretrained(resumed).state_dict()
    for name, tensor in whole_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


def test_resuming_with_other_settings_is_refused(tmp_path, tokenizer):
    model = build_model("softmax", size(tokenizer), tokenizer)
    pool = recall_pool(16, 16, seed=1)
    train(model, tokenizer, pool, pool, settings(steps=3), tmp_path, device="cpu")
    with pytest.raises(ValueError, match=r"lr: 0\.003 -> 0\.001"):
        train(model, tokenizer, pool, pool, settings(steps=3, lr=1e-3), tmp_path, device="cpu")


def test_token_windows_predict_the_next_token_and_repeat_for_a_step():
    tokenizer = byte_level_tokenizer()
    stream = token_stream(["hello world", "stick breaking"], tokenizer)
    assert stream.tolist() == list(b"hello world") + [256] + list(b"stick breaking") + [256]
    windows = TokenWindows(stream, length=8, batch_size=3, seed=0)
    batch = windows.batch(5)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert torch.equal(windows.batch(5).inputs, batch.inputs)
    with pytest.raises(ValueError, match="a window needs length"):
        TokenWindows(stream, length=len(stream), batch_size=1, seed=0)


def test_sequence_pool_covers_every_row_once_per_epoch():
    pool = recall_pool(12, 8, seed=3, batch_size=4)
    epoch = torch.cat([pool.batch(step).inputs for step in range(3)])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, pool.inputs.tolist()))


def test_bad_sizes_and_kinds_name_the_field(tokenizer):
    with pytest.raises(ValueError, match="multiple of heads"):
        ModelSize(layers=1, hidden=30, heads=4, vocab_size=10, max_length=8)
    with pytest.raises(ValueError, match="attention must be one of"):
        build_model("linear", size(tokenizer), tokenizer)


def test_word_level_tokenizer_round_trips_symbols():
    tokenizer = word_level_tokenizer(SYMBOLS)
    ids = tokenizer("s3 s15 s0", add_special_tokens=False).input_ids
    assert ids == [3, 15, 0]
    assert tokenizer.decode(ids) == "s3 s15 s0"
    assert tokenizer.eos_token_id == len(SYMBOLS)
    with pytest.raises(ValueError, match="duplicates"):
        word_level_tokenizer(["a", "a"])


def test_a_batch_with_nothing_to_score_is_named(tmp_path, tokenizer):
    inputs = [[1, 2, 3, 4]] * 4
    nothing = SequencePool(inputs, [[IGNORE] * 4] * 4, batch_size=2, seed=0)
    model = build_model("softmax", size(tokenizer), tokenizer)
    with pytest.raises(ValueError, match="batch 0 of the training data has no scored position"):
        train(model, tokenizer, nothing, nothing, settings(), tmp_path, device="cpu")


def test_the_training_script_trains_mqrar_and_writes_a_checkpoint_sb_hf_loads(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main([
        "--attention", "stickbreaking", "--data", "mqrar", "--num-pairs", "4", "--seq-length", "24",
        "--pool-size", "16", "--batch-size", "4", "--hidden", "32", "--heads", "2", "--steps", "2",
        "--eval-batches", "1", "--attention-backend", "torch", "--device", "cpu", "--output", str(tmp_path),
    ])
    check_checkpoint_folder(tmp_path / "model")
    from transformers import AutoTokenizer

    from sb_eval.ruler import mqrar

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    sequence = mqrar.sequences(1, 24, 4, seed=5)[0]
    assert tokenizer(mqrar.Vocabulary().text(sequence.inputs), add_special_tokens=False).input_ids == sequence.inputs


def test_a_learnt_bpe_round_trips_text_and_ends_with_end_of_text():
    from sb_eval.tokenizer import train_bpe_tokenizer

    texts = ["the stick breaks nearest first, and the stick is what remains"] * 20
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    assert 256 < len(tokenizer) <= 301 and tokenizer.eos_token_id == len(tokenizer) - 1
    text = "the stick breaks: ünïcode too"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text.encode()) and tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="at least the 256 byte tokens"):
        train_bpe_tokenizer(texts, vocab_size=100)
