"""The trainer: both model kinds learn, a resumed run equals an uninterrupted one, checkpoints load."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sb_eval.model.checks import check_checkpoint_folder
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.tokenization import byte_level_tokenizer, word_level_tokenizer
from sb_eval.training.trainer import (
    IGNORE,
    Batch,
    Curriculum,
    ModelSize,
    SequencePool,
    TokenWindows,
    TrainSettings,
    build_model,
    token_stream,
    train,
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
        check_checkpoint_folder(folder, StickBreakingForCausalLM)
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
    check_checkpoint_folder(tmp_path / "model", StickBreakingForCausalLM)
    from transformers import AutoTokenizer

    from sb_eval.ruler import mqrar

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    sequence = mqrar.sequences(1, 24, 4, seed=5)[0]
    assert tokenizer(mqrar.Vocabulary().text(sequence.inputs), add_special_tokens=False).input_ids == sequence.inputs


def test_the_training_script_takes_the_control_task_and_a_vocabulary(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", Path(__file__).parents[1] / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    run = ["--attention", "softmax", "--data", "mqrar", "--num-pairs", "4", "--seq-length", "24", "--num-keys", "8",
           "--num-values", "6", "--pool-size", "16", "--batch-size", "4", "--hidden", "32", "--heads", "2", "--steps", "1",
           "--eval-batches", "1", "--device", "cpu"]
    script.main([*run, "--task", "mqar", "--output", str(tmp_path / "mqar")])
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "mqar" / "model")) == 8 + 6 + 1
    logged = json.loads((tmp_path / "mqar" / "log.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    with pytest.raises(SystemExit, match="--seq-length 24 --num-pairs 4: task='mqar' asks each key once"):
        script.main([*run, "--task", "mqar", "--layout", "dense", "--output", str(tmp_path / "dense")])
    with pytest.raises(SystemExit, match="--seq-length 24 --num-pairs 7: seq_length=24 cannot hold 7 pairs"):
        script.main([*run, "--num-pairs", "7", "--output", str(tmp_path / "long")])


def test_a_learnt_bpe_round_trips_text_and_ends_with_end_of_text():
    from sb_eval.tokenization import train_bpe_tokenizer

    texts = ["the stick breaks nearest first, and the stick is what remains"] * 20
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    assert 256 < len(tokenizer) <= 301 and tokenizer.eos_token_id == len(tokenizer) - 1
    text = "the stick breaks: ünïcode too"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) < len(text.encode()) and tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="at least the 256 byte tokens"):
        train_bpe_tokenizer(texts, vocab_size=100)


# --- initial attention logit offsets ------------------------------------------------------------


def bias_logits(model) -> torch.Tensor:
    """[layers, heads] scale * q . k for a zero input to each layer's c_attn (its bias alone), with
    q and k split the way the attention splits them."""
    per_layer = []
    for block in model.transformer.h:
        attention = block.attn
        q, k, v = attention.split_heads(attention.c_attn(torch.zeros(1, 1, model.config.n_embd)))  # [1, H, 1, D]
        assert not v.any()  # the values' bias is left at zero
        per_layer.append(attention.scale * (q * k).sum(-1).flatten())
    return torch.stack(per_layer)


def test_logit_offsets_spread_evenly_over_the_heads_of_every_layer(tokenizer):
    four_heads = ModelSize(layers=2, hidden=32, heads=4, vocab_size=len(tokenizer), max_length=64)
    with torch.no_grad():
        model = build_model("stickbreaking", four_heads, tokenizer, logit_offsets=(0.0, -6.0))
        torch.testing.assert_close(bias_logits(model), torch.tensor([[0.0, -2.0, -4.0, -6.0]] * 2), rtol=0, atol=1e-5)
        rising = build_model("stickbreaking", size(tokenizer), tokenizer, logit_offsets=(-1.5, 3.0))
        torch.testing.assert_close(bias_logits(rising), torch.tensor([[-1.5, 3.0]] * 2), rtol=0, atol=1e-5)
        one_head = ModelSize(layers=1, hidden=32, heads=1, vocab_size=len(tokenizer), max_length=64)
        torch.testing.assert_close(bias_logits(build_model("stickbreaking", one_head, tokenizer, logit_offsets=(-3.0, -7.0))),
                                   torch.tensor([[-3.0]]), rtol=0, atol=1e-5)
    assert all(block.attn.c_attn.bias.requires_grad for block in model.transformer.h)  # trained like any other weight
    assert build_model("stickbreaking", size(tokenizer), tokenizer).transformer.h[0].attn.c_attn.bias is None


def captured_logits(model, input_ids: torch.Tensor, monkeypatch) -> list[torch.Tensor]:
    """Each layer's logits scale * q . k [B, H, T, T] on a forward pass, taken where the model hands
    q and k to the attention op."""
    import sb_eval.model.modeling

    logits, attention = [], sb_eval.model.modeling.stickbreaking_attention

    def recording(q, k, v, *, scale, **options):
        logits.append(scale * q @ k.transpose(-1, -2))
        return attention(q, k, v, scale=scale, **options)

    monkeypatch.setattr(sb_eval.model.modeling, "stickbreaking_attention", recording)
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    monkeypatch.undo()
    return logits


def test_offsets_shift_the_logits_of_real_hidden_states_by_about_the_offset(tokenizer, monkeypatch):
    import copy

    torch.manual_seed(4)
    model = build_model("stickbreaking", size(tokenizer), tokenizer, logit_offsets=(-1.0, -5.0)).eval()
    without = copy.deepcopy(model)
    with torch.no_grad():
        for block in without.transformer.h:
            block.attn.c_attn.bias.zero_()
    input_ids = torch.randint(0, len(SYMBOLS), (4, 48), generator=torch.Generator().manual_seed(5))
    shifted, plain = (captured_logits(m, input_ids, monkeypatch) for m in (model, without))
    assert len(shifted) == len(plain) == 2
    for layer_shifted, layer_plain in zip(shifted, plain):
        shift = (layer_shifted - layer_plain).mean(dim=(0, 2, 3))  # per head
        # cross terms (bias . projected hidden state) make it approximate
        torch.testing.assert_close(shift, torch.tensor([-1.0, -5.0]), rtol=0, atol=0.3)
        assert layer_plain.mean().abs() < 0.05  # a fresh head's logits are near 0 without the offsets


def test_logit_offsets_are_refused_where_they_cannot_apply(tokenizer):
    from sb_eval.model.configuration import StickBreakingConfig
    from sb_eval.model.modeling import StickBreakingForCausalLM
    from sb_eval.training.trainer import offset_attention_logits

    with pytest.raises(ValueError, match=r"logit_offsets apply to stick-breaking attention only, not 'softmax'"):
        build_model("softmax", size(tokenizer), tokenizer, logit_offsets=(0.0, -4.0))
    with pytest.raises(ValueError, match=r"needs a model built with query-key biases \(add_qkv_bias=True\)"):
        offset_attention_logits(build_model("stickbreaking", size(tokenizer), tokenizer), [0.0, -4.0])
    biased = build_model("stickbreaking", size(tokenizer), tokenizer, logit_offsets=(0.0, 0.0))
    before = biased.state_dict()["transformer.h.0.attn.c_attn.bias"].clone()
    for offsets in ([-4.0], [0.0, -1.0, -2.0]):
        with pytest.raises(ValueError, match=rf"offsets must give one value per head \(2\), got {len(offsets)}"):
            offset_attention_logits(biased, offsets)
    assert torch.equal(biased.state_dict()["transformer.h.0.attn.c_attn.bias"], before)  # a refused call changes nothing
    mqa = StickBreakingForCausalLM(StickBreakingConfig(vocab_size=20, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                                       attention_head_type="mqa", add_qkv_bias=True))
    with pytest.raises(ValueError, match=r"one key head per query head"):
        offset_attention_logits(mqa, [0.0, -4.0])


def test_a_curriculum_gives_its_first_source_before_the_switch_and_the_second_after():
    class Constant:
        def __init__(self, value):
            self.value = value

        def batch(self, step):
            return Batch(torch.full((1, 2), self.value), torch.full((1, 2), step))

    curriculum = Curriculum(Constant(1), 3, Constant(2))
    assert [int(curriculum.batch(step).inputs[0, 0]) for step in range(5)] == [1, 1, 1, 2, 2]
    assert int(curriculum.batch(4).targets[0, 0]) == 4  # each source is asked for the same step
    assert int(Curriculum(Constant(1), 0, Constant(2)).batch(0).inputs[0, 0]) == 2
    with pytest.raises(ValueError, match="until must be a step >= 0, got -1"):
        Curriculum(Constant(1), -1, Constant(2))
