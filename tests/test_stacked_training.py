"""Stacked training: models that share a stack never mix, each trains as it would alone (AdamW and
clipping as torch computes them), and each exports to the checkpoint build_model makes with the
same logits."""

import pytest
import torch

from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.tokenization import word_level_tokenizer
from sb_eval.training.stacked import StackedDecoder, StackedRun, StackedTrainer, StackSettings
from sb_eval.training.trainer import IGNORE, Batch, ModelSize, SequencePool, build_model

SYMBOLS = [f"s{i}" for i in range(16)]


@pytest.fixture(scope="module")
def tokenizer():
    return word_level_tokenizer(SYMBOLS)


def size(tokenizer, heads: int = 2) -> ModelSize:
    return ModelSize(layers=2, hidden=32, heads=heads, vocab_size=len(tokenizer), max_length=64)


def recall_pool(seed: int, rows: int = 64, length: int = 24, batch_size: int = 8) -> SequencePool:
    """Each position from the second on names the symbol before it (learnt in a few dozen steps);
    the first third of each row is left unscored, so that rows score fewer positions than they
    hold."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, len(SYMBOLS), (rows, length), generator=generator)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, length // 3:] = inputs[:, length // 3 - 1:-1]
    return SequencePool(inputs.to(torch.int16), targets.to(torch.int16), batch_size=batch_size, seed=seed)


def train(stack: StackedDecoder, settings: StackSettings, pools: list[SequencePool], steps: int) -> StackedTrainer:
    trainer = StackedTrainer(stack, settings)
    for step in range(steps):
        trainer.step([pool.batch(step) for pool in pools], [pool.max_scored for pool in pools])
    return trainer


@pytest.mark.parametrize(
    ("attention", "offsets"),
    [("softmax", None), ("stickbreaking", None), ("stickbreaking", (0.0, -4.0))],
)
def test_exported_models_compute_the_stacks_logits(tokenizer, attention, offsets):
    runs = [StackedRun("plain", 1e-3, seed=1), StackedRun("second", 1e-3, seed=2, logit_offsets=offsets)]
    stack = StackedDecoder(attention, size(tokenizer), runs, attention_backend="torch")
    with torch.no_grad():  # away from the initialisation: norms, biases and matrices all count
        generator = torch.Generator().manual_seed(0)
        for name, parameter in stack.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.05
            if name.endswith("qkv_bias"):
                noise *= stack.bias_trainable[:, None]
            parameter.add_(noise)
    inputs = torch.randint(0, len(tokenizer), (2, 3, 20), generator=generator)
    with torch.no_grad():
        logits = stack.logits(inputs)
    for index in range(2):
        model = stack.export(index, tokenizer).eval()
        expected = StickBreakingForCausalLM if attention == "stickbreaking" else type(build_model("softmax", size(tokenizer), tokenizer))
        assert isinstance(model, expected)
        if attention == "stickbreaking":
            model.set_attention_backend("torch")
            assert model.config.add_qkv_bias == (runs[index].logit_offsets is not None)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=inputs[index]).logits, logits[index], atol=1e-5, rtol=1e-5)


def reference_logits(stack: StackedDecoder, index: int, inputs: torch.Tensor) -> torch.Tensor:
    """Model `index` of a softmax stack with learnt positions, written out in float64 as the
    paper's MQRAR softmax model computes: token plus position embedding, then pre-norm blocks of
    causal softmax attention (no RoPE) and SwiGLU, a final norm and the tied output: [B, T, V]."""
    weights = {name: parameter[index].double() for name, parameter in stack.named_parameters()}
    B, T = inputs.shape
    H, D = stack.size.heads, stack.head_dim

    def rms_norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    x = weights["embedding"][inputs] + weights["position_embedding"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for number in range(stack.size.layers):
        layer = {name.split(".")[-1]: value for name, value in weights.items() if name.startswith(f"layers.{number}.")}
        q, k, v = (part.view(B, T, H, D).transpose(1, 2) for part in (rms_norm(x, layer["attn_norm"]) @ layer["qkv"]).chunk(3, -1))
        scores = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~causal, float("-inf"))
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D) @ layer["out"]
        up, gate = (rms_norm(x, layer["mlp_norm"]) @ layer["up_gate"]).chunk(2, -1)
        x = x + (up * torch.nn.functional.silu(gate)) @ layer["down"]
    return rms_norm(x, weights["final_norm"]) @ weights["embedding"].T


def test_learnt_positions_replace_rope_in_softmax_models(tokenizer):
    """With learnt_positions a softmax model adds a learnt position embedding to its tokens and
    rotates nothing (the float64 reference above); its other weights start as the RoPE model of
    the same seed does; it has no checkpoint to export to, and takes no more tokens than it has
    positions."""
    runs = [StackedRun("a", 1e-3, seed=1), StackedRun("b", 1e-3, seed=2)]
    learnt = StackedDecoder("softmax", size(tokenizer), runs, "torch", learnt_positions=True)
    rope = StackedDecoder("softmax", size(tokenizer), runs, "torch")
    rope_weights = dict(rope.named_parameters())
    for name, parameter in learnt.named_parameters():
        if name != "position_embedding":
            assert torch.equal(parameter, rope_weights[name]), name
    assert learnt.position_embedding.shape == (2, 64, 32) and 0.015 < learnt.position_embedding[0].std() < 0.025
    assert not torch.equal(learnt.position_embedding[0], learnt.position_embedding[1])
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in learnt.parameters():  # away from the initialisation: the norms count too
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        inputs = torch.randint(0, len(tokenizer), (2, 3, 20), generator=generator)
        logits = learnt.logits(inputs)
        for index in range(2):
            torch.testing.assert_close(logits[index].double(), reference_logits(learnt, index, inputs[index]), atol=1e-5, rtol=1e-5)
        # the same tokens one position later give other logits: the model knows where they are
        later = learnt.logits(torch.cat([inputs[:, :, :1], inputs], dim=2))[:, :, 1:]
        assert not torch.allclose(later, logits, atol=1e-3)
        with pytest.raises(ValueError, match="inputs of 65 tokens: the learnt position embedding has 64 positions"):
            learnt.logits(torch.zeros(2, 1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="export: a softmax model with learnt absolute positions has no checkpoint format"):
        learnt.export(0, tokenizer)


def test_logit_offsets_start_as_build_model_sets_them(tokenizer):
    runs = [StackedRun("offsets", 1e-3, seed=3, logit_offsets=(-1.0, -5.0))]
    stack = StackedDecoder("stickbreaking", size(tokenizer), runs, attention_backend="torch")
    exported = stack.export(0, tokenizer).state_dict()
    built = build_model("stickbreaking", size(tokenizer), tokenizer, (-1.0, -5.0)).state_dict()
    for layer in range(2):
        key = f"transformer.h.{layer}.attn.c_attn.bias"
        torch.testing.assert_close(exported[key], built[key])


@pytest.mark.parametrize(("attention", "learnt_positions"), [("softmax", False), ("softmax", True), ("stickbreaking", False)])
def test_each_model_trains_as_it_would_alone(tokenizer, attention, learnt_positions):
    """Two models with their own data, learning rate and offsets, stacked, end where each ends in a
    stack of its own: the stack's models do not mix."""
    offsets = (0.0, -3.0) if attention == "stickbreaking" else None
    runs = [StackedRun("a", 3e-3, seed=1), StackedRun("b", 1e-3, seed=2, logit_offsets=offsets)]
    pools = [recall_pool(seed=1), recall_pool(seed=2)]
    settings = StackSettings(steps=4, warmup_steps=1, grad_clip=0.5)

    def stack(stack_runs):
        return StackedDecoder(attention, size(tokenizer), stack_runs, "torch", learnt_positions=learnt_positions)

    together = train(stack(runs), settings, pools, 4).model
    if learnt_positions:  # the position embedding trains with the rest
        assert not torch.equal(together.position_embedding, stack(runs).position_embedding)
    for index, run in enumerate(runs):
        alone = dict(train(stack([run]), settings, [pools[index]], 4).model.named_parameters())
        for name, stacked in together.named_parameters():
            if name in alone:  # a stack of a run without offsets alone has no biases
                torch.testing.assert_close(stacked[index], alone[name][0], atol=1e-6, rtol=1e-5, msg=name)
    if attention == "stickbreaking":  # the run without offsets keeps the bias-free model's zero biases
        assert all(layer.qkv_bias[0].abs().max() == 0 for layer in together.layers)
        assert all(layer.qkv_bias[1].abs().max() > 0 for layer in together.layers)


def test_the_optimiser_is_torchs_adamw_with_clipping(tokenizer):
    run = StackedRun("one", 2e-3, seed=4)
    settings = StackSettings(steps=5, warmup_steps=2, final_lr_fraction=0.1, weight_decay=0.1, grad_clip=0.05)
    pool = recall_pool(seed=4)
    stacked = train(StackedDecoder("softmax", size(tokenizer), [run], "torch"), settings, [pool], 5).model

    reference = StackedDecoder("softmax", size(tokenizer), [run], "torch")
    parameters = list(reference.parameters())
    optimiser = torch.optim.AdamW(
        [{"params": [p for p in parameters if p.ndim >= 3], "weight_decay": 0.1},
         {"params": [p for p in parameters if p.ndim < 3], "weight_decay": 0.0}],
        lr=2e-3, betas=settings.betas, eps=settings.eps,
    )
    scorer = StackedTrainer(reference, settings)  # its loss only
    for step in range(5):
        for group in optimiser.param_groups:
            group["lr"] = 2e-3 * settings.lr_factor(step)
        losses, _ = scorer.losses([pool.batch(step)], [pool.max_scored])
        losses.sum().backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimiser.step()
        optimiser.zero_grad()
    for (name, mine), (_, torchs) in zip(stacked.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(mine, torchs, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["softmax", "stickbreaking"])
def test_stacked_models_learn_and_evaluate_only_scored_positions(tokenizer, attention):
    runs = [StackedRun("fast", 3e-2, seed=5), StackedRun("slow", 1e-4, seed=6)]
    pools = [recall_pool(seed=5), recall_pool(seed=5)]
    trainer = StackedTrainer(StackedDecoder(attention, size(tokenizer), runs, "torch"), StackSettings(steps=40, warmup_steps=5))
    held_out = recall_pool(seed=9, rows=16)
    evaluation = [[held_out.batch(step)] * 2 for step in range(2)]
    before = trainer.evaluate(evaluation, [held_out.max_scored] * 2)
    for step in range(40):
        trainer.step([pool.batch(step) for pool in pools], [pool.max_scored for pool in pools])
    after = trainer.evaluate(evaluation, [held_out.max_scored] * 2)
    assert after[0]["eval_loss"] < before[0]["eval_loss"] - 1.0 and after[0]["eval_accuracy"] > 0.5
    assert after[0]["eval_accuracy"] > after[1]["eval_accuracy"]  # the learning rates differ
    assert before[0]["eval_positions"] == 2 * 8 * 16  # two batches of 8 rows, 16 scored positions each


def test_accuracy_by_distance_counts_each_scored_position_in_its_power_of_two_bin(tokenizer):
    runs = [StackedRun("fast", 3e-2, seed=5), StackedRun("slow", 1e-4, seed=6)]
    trainer = train(StackedDecoder("softmax", size(tokenizer), runs, "torch"), StackSettings(steps=40, warmup_steps=5),
                    [recall_pool(seed=5), recall_pool(seed=5)], 40)
    held_out = recall_pool(seed=9, rows=16)
    batches = [held_out.batch(step) for step in range(2)]
    generator = torch.Generator().manual_seed(0)
    distances = [torch.randint(1, 24, batch.targets.shape, generator=generator) for batch in batches]
    rows = trainer.evaluate([[batch] * 2 for batch in batches], [held_out.max_scored] * 2, [[d] * 2 for d in distances])
    for index, row in enumerate(rows):
        hits, counts = {}, {}
        for batch, distance in zip(batches, distances):
            predicted = trainer.model.logits(batch.inputs[None].expand(2, -1, -1))[index].argmax(-1)
            for (b, t) in (batch.targets != IGNORE).nonzero().tolist():
                first = str(2 ** (int(distance[b, t]).bit_length() - 1))
                counts[first] = counts.get(first, 0) + 1
                hits[first] = hits.get(first, 0) + int(predicted[b, t] == batch.targets[b, t])
        assert row["eval_positions_by_distance"] == counts and sum(counts.values()) == row["eval_positions"]
        assert row["eval_accuracy_by_distance"] == pytest.approx({first: hits[first] / counts[first] for first in counts})
        assert row["eval_accuracy"] == pytest.approx(sum(hits.values()) / row["eval_positions"])
    assert rows[0]["eval_accuracy"] > 0.5 > rows[1]["eval_accuracy"]  # the fast model has learnt: hits are not all alike
    assert set(rows[0]["eval_positions_by_distance"]) == {"1", "2", "4", "8", "16"}
    assert "eval_accuracy_by_distance" not in trainer.evaluate([[batches[0]] * 2], [held_out.max_scored] * 2)[0]


def test_a_saved_stack_resumes_where_it_stopped_and_refuses_other_runs(tokenizer):
    runs = [StackedRun("a", 3e-3, seed=1), StackedRun("b", 1e-3, seed=2)]
    pools = [recall_pool(seed=1), recall_pool(seed=2)]
    settings = StackSettings(steps=6, warmup_steps=1)
    whole = train(StackedDecoder("softmax", size(tokenizer), runs, "torch"), settings, pools, 6)
    first = train(StackedDecoder("softmax", size(tokenizer), runs, "torch"), settings, pools, 3)
    resumed = StackedTrainer(StackedDecoder("softmax", size(tokenizer), runs, "torch"), settings)
    resumed.load_state_dict(first.state_dict())
    for step in range(3, 6):
        resumed.step([pool.batch(step) for pool in pools], [pool.max_scored for pool in pools])
    for mine, expected in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(mine, expected)
    other = StackedTrainer(StackedDecoder("softmax", size(tokenizer), runs[:1], "torch"), settings)
    with pytest.raises(ValueError, match="other runs or settings"):
        other.load_state_dict(first.state_dict())


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(attention="linear"), "attention must be 'softmax' or 'stickbreaking'"),
        (dict(runs=[]), "a stack needs at least one run"),
        (dict(runs=[StackedRun("a", 1e-3), StackedRun("a", 1e-4)]), "run names must be unique"),
        (dict(attention="softmax", runs=[StackedRun("a", 1e-3, logit_offsets=(0.0, -1.0))]), "logit offsets apply to stick-breaking"),
        (dict(attention="softmax", dropout=1.0), r"dropout must be a probability in \[0, 1\), got 1.0"),
        (dict(dropout=0.1), "dropout applies to softmax attention only"),
        (dict(learnt_positions=True), "learnt_positions applies to softmax attention only"),
        (dict(attention="softmax", learnt_positions="yes"), "learnt_positions must be True or False, got 'yes'"),
    ],
)
def test_bad_stacks_are_named(tokenizer, arguments, message):
    fields = dict(attention="stickbreaking", size=size(tokenizer), runs=[StackedRun("a", 1e-3)])
    fields.update(arguments)
    with pytest.raises(ValueError, match=message):
        StackedDecoder(**fields)
    with pytest.raises(ValueError, match="lr must be > 0"):
        StackedRun("b", 0.0)
    with pytest.raises(ValueError, match="warmup_steps must be in 0..steps-1"):
        StackSettings(steps=3, warmup_steps=3)


def test_bf16_autocast_is_on_where_the_settings_say(tokenizer):
    """None keeps the CPU in float32 (as False does); True runs the forward pass in bf16 there
    too, which changes the losses a little; anything else is refused."""
    torch.manual_seed(0)
    stack = StackedDecoder("softmax", size(tokenizer), [StackedRun("a", 1e-3)], "torch")
    batches, most = [recall_pool(0).batch(0)], [recall_pool(0).max_scored]
    losses = {bf16: StackedTrainer(stack, StackSettings(steps=2, bf16=bf16)).losses(batches, most)[0] for bf16 in (None, False, True)}
    assert torch.equal(losses[None], losses[False])
    assert not torch.equal(losses[True], losses[False])
    torch.testing.assert_close(losses[True], losses[False], atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="bf16 must be None"):
        StackSettings(steps=2, bf16=1)


def test_dropout_acts_in_training_only(tokenizer):
    """With dropout the logits change from call to call in training mode; in evaluation mode
    they are those of the same weights without dropout."""
    torch.manual_seed(0)
    plain = StackedDecoder("softmax", size(tokenizer), [StackedRun("a", 1e-3)], "torch")
    dropping = StackedDecoder("softmax", size(tokenizer), [StackedRun("a", 1e-3)], "torch", dropout=0.5)
    inputs = torch.randint(0, len(tokenizer), (1, 2, 24))
    assert not torch.equal(dropping.logits(inputs), dropping.logits(inputs))
    dropping.eval()
    torch.testing.assert_close(dropping.logits(inputs), plain.logits(inputs))


def test_sequence_pools_keep_their_dtype_and_count_scored_positions():
    pool = recall_pool(seed=1)
    assert pool.inputs.dtype == torch.int16 and pool.max_scored == 16
    batch = pool.batch(0)
    assert isinstance(batch, Batch) and batch.inputs.dtype == torch.int64
    assert torch.equal(pool.batch(0).inputs, batch.inputs)
