"""Training small decoder-only models: stick-breaking, or softmax attention with RoPE as the baseline.

No stick-breaking checkpoint can be downloaded, so the harness trains its own small ones: on
synthetic streams (MQRAR) or on tokenized offline text. A stick-breaking model is saved in the
dolomite format `sb_hf` loads; a softmax model as a Llama checkpoint lm-eval's `hf` loads.

Batches are a pure function of (seed, step), so a run resumed from its last saved state sees the
same data it would have seen without the interruption.

Targets are aligned with positions: `targets[b, t]` is what position t must predict (the next
token for text; the current value of a queried key for MQRAR), IGNORE where nothing is scored.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from sb_eval.files import write_atomically
from sb_eval.model.configuration import StickBreakingConfig
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import save_checkpoint

ATTENTION_KINDS = ("stickbreaking", "softmax")
IGNORE = -100
STATE_FILE = "train_state.pt"
LOG_FILE = "log.jsonl"
MODEL_FOLDER = "model"


@dataclass(frozen=True)
class ModelSize:
    """Shape of a decoder-only model; `intermediate` defaults to SwiGLU's 8/3 x hidden, rounded up
    to a multiple of 64."""

    layers: int
    hidden: int
    heads: int
    vocab_size: int
    max_length: int
    intermediate: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "vocab_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSize.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"ModelSize.hidden ({self.hidden}) must be a multiple of heads ({self.heads})")

    @property
    def intermediate_size(self) -> int:
        return self.intermediate or 64 * math.ceil(8 * self.hidden / 3 / 64)


def build_model(
    attention: str, size: ModelSize, tokenizer: PreTrainedTokenizerBase, logit_offsets: tuple[float, float] | None = None,
) -> PreTrainedModel:
    """A freshly initialised model in float32. Both kinds share everything but the attention:
    pre-norm RMSNorm blocks, SwiGLU, tied embeddings, no biases; stick-breaking has no position
    encoding, softmax uses RoPE (theta 10000) and causal SDPA.

    `logit_offsets` (stick-breaking only): (first, last) initial attention logit offsets, spread
    evenly over each layer's heads, through query and key biases (see `offset_attention_logits`)."""
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if attention != "stickbreaking" and logit_offsets is not None:
        raise ValueError(f"logit_offsets apply to stick-breaking attention only, not {attention!r}")
    if attention == "stickbreaking":
        config = StickBreakingConfig(
            vocab_size=size.vocab_size, n_positions=size.max_length, n_embd=size.hidden,
            n_layer=size.layers, n_head=size.heads, n_inner=size.intermediate_size,
            activation_function="swiglu", normalization_function="rmsnorm", layer_norm_epsilon=1e-5,
            sb_remainder=False, add_qkv_bias=logit_offsets is not None, **special,
        )
        model = StickBreakingForCausalLM(config)
        if logit_offsets is not None:
            offset_attention_logits(model, spread_offsets(logit_offsets, size.heads))
        return model
    if attention == "softmax":
        config = LlamaConfig(
            vocab_size=size.vocab_size, max_position_embeddings=size.max_length,
            hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
            num_key_value_heads=size.heads, intermediate_size=size.intermediate_size,
            rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, **special,
        )
        config._attn_implementation = "sdpa"
        return LlamaForCausalLM(config)
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")


@dataclass
class Batch:
    """inputs and targets [B, T] int64; targets[b, t] = IGNORE where position t is not scored."""

    inputs: torch.Tensor
    targets: torch.Tensor


class SequencePool:
    """Batches drawn from a fixed set of (inputs, targets) sequences, reshuffled every epoch with a
    seeded permutation: batch `step` is the same whenever it is asked for.

    inputs and targets: [N, T] lists or integer tensors (kept in their dtype, int16 saves memory
    for large pools; batches come as int64); `device`: where the pool and its batches live (a
    pool on the GPU makes a batch without a copy from the host)."""

    def __init__(self, inputs, targets, batch_size: int, seed: int, device: str | torch.device | None = None):
        self.inputs = torch.as_tensor(inputs, device=device)
        self.targets = torch.as_tensor(targets, device=device)
        if self.inputs.shape != self.targets.shape or self.inputs.ndim != 2:
            raise ValueError(f"inputs and targets must be [N, T] of one shape, got {tuple(self.inputs.shape)} and {tuple(self.targets.shape)}")
        if not 1 <= batch_size <= len(self.inputs):
            raise ValueError(f"batch_size must be between 1 and the pool size {len(self.inputs)}, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.inputs) // batch_size
        self._order: tuple[int, torch.Tensor] | None = None  # the current epoch's permutation

    @property
    def max_scored(self) -> int:
        """The most scored positions (targets != IGNORE) any sequence of the pool has."""
        return max_scored(self.targets)

    def batch(self, step: int) -> Batch:
        epoch, index = divmod(step, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            self._order = (epoch, order.to(self.inputs.device))
        rows = self._order[1][index * self.batch_size:(index + 1) * self.batch_size]
        return Batch(self.inputs[rows].long(), self.targets[rows].long())


class TokenWindows:
    """Next-token batches: windows of `length` tokens at seeded random offsets of one token stream
    (documents joined with end-of-text)."""

    def __init__(self, tokens: torch.Tensor, length: int, batch_size: int, seed: int):
        if tokens.ndim != 1 or len(tokens) < length + 1:
            raise ValueError(f"the token stream has {len(tokens)} tokens; a window needs length + 1 = {length + 1}")
        self.tokens, self.length, self.batch_size, self.seed = tokens.long(), length, batch_size, seed

    def batch(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.length, (self.batch_size,), generator=generator)
        rows = torch.stack([self.tokens[s:s + self.length + 1] for s in starts.tolist()])
        return Batch(rows[:, :-1], rows[:, 1:])


class ConcatenatedBatches:
    """Each batch is the rows of one batch of every source, in order: a fixed mixture (text
    windows and packed retrieval samples, say) whose shares are the sources' batch sizes."""

    def __init__(self, *sources):
        if not sources:
            raise ValueError("ConcatenatedBatches needs at least one source")
        self.sources = sources

    def batch(self, step: int) -> Batch:
        batches = [source.batch(step) for source in self.sources]
        return Batch(torch.cat([b.inputs for b in batches]), torch.cat([b.targets for b in batches]))


@torch.no_grad()
def offset_attention_logits(model: StickBreakingForCausalLM, offsets: Sequence[float]) -> None:
    """Sets the query and key biases of every layer so that head h's logits start `offsets[h]`
    away from where they would (see `logit_offset_biases`).

    Why: a fresh stick-breaking head has logits near 0, a break probability of 1/2 per token, so
    2^-d of its attention reaches the token d back, and the gradient that would teach it to look
    further vanishes with d. A 2-layer model trained on repeated random segments stayed at chance
    for 400 steps without offsets and copied by step 200 with them; the 8-layer default model
    learnt to copy with offsets and 400 steps of such segments alone (the model card has which
    combinations failed). The biases then train like any parameter."""
    config = model.config
    if not config.add_qkv_bias and not config.add_bias:
        raise ValueError("offset_attention_logits needs a model built with query-key biases (add_qkv_bias=True)")
    if config.attention_head_type == "mqa" or config.num_key_value_heads != config.n_head:
        raise ValueError("offset_attention_logits supports one key head per query head (attention_head_type 'mha')")
    if len(offsets) != config.n_head:
        raise ValueError(f"offsets must give one value per head ({config.n_head}), got {len(offsets)}")
    for block in model.transformer.h:
        attention = block.attn
        q_bias, k_bias = logit_offset_biases(offsets, config.head_dim, attention.scale)
        bias = attention.c_attn.bias.view(config.n_head, 3, config.head_dim)  # per head: [q | k | v]
        bias[:, 0] = q_bias
        bias[:, 1] = k_bias


def max_scored(targets: torch.Tensor) -> int:
    """The most scored positions (targets != IGNORE) any row of targets [N, T] has."""
    return int((targets != IGNORE).sum(1).max())


def spread_offsets(offsets: tuple[float, float], heads: int) -> list[float]:
    """(first, last) -> one logit offset per head, evenly spaced from the first head to the last."""
    first, last = offsets
    return [first + (last - first) * h / max(heads - 1, 1) for h in range(heads)]


def logit_offset_biases(offsets: Sequence[float], head_dim: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key biases [heads, head_dim] that add offsets[h] to every logit scale * q . k of
    head h at initialisation: q gets a * u and k gets -a * u (+a * u for a positive offset), with u
    a unit vector and a = sqrt(|offset| / scale); the cross terms q . (-a u) and (a u) . k are
    small while the weights are."""
    q_bias, k_bias = torch.zeros(len(offsets), head_dim), torch.zeros(len(offsets), head_dim)
    for head, offset in enumerate(offsets):
        magnitude = math.sqrt(abs(offset) / scale)
        q_bias[head, 0] = magnitude
        k_bias[head, 0] = -magnitude if offset < 0 else magnitude
    return q_bias, k_bias


class Curriculum:
    """Batches of `first` for steps below `until`, of `then` from there on: a skill practised
    alone before the mixture that needs it."""

    def __init__(self, first, until: int, then):
        if until < 0:
            raise ValueError(f"until must be a step >= 0, got {until}")
        self.first, self.until, self.then = first, until, then

    def batch(self, step: int) -> Batch:
        return (self.first if step < self.until else self.then).batch(step)


def token_stream(documents: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The documents tokenized and joined, each followed by the tokenizer's end-of-text: [N] int64."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; it is needed to separate documents")
    ids: list[int] = []
    for document in tqdm(documents, desc="tokenizing", unit="doc", leave=False):
        ids += tokenizer(document, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TrainSettings:
    """Optimisation: AdamW (betas 0.9/0.95, weight decay on matrices), linear warm-up then cosine
    decay to `final_lr_fraction` x lr, gradient clipping, bf16 autocast on CUDA."""

    steps: int
    lr: float
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    seed: int = 0
    attention_backend: str = "auto"
    extra: dict = field(default_factory=dict)  # recorded in the log and model card (data, size, ...)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.warmup_steps = min(self.warmup_steps, self.steps // 2)

    def lr_at(self, step: int) -> float:
        return self.lr * lr_factor(step, self.steps, self.warmup_steps, self.final_lr_fraction)


def lr_factor(step: int, steps: int, warmup_steps: int, final_fraction: float) -> float:
    """The learning rate of step `step` (from 0) as a fraction of the peak: linear warm-up over
    `warmup_steps`, then cosine decay to `final_fraction` at step `steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def position_loss(model: PreTrainedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss (nats): cross-entropy averaged over each row's scored positions, then over the
    rows that have any, so that every sequence weighs the same whether it scores 2047 text
    positions or the 8 tokens of an answer (with equally many scored positions per row, the plain
    mean). Also the number of scored positions predicted correctly by argmax, and the number
    scored."""
    logits = model(input_ids=batch.inputs, use_cache=False).logits.float()
    scored = batch.targets != IGNORE
    per_position = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")  # 0 where ignored
    per_row_scored = scored.sum(1)
    has_scored = per_row_scored > 0
    loss = (per_position.sum(1)[has_scored] / per_row_scored[has_scored]).mean()
    correct = ((logits.argmax(-1) == batch.targets) & scored).sum()
    return loss, correct, scored.sum()


@torch.no_grad()
def evaluate(model: PreTrainedModel, source, batches: int, device: torch.device) -> dict[str, float]:
    """Loss (position_loss's, nats, averaged over batches) and accuracy (of all scored positions)
    over `batches` batches of `source`; for a mapping of names to sources, each one's metrics
    with its name after "eval_" (eval_text_loss, ...)."""
    if isinstance(source, Mapping):
        return {
            key.replace("eval_", f"eval_{name}_", 1): value
            for name, one_source in source.items()
            for key, value in evaluate(model, one_source, batches, device).items()
        }
    was_training = model.training
    model.eval()
    total_loss, correct, scored = 0.0, 0, 0
    for step in range(batches):
        batch = _to_device(source.batch(step), device)
        with bf16_autocast(device):
            loss, batch_correct, batch_scored = position_loss(model, batch)
        total_loss += loss.item()
        correct += batch_correct.item()
        scored += batch_scored.item()
    model.train(was_training)
    return {"eval_loss": total_loss / batches, "eval_accuracy": correct / max(scored, 1), "eval_positions": scored}


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_source,
    eval_source,
    settings: TrainSettings,
    output: str | os.PathLike,
    device: str | torch.device = "cuda",
    on_eval: Callable[[int, dict], None] | None = None,
) -> Path:
    """Trains `model` for settings.steps steps, resuming from output/train_state.pt if it exists.

    Writes output/log.jsonl (one row per evaluation and per log_every steps), output/train_state.pt
    (model, optimiser and step, every save_every steps; atomically) and at the end output/model/,
    a checkpoint folder with the tokenizer, loadable by `sb_hf` (stick-breaking) or `hf` (Llama).
    Returns that folder. `eval_source` is one source or a mapping of names to sources (evaluate).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.to(device)
    if isinstance(model, StickBreakingForCausalLM):
        model.set_attention_backend(settings.attention_backend)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    step = _resume(model, optimizer, settings, output / STATE_FILE, device)
    _drop_log_rows_after(output / LOG_FILE, step)
    log = (output / LOG_FILE).open("a")
    model.train()
    tokens_since, time_since = 0, time.perf_counter()
    progress = tqdm(total=settings.steps, initial=step, desc="training", unit="step")
    try:
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr_at(step)
            batch = _to_device(train_source.batch(step), device)
            with bf16_autocast(device):
                loss, _, scored = position_loss(model, batch)
            if not torch.isfinite(loss):
                if scored.item() == 0:
                    raise ValueError(f"batch {step} of the training data has no scored position (every target is IGNORE)")
                raise FloatingPointError(f"the loss is {loss.item()} at step {step}; try a lower lr than {settings.lr}")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_since += batch.inputs.numel()
            progress.update(1)
            if step % settings.log_every == 0 or step in (1, settings.steps):
                elapsed = time.perf_counter() - time_since
                row = {"step": step, "loss": loss.item(), "lr": settings.lr_at(step - 1), "tokens_per_s": tokens_since / elapsed}
                progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.3g}")
                _log(log, row)
                tokens_since, time_since = 0, time.perf_counter()
            if step % settings.save_every == 0 or step == settings.steps:
                _save_state(model, optimizer, settings, step, output / STATE_FILE)
            if step % settings.eval_every == 0 or step == settings.steps:
                metrics = {"step": step, **evaluate(model, eval_source, settings.eval_batches, device)}
                _log(log, metrics)
                progress.write(f"step {step}: " + ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if key != "step"))
                if on_eval is not None:
                    on_eval(step, metrics)
    finally:
        progress.close()
        log.close()
    return save_checkpoint(model, tokenizer, output / MODEL_FOLDER)


def _resume(model, optimizer, settings: TrainSettings, path: Path, device: torch.device) -> int:
    """Loads the saved state if there is one and returns its step (0 without one). The state must
    come from the same settings: resuming with another lr or step count would mix two runs."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location=device, weights_only=True)  # tensors and plain data: no pickled code runs
    saved = state["settings"]
    current = asdict(settings)
    changed = [name for name in current if name not in ("log_every", "save_every", "eval_every") and saved.get(name) != current[name]]
    if changed:
        raise ValueError(
            f"{path} was saved with other settings ({', '.join(f'{n}: {saved.get(n)!r} -> {current[n]!r}' for n in changed)}); "
            "use another output folder or delete it to start over"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resuming from {path} at step {state['step']}")
    return state["step"]


def _drop_log_rows_after(path: Path, step: int) -> None:
    """A resumed run repeats the steps after its saved state: their rows, logged before the
    interruption, go (rewritten atomically), so that each step is logged once."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        write_atomically(path, "".join(kept).encode())


def _save_state(model, optimizer, settings: TrainSettings, step: int, path: Path) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "settings": asdict(settings)}, staging)
    os.replace(staging, path)


def _log(log, row: dict) -> None:
    log.write(json.dumps(row) + "\n")
    log.flush()


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(batch.inputs.to(device, non_blocking=True), batch.targets.to(device, non_blocking=True))


def bf16_autocast(device: torch.device, enabled: bool | None = None):
    """bf16 autocast: by default on CUDA only (CPU bf16 matrix products are slow); True or False
    turns it on or off on any device."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if enabled is None else enabled)
