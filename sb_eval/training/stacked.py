"""Many small decoder models of one shape trained at once: every weight has a leading model axis.

A grid of small runs (MQRAR's: two attentions x pair counts x learning rates x seeds) leaves a
GPU idle between the small kernels of a 2-layer model, and separate processes sharing the GPU do
not overlap their kernels. Stacked, G models make each matrix product one batched product over G
and each attention call one call over G x batch rows, so the grid runs as one large model does.

Each model keeps its own data, initialisation (from its own seed, so that it does not depend on
which models share its stack), learning rate, gradient clipping and logit offsets; the models
never mix. `export` writes any one of them as the checkpoint `trainer.build_model` would have
made: a Llama (softmax with RoPE) for lm-eval's `hf`, or a stick-breaking model for `sb_hf`, with
the same arithmetic (tests/test_stacked_training.py compares the logits); softmax models with
learnt positions have no such checkpoint.

Architecture (build_model's): pre-norm RMSNorm blocks, one fused query-key-value product, SwiGLU,
tied embeddings, no biases (but query-key-value biases where logit offsets are asked for);
softmax attention with RoPE (or, as the MQRAR paper's code has it, learnt absolute positions)
through SDPA, or stick-breaking attention without position encoding (sb_eval.kernels).
Initialisation (Zoology's, which the paper's MQRAR code used): every matrix
normal with std 0.02, the two projections back into the residual stream (attention output, MLP
down) with 0.02 / sqrt(2 x layers); norms at 1, biases at 0.

Optimisation: AdamW (decoupled weight decay on matrices only) with a learning rate per model,
linear warm-up then cosine decay, gradient clipping per model. Losses count only scored positions
(targets != IGNORE), and the output layer runs only there: with MQRAR's vocabulary of 8192 and
a query at one position in 4 or fewer, logits at every position would cost as much as the rest of
a 2 x 256 model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb_eval.kernels.attention import stickbreaking_attention

from .trainer import IGNORE, Batch, ModelSize, bf16_autocast, build_model, logit_offset_biases, lr_factor, spread_offsets

INIT_STD = 0.02
ROPE_THETA = 10000.0  # build_model's Llama (transformers' default)
NORM_EPS = 1e-5


@dataclass(frozen=True)
class StackedRun:
    """One model of a stack: its name, peak learning rate, seed (initialisation) and, for
    stick-breaking, initial logit offsets (first, last head) or None."""

    name: str
    lr: float
    seed: int = 0
    logit_offsets: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"run {self.name!r}: lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class StackSettings:
    """What every model of a stack shares: the step count and schedule (linear warm-up over
    `warmup_steps`, then cosine decay to `final_lr_fraction` x lr), AdamW's betas, epsilon and
    weight decay (matrices only), gradient clipping (per model, at `grad_clip`; None: none), and
    the precision of the forward pass: `bf16` None for bf16 autocast on CUDA only, True or False
    for it on or off on any device (False: float32 throughout, as the MQRAR paper's code)."""

    steps: int
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = None
    bf16: bool | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in 0..steps-1 ({self.steps - 1}), got {self.warmup_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ValueError(f"bf16 must be None (on CUDA only), True or False, got {self.bf16!r}")

    def lr_factor(self, step: int) -> float:
        return lr_factor(step, self.steps, self.warmup_steps, self.final_lr_fraction)


class StackedDecoder(nn.Module):
    """`len(runs)` decoder models of one `size` and `attention` ("softmax" or "stickbreaking").

    Parameters, G models: embedding [G, V, d]; per layer attn_norm [G, d], qkv [G, d, 3d] (queries
    of every head, then keys, then values; head h at columns h*D..(h+1)*D of each), qkv_bias
    [G, 3d] (only where a run has logit offsets), out [G, d, d], mlp_norm [G, d], up_gate [G, d, 2f]
    (SwiGLU: up, then gate), down [G, f, d]; final_norm [G, d]. Matrices are [in, out].

    dropout: in training, the probability of dropping each value of the embeddings' output and
    each attention weight, as the MQRAR paper's code does (0.1 there); softmax only, since the
    stick-breaking kernels drop no weights. Evaluation and exported models drop nothing.

    learnt_positions: softmax only; instead of RoPE, a learnt absolute position embedding
    position_embedding [G, size.max_length, d] added to the token embeddings, as the MQRAR paper's
    code gives its softmax model (and Zoology's max_position_embeddings). Such a model has no
    checkpoint format that lm-eval's `hf` or `sb_hf` loads, so `export` refuses it.
    """

    def __init__(self, attention: str, size: ModelSize, runs: Sequence[StackedRun], attention_backend: str = "auto",
                 dropout: float = 0.0, learnt_positions: bool = False):
        super().__init__()
        if attention not in ("softmax", "stickbreaking"):
            raise ValueError(f"attention must be 'softmax' or 'stickbreaking', got {attention!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if dropout and attention != "softmax":
            raise ValueError("dropout applies to softmax attention only: the stick-breaking kernels drop no attention weights")
        if not isinstance(learnt_positions, bool):
            raise ValueError(f"learnt_positions must be True or False, got {learnt_positions!r}")
        if learnt_positions and attention != "softmax":
            raise ValueError("learnt_positions applies to softmax attention only: stick-breaking uses no position encoding")
        if not runs:
            raise ValueError("a stack needs at least one run")
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique in a stack, got {names}")
        offsets = [run.logit_offsets for run in runs]
        if attention == "softmax" and any(offset is not None for offset in offsets):
            raise ValueError("logit offsets apply to stick-breaking attention only")
        self.attention, self.size, self.runs, self.attention_backend = attention, size, list(runs), attention_backend
        self.dropout, self.learnt_positions = dropout, learnt_positions
        G, d, f, V = len(runs), size.hidden, size.intermediate_size, size.vocab_size
        self.head_dim = d // size.heads

        def matrix(rows: int, columns: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(G, rows, columns))

        self.embedding = matrix(V, d)
        if learnt_positions:
            self.position_embedding = matrix(size.max_length, d)
        self.layers = nn.ModuleList()
        for _ in range(size.layers):
            layer = nn.Module()
            layer.attn_norm = nn.Parameter(torch.ones(G, d))
            layer.qkv = matrix(d, 3 * d)
            layer.out = matrix(d, d)
            layer.mlp_norm = nn.Parameter(torch.ones(G, d))
            layer.up_gate = matrix(d, 2 * f)
            layer.down = matrix(f, d)
            if any(offset is not None for offset in offsets):
                layer.qkv_bias = nn.Parameter(torch.zeros(G, 3 * d))
            self.layers.append(layer)
        self.final_norm = nn.Parameter(torch.ones(G, d))
        # Runs without offsets keep their biases at zero (their gradient is masked), so that they
        # are the bias-free models build_model makes.
        self.register_buffer("bias_trainable", torch.tensor([offset is not None for offset in offsets]), persistent=False)
        for index, run in enumerate(runs):
            self._initialise(index, run)

    @torch.no_grad()
    def _initialise(self, index: int, run: StackedRun) -> None:
        generator = torch.Generator().manual_seed(run.seed)
        residual_std = INIT_STD / math.sqrt(2 * self.size.layers)
        if run.logit_offsets is not None:
            q_bias, k_bias = logit_offset_biases(spread_offsets(run.logit_offsets, self.size.heads), self.head_dim, self.head_dim**-0.5)
        self.embedding[index].normal_(0.0, INIT_STD, generator=generator)
        for layer in self.layers:
            layer.qkv[index].normal_(0.0, INIT_STD, generator=generator)
            layer.out[index].normal_(0.0, residual_std, generator=generator)
            layer.up_gate[index].normal_(0.0, INIT_STD, generator=generator)
            layer.down[index].normal_(0.0, residual_std, generator=generator)
            if run.logit_offsets is not None:
                d = self.size.hidden
                layer.qkv_bias[index, :d] = q_bias.flatten()
                layer.qkv_bias[index, d:2 * d] = k_bias.flatten()
        if self.learnt_positions:  # drawn last, so that the other weights are those of a RoPE model of the same seed
            self.position_embedding[index].normal_(0.0, INIT_STD, generator=generator)

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs [G, B, T] token ids (row g for model g) -> final hidden states [G, B, T, d]."""
        G, B, T = inputs.shape
        V, d = self.size.vocab_size, self.size.hidden
        # model g's ids index rows g*V .. g*V + V-1 of the stacked tables (one embedding lookup)
        shifted = inputs.reshape(G, B * T) + torch.arange(G, device=inputs.device)[:, None] * V
        x = F.embedding(shifted, self.embedding.view(G * V, d))
        if self.learnt_positions:
            if T > self.size.max_length:
                raise ValueError(f"inputs of {T} tokens: the learnt position embedding has {self.size.max_length} positions")
            x = (x.view(G, B, T, d) + self.position_embedding[:, None, :T]).view(G, B * T, d)
        x = F.dropout(x, self.dropout, self.training)
        rope = _rope_tables(T, self.head_dim, x.device) if self.attention == "softmax" and not self.learnt_positions else None
        for layer in self.layers:
            h = _rms_norm(x, layer.attn_norm)
            qkv = torch.matmul(h, layer.qkv)
            if hasattr(layer, "qkv_bias"):
                qkv = qkv + layer.qkv_bias[:, None, :]
            x = x + torch.matmul(self._attend(qkv, B, T, rope), layer.out)
            up, gate = torch.matmul(_rms_norm(x, layer.mlp_norm), layer.up_gate).chunk(2, dim=-1)
            x = x + torch.matmul(up * F.silu(gate), layer.down)
        return _rms_norm(x, self.final_norm).view(G, B, T, -1)

    def _attend(self, qkv: torch.Tensor, B: int, T: int, rope) -> torch.Tensor:
        """qkv [G, B*T, 3d] -> attention output [G, B*T, d]."""
        G, H, D = qkv.shape[0], self.size.heads, self.head_dim
        # [G, B, T, 3, H, D] -> three of [G*B, H, T, D]
        q, k, v = qkv.view(G, B, T, 3, H, D).permute(3, 0, 1, 4, 2, 5).reshape(3, G * B, H, T, D).unbind(0)
        if self.attention == "softmax":
            if rope is not None:
                cos, sin = (table.to(q.dtype) for table in rope)
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            o, _ = stickbreaking_attention(q, k, v, scale=D**-0.5, backend=self.attention_backend)
        return o.reshape(G, B, H, T, D).permute(0, 1, 3, 2, 4).reshape(G, B * T, H * D)

    def scored_logits(self, hidden: torch.Tensor, index: int, positions: torch.Tensor) -> torch.Tensor:
        """Model `index`'s logits [B, K, V] at positions [B, K] of its hidden states [B, T, d]."""
        picked = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return torch.matmul(picked, self.embedding[index].transpose(0, 1))

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Every model's logits at every position: [G, B, T, V] (for tests and small inputs)."""
        G, B, T = inputs.shape
        hidden = self.hidden(inputs).view(G, B * T, -1)
        return torch.matmul(hidden, self.embedding.transpose(1, 2)).view(G, B, T, -1)

    @torch.no_grad()
    def export(self, index: int, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        """Model `index` as the float32 checkpoint build_model makes (same config), on the CPU."""
        if self.learnt_positions:
            raise ValueError("export: a softmax model with learnt absolute positions has no checkpoint format that lm-eval's hf "
                             "or sb_hf loads (build_model's softmax model is a Llama, with RoPE)")
        run = self.runs[index]
        model = build_model(self.attention, self.size, tokenizer, run.logit_offsets)
        weights = _softmax_weights(self, index) if self.attention == "softmax" else _stick_breaking_weights(self, index)
        missing, unexpected = model.load_state_dict({k: v.detach().float().cpu() for k, v in weights.items()}, strict=False)
        tied = {"lm_head.weight"}  # tied to the embedding in both models
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: the {self.attention} checkpoint does not match the stack (missing {missing}, unexpected {unexpected})")
        return model


class StackedTrainer:
    """Trains a StackedDecoder: one optimiser step of every model per `step(batches)`.

    AdamW as torch.optim.AdamW computes it (bias-corrected moments, weight decay lr * wd * p
    applied first), with each model's own learning rate; gradient clipping per model as
    torch.nn.utils.clip_grad_norm_ does for one model. bf16 autocast as settings.bf16 says."""

    def __init__(self, model: StackedDecoder, settings: StackSettings):
        self.model, self.settings = model, settings
        self.weights = list(model.parameters())
        self.peak_lrs = torch.tensor([run.lr for run in model.runs], device=self.weights[0].device)
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in self.weights]
        # matrices per model ([G, rows, columns]) decay; norms and biases ([G, n]) do not
        self.decays = [p.ndim >= 3 for p in self.weights]
        self.step_count = 0

    def losses(self, batches: Sequence[Batch], max_scored: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per model: mean cross-entropy over its scored positions (nats), [G], and where its argmax
        is the target, [B, T] bool (False where nothing is scored). `batches[g]` is model g's
        (inputs and targets [B, T]), with at most `max_scored[g]` scored positions a row."""
        inputs = torch.stack([batch.inputs for batch in batches])
        with bf16_autocast(inputs.device, self.settings.bf16):
            hidden = self.model.hidden(inputs)
            losses, hits = [], []
            for index, (batch, most) in enumerate(zip(batches, max_scored)):
                is_scored = batch.targets != IGNORE
                # the scored positions first, in order, then unscored ones (targets IGNORE) as padding
                positions = torch.argsort((~is_scored).to(torch.int8), dim=1, stable=True)[:, :most]
                targets = torch.gather(batch.targets, 1, positions)
                logits = self.model.scored_logits(hidden[index], index, positions).float()
                losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE))
                hit = (logits.argmax(-1) == targets) & (targets != IGNORE)
                hits.append(torch.zeros_like(is_scored).scatter_(1, positions, hit))
        return torch.stack(losses), hits

    def step(self, batches: Sequence[Batch], max_scored: Sequence[int]) -> torch.Tensor:
        """One optimiser step of every model; returns the losses [G] (not synchronised)."""
        losses, _ = self.losses(batches, max_scored)
        losses.sum().backward()  # the models share no weight: each slice gets its own gradient
        self._mask_untrainable_biases()
        if self.settings.grad_clip is not None:
            self._clip_gradients()
        self._adamw()
        for parameter in self.weights:
            parameter.grad = None
        return losses.detach()

    @torch.no_grad()
    def evaluate(self, batches_per_model: Sequence[Sequence[Batch]], max_scored: Sequence[int],
                 distances_per_model: Sequence[Sequence[torch.Tensor]] | None = None) -> list[dict]:
        """Per model: eval_loss (mean over batches of the per-batch mean, nats), eval_accuracy
        (over every scored position) and eval_positions; batches_per_model[i] is one list per
        step of evaluation, one batch per model in each.

        With distances_per_model (nested as batches_per_model, [B, T] each: how many tokens back
        the answer of each scored position lies, as ruler.mqrar.answer_distances gives them), also
        eval_accuracy_by_distance and eval_positions_by_distance: {the first distance of a bin: its
        accuracy, its scored positions}, in bins from 1, 2, 4, 8, ... tokens to the next power of 2
        (bins without positions left out), so that a partly learnt recall shows how far it reaches."""
        was_training = self.model.training
        self.model.eval()
        models = len(self.model.runs)
        total_loss = 0
        correct, scored, bin_hits, bin_counts = ([0] * models for _ in range(4))
        for step, batches in enumerate(batches_per_model):
            loss, hits = self.losses(batches, max_scored)
            total_loss = total_loss + loss
            for index, (batch, hit) in enumerate(zip(batches, hits)):
                is_scored = batch.targets != IGNORE
                correct[index] = correct[index] + hit.sum()
                scored[index] = scored[index] + is_scored.sum()
                if distances_per_model is not None:
                    bins = torch.frexp(distances_per_model[step][index][is_scored].float()).exponent - 1  # exact floor(log2)
                    size = batch.targets.shape[1].bit_length()  # distances are below T
                    bin_hits[index] = bin_hits[index] + torch.bincount(bins, weights=hit[is_scored].float(), minlength=size)
                    bin_counts[index] = bin_counts[index] + torch.bincount(bins, minlength=size)
        self.model.train(was_training)
        count = len(batches_per_model)
        rows = []
        for index, loss in enumerate(total_loss.cpu().tolist()):
            positions = int(scored[index])
            row = {"eval_loss": loss / count, "eval_accuracy": float(correct[index]) / max(positions, 1), "eval_positions": positions}
            if distances_per_model is not None:
                bins = [(2**k, int(n), float(h)) for k, (n, h) in enumerate(zip(bin_counts[index].tolist(), bin_hits[index].tolist())) if n]
                row["eval_accuracy_by_distance"] = {str(first): hits / n for first, n, hits in bins}
                row["eval_positions_by_distance"] = {str(first): n for first, n, _ in bins}
            rows.append(row)
        return rows

    def _mask_untrainable_biases(self) -> None:
        for layer in self.model.layers:
            if hasattr(layer, "qkv_bias") and layer.qkv_bias.grad is not None:
                layer.qkv_bias.grad.mul_(self.model.bias_trainable[:, None].to(layer.qkv_bias.dtype))

    @torch.no_grad()
    def _clip_gradients(self) -> None:
        squares = sum(p.grad.float().pow(2).flatten(1).sum(1) for p in self.weights if p.grad is not None)
        coefficient = (self.settings.grad_clip / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for parameter in self.weights:
            if parameter.grad is not None:
                parameter.grad.mul_(_per_model(coefficient, parameter))

    @torch.no_grad()
    def _adamw(self) -> None:
        settings = self.settings
        beta1, beta2 = settings.betas
        self.step_count += 1
        lrs = self.peak_lrs * settings.lr_factor(self.step_count - 1)
        correction1 = 1 - beta1**self.step_count
        correction2_root = math.sqrt(1 - beta2**self.step_count)
        for parameter, (mean, square), decays in zip(self.weights, self.moments, self.decays):
            if parameter.grad is None:
                continue
            lr = _per_model(lrs, parameter)
            if decays:
                parameter.mul_(1 - lr * settings.weight_decay)
            mean.lerp_(parameter.grad, 1 - beta1)
            square.mul_(beta2).addcmul_(parameter.grad, parameter.grad, value=1 - beta2)
            denominator = (square.sqrt() / correction2_root).add_(settings.eps)
            parameter.sub_(lr / correction1 * mean / denominator)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "moments": self.moments,
            "step": self.step_count,
            "settings": asdict(self.settings),
            "runs": [asdict(run) for run in self.model.runs],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict of a trainer with the same runs and settings (else ValueError)."""
        runs = [asdict(run) for run in self.model.runs]
        if state["runs"] != runs or state["settings"] != asdict(self.settings):
            raise ValueError("the saved stack was trained with other runs or settings; start it in another folder")
        self.model.load_state_dict(state["model"])
        for (mean, square), (saved_mean, saved_square) in zip(self.moments, state["moments"]):
            mean.copy_(saved_mean)
            square.copy_(saved_square)
        self.step_count = state["step"]


def _per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[G] -> broadcastable against `like` [G, ...]."""
    return values.view(-1, *[1] * (like.ndim - 1)).to(like.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [G, N, d] normalised in float32 (as both checkpoints' RMSNorm; one fused kernel where
    torch has it), times weight [G, d]."""
    return weight[:, None, :] * F.rms_norm(x.float(), (x.shape[-1],), eps=NORM_EPS).to(x.dtype)


def _rope_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rotary tables: cos and sin [T, D], each frequency repeated for both halves."""
    inverse = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotation of [..., T, D] (its halves as the pairs)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def _softmax_weights(stack: StackedDecoder, index: int) -> dict[str, torch.Tensor]:
    d, f = stack.size.hidden, stack.size.intermediate_size
    weights = {"model.embed_tokens.weight": stack.embedding[index], "model.norm.weight": stack.final_norm[index]}
    for number, layer in enumerate(stack.layers):
        prefix = f"model.layers.{number}."
        qkv, up_gate = layer.qkv[index], layer.up_gate[index]
        weights.update({
            prefix + "input_layernorm.weight": layer.attn_norm[index],
            prefix + "self_attn.q_proj.weight": qkv[:, :d].T,
            prefix + "self_attn.k_proj.weight": qkv[:, d:2 * d].T,
            prefix + "self_attn.v_proj.weight": qkv[:, 2 * d:].T,
            prefix + "self_attn.o_proj.weight": layer.out[index].T,
            prefix + "post_attention_layernorm.weight": layer.mlp_norm[index],
            prefix + "mlp.up_proj.weight": up_gate[:, :f].T,
            prefix + "mlp.gate_proj.weight": up_gate[:, f:].T,
            prefix + "mlp.down_proj.weight": layer.down[index].T,
        })
    return weights


def _stick_breaking_weights(stack: StackedDecoder, index: int) -> dict[str, torch.Tensor]:
    H, D = stack.size.heads, stack.head_dim

    def per_head(qkv: torch.Tensor) -> torch.Tensor:
        """[..., 3d] as queries, keys, values of every head -> dolomite's [q_h | k_h | v_h] per head."""
        return qkv.unflatten(-1, (3, H, D)).transpose(-3, -2).flatten(-3)

    weights = {"transformer.wte.weight": stack.embedding[index], "transformer.ln_f.weight": stack.final_norm[index]}
    for number, layer in enumerate(stack.layers):
        prefix = f"transformer.h.{number}."
        weights.update({
            prefix + "ln_1.weight": layer.attn_norm[index],
            prefix + "attn.c_attn.weight": per_head(layer.qkv[index]).T,
            prefix + "attn.c_proj.weight": layer.out[index].T,
            prefix + "ln_2.weight": layer.mlp_norm[index],
            prefix + "mlp.c_fc.weight": layer.up_gate[index].T,
            prefix + "mlp.c_proj.weight": layer.down[index].T,
        })
        if stack.runs[index].logit_offsets is not None:
            weights[prefix + "attn.c_attn.bias"] = per_head(layer.qkv_bias[index])
    return weights
