"""Stick-breaking causal language models in transformers, loading dolomite checkpoints as they are.

Architecture (docs/architecture.md, checkpoint format): x = wte(ids) * m_emb; each block adds
m_residual * attn(norm(x)) and m_residual * mlp(norm(x)); logits = ln_f(x) @ wte.T / m_width.
Attention is stick-breaking (``sb_eval.kernels``) with no position embedding, so left padding
only needs the padding keys masked, and prefill followed by decode is exact.

Importing this module registers ``model_type: "stickbreaking"`` with transformers' Auto classes,
so that ``AutoModelForCausalLM.from_pretrained(folder)`` loads such checkpoints.

What a forward pass does besides the model's arithmetic comes in as arguments: the attention
backend is the config's (``set_attention_backend``), ``attention_statistics`` (an
sb_eval.analysis.attention_stats.AttentionStatistics, usually handed in by a forward pre-hook)
receives every layer's per-query distance and remainder, and ``attention_spans`` (an
sb_eval.analysis.attribution.AnswerSpanMass, handed in the same way) the span mass of the query
that produces the next token. With ``set_decode_graphs(True)``, a decode step against a
PreallocatedCache on a GPU runs as a CUDA graph (sb_eval.model.decode_graph); the captured step
reaches the layers as ``graph_step``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from sb_eval.kernels.attention import BACKENDS, stickbreaking_attention

from .cache import PreallocatedCache
from .checks import check_checkpoint_folder
from .configuration import GATED_ACTIVATIONS, StickBreakingConfig
from .decode_graph import GraphStep, decode_graph_for

# transformers renamed the cache argument and output field from past_key_values to cache (5.2x).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: StickBreakingConfig) -> nn.Module:
    if config.normalization_function == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class StickBreakingAttention(nn.Module):
    """Fused qkv projection, stick-breaking attention over the cache, output projection.

    c_attn's output per position is [Hkv, (group + 2) * head_dim]: each key/value head's group of
    query heads, then its key, then its value (for MHA group = 1, i.e. [q | k | v] per head; for
    MQA, dolomite lays it out as [all queries | k | v]).
    """

    def __init__(self, config: StickBreakingConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.n_head
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.head_type = config.attention_head_type
        self.scale = config.attention_scale
        self.attend_current = config.sb_attend_current
        self.add_value_remainder = config.sb_remainder
        qkv_size = config.n_embd + 2 * self.num_kv_heads * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_size, bias=config.add_bias or config.add_qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.add_bias)
        self.remainder_bias = (
            nn.Parameter(torch.zeros(self.num_heads, self.head_dim)) if config.sb_remainder_bias else None
        )
        self.group_norm = nn.GroupNorm(self.num_heads, config.n_embd) if config.sb_group_norm else None
        self.config = config  # read at each call: the attention backend can change after loading

    def split_heads(self, qkv: torch.Tensor):
        """[B, T, qkv_size] -> q [B, Hq, T, D], k and v [B, Hkv, T, D]."""
        B, T, _ = qkv.shape
        D = self.head_dim
        if self.head_type == "mqa":
            q, k, v = qkv.split((self.num_heads * D, D, D), dim=-1)
            q = q.view(B, T, self.num_heads, D)
            k, v = k.view(B, T, 1, D), v.view(B, T, 1, D)
        else:
            group = self.num_heads // self.num_kv_heads
            per_head = qkv.view(B, T, self.num_kv_heads, (group + 2) * D)
            q, k, v = per_head.split((group * D, D, D), dim=-1)
            q = q.reshape(B, T, self.num_heads, D)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        cache: Cache | None,
        key_mask: torch.Tensor | None,
        attention_statistics=None,
        attention_spans=None,
        graph_step: GraphStep | None = None,
    ) -> torch.Tensor:
        """hidden [B, T, n_embd] -> [B, T, n_embd]; key_mask [B, past + T] bool or None;
        attention_statistics: an AttentionStatistics that records this call, or None;
        attention_spans: an AnswerSpanMass that records the last query's span mass, or None;
        graph_step: the device-side slot, key count and key mask of a captured decode step (then
        cache is a PreallocatedCache, T = 1, and key_mask is ignored), or None."""
        B, T, _ = hidden.shape
        q, k, v = self.split_heads(self.c_attn(hidden))
        current_v = v
        num_keys = None
        if graph_step is not None:
            k, v = cache.layers[self.layer_idx].write_at(k, v, graph_step.position)
            key_mask, num_keys = graph_step.key_mask, graph_step.num_keys
        elif cache is not None:
            # Both kinds of cache copy k and v (views into c_attn's output) into their own storage.
            k, v = cache.update(k, v, self.layer_idx)
        # The span mass of the last query (the one that produces the next token): in the same
        # call when it is the only query, in a call of its own after a prefill.
        key_spans = None if attention_spans is None else attention_spans.key_spans(k.shape[2])
        spans = {} if key_spans is None else dict(key_spans=key_spans, num_spans=attention_spans.num_spans)
        outputs = stickbreaking_attention(
            q, k, v,
            scale=self.scale,
            attend_current=self.attend_current,
            remainder=self.remainder_bias,
            key_mask=key_mask,
            return_stats=attention_statistics is not None,
            num_keys=num_keys,
            backend=self.config.attention_backend,
            **(spans if T == 1 else {}),
        )
        o, rem = outputs[:2]
        if attention_statistics is not None:
            tokens_back = outputs[2]
            attention_statistics.record_stick_breaking(
                self.layer_idx, tokens_back, rem, k.shape[2], key_mask, self.attend_current
            )
        if spans:
            last = outputs if T == 1 else stickbreaking_attention(
                q[:, :, -1:], k, v, scale=self.scale, attend_current=self.attend_current,
                key_mask=key_mask, backend=self.config.attention_backend, **spans,
            )
            attention_spans.record(self.layer_idx, k.shape[2], last[-1][:, :, 0], last[1][:, :, 0])
        if self.add_value_remainder:
            group = self.num_heads // current_v.shape[1]
            o = o + rem[..., None].to(o.dtype) * current_v.repeat_interleave(group, dim=1)
        o = o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        if self.group_norm is not None:
            o = self.group_norm(o.reshape(B * T, -1)).reshape(B, T, -1)
        return self.c_proj(o)


class StickBreakingMLP(nn.Module):
    def __init__(self, config: StickBreakingConfig) -> None:
        super().__init__()
        gated = config.activation_function in GATED_ACTIVATIONS
        self.c_fc = nn.Linear(config.n_embd, (2 if gated else 1) * config.n_inner, bias=config.add_bias)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=config.add_bias)
        self.activation = config.activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            up, gate = h.chunk(2, dim=-1)
            h = up * F.silu(gate)
        elif self.activation == "gelu":
            h = F.gelu(h)
        elif self.activation == "gelu_pytorch_tanh":
            h = F.gelu(h, approximate="tanh")
        elif self.activation == "silu":
            h = F.silu(h)
        else:
            h = F.relu(h)
        return self.c_proj(h)


class StickBreakingBlock(nn.Module):
    def __init__(self, config: StickBreakingConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = StickBreakingAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = StickBreakingMLP(config)
        self.m_residual = config.m_residual

    def forward(self, x, cache, key_mask, attention_statistics=None, attention_spans=None, graph_step=None):
        attn = self.attn(self.ln_1(x), cache, key_mask, attention_statistics, attention_spans, graph_step)
        if self.m_residual is not None:
            attn = attn * self.m_residual
        x = x + attn
        mlp = self.mlp(self.ln_2(x))
        if self.m_residual is not None:
            mlp = mlp * self.m_residual
        return x + mlp


class StickBreakingPreTrainedModel(PreTrainedModel):
    config_class = StickBreakingConfig
    config: StickBreakingConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["StickBreakingBlock"]
    supports_gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, check_folder: bool = True, **kwargs):
        """As transformers', but a local folder is checked first (sb_eval.model.checks):
        safetensors only unless use_safetensors=False, and exactly the tensors and shapes
        config.json needs. check_folder=False skips that for a caller that has just checked it."""
        folder = os.path.join(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        if check_folder and os.path.isdir(folder):
            check_checkpoint_folder(folder, cls, allow_pickle=kwargs.get("use_safetensors") is False)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, StickBreakingAttention) and module.remainder_bias is not None:
            module.remainder_bias.zero_()


class StickBreakingModel(StickBreakingPreTrainedModel):
    """The decoder stack: embeddings, blocks, final norm. Returns hidden states."""

    def __init__(self, config: StickBreakingConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(StickBreakingBlock(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        attention_statistics=None,
        attention_spans=None,
        graph_step: GraphStep | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, n_embd]); attention_mask [B, past + T] with 0
        for padding (any side); cache holds the keys and values of earlier calls (any transformers
        Cache; without one, a PreallocatedCache is made, sized to this call); attention_statistics
        and attention_spans record every layer's attention (see the module's docstring);
        graph_step: see StickBreakingAttention.forward (it replaces attention_mask)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if graph_step is not None:
            _check_graph_step(cache, use_cache, input_ids if inputs_embeds is None else inputs_embeds,
                              attention_statistics, attention_spans)
        if use_cache and cache is None:
            cache = PreallocatedCache()
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.m_emb is not None:
            x = x * self.config.m_emb
        key_mask = None
        if graph_step is None and attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()

        all_hidden = []
        for block in self.h:
            if output_hidden_states:
                all_hidden.append(x)
            x = block(x, cache if use_cache else None, key_mask, attention_statistics, attention_spans, graph_step)
        x = self.ln_f(x)
        if output_hidden_states:
            all_hidden.append(x)
        return BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )


def _check_graph_step(cache, use_cache: bool, inputs: torch.Tensor, attention_statistics, attention_spans) -> None:
    """A graph_step writes one token per row into a PreallocatedCache's buffers and attends over
    them whole; nothing that reads the key count on the host can come along."""
    if not (use_cache and isinstance(cache, PreallocatedCache)):
        raise ValueError(f"graph_step needs use_cache and a PreallocatedCache, got use_cache={use_cache} and {type(cache).__name__}")
    if inputs.shape[1] != 1:
        raise ValueError(f"graph_step runs one new token per row, got {inputs.shape[1]} (inputs {tuple(inputs.shape)})")
    if attention_statistics is not None or attention_spans is not None:
        raise ValueError("graph_step does not record attention statistics or span mass; run such steps without it")


class StickBreakingForCausalLM(StickBreakingPreTrainedModel, GenerationMixin):
    """Stick-breaking language model; ``from_pretrained`` loads dolomite checkpoints.

    With tied embeddings (the released format) there is no lm_head: logits use wte's weight.
    """

    def __init__(self, config: StickBreakingConfig) -> None:
        super().__init__(config)
        self.transformer = StickBreakingModel(config)
        self.lm_head = (
            None if config.tie_word_embeddings
            else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_attention_backend(self, backend: str) -> None:
        """Chooses the kernels backend every layer uses, in the config (not saved with it): "auto",
        "triton", "torch" or "reference"."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.config.attention_backend = backend

    def set_decode_graphs(self, enabled: bool) -> None:
        """Whether a decode step (one new token per row) against a PreallocatedCache on a GPU runs
        as a CUDA graph, captured at the cache's first such step (sb_eval.model.decode_graph);
        in the config, not saved with it. Steps a graph cannot run run as they would without: a
        forward hook on the decoder or a module in it (which a replay would skip), a model spread
        over devices, an attention backend other than triton, hidden states asked for, a cache
        without room. Hooks on this model itself run as usual, around the replay."""
        if not isinstance(enabled, bool):
            raise ValueError(f"set_decode_graphs(enabled) takes True or False, got {enabled!r}")
        self.config.decode_graphs = enabled

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """As transformers', but where it would make a DynamicCache (which concatenates the whole
        cache for every new token), a PreallocatedCache with room for max_cache_length tokens (the
        prompt and max_new_tokens). A cache the caller passes is used as it is."""
        given = model_kwargs.get(CACHE_FIELD) is not None
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if not given and type(model_kwargs.get(CACHE_FIELD)) is DynamicCache:
            model_kwargs[CACHE_FIELD] = PreallocatedCache(max_cache_length)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., n_embd] final hidden states -> [..., vocab] logits (divided by m_width)."""
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        if self.config.m_width is not None:
            logits = logits / self.config.m_width
        return logits

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        attention_statistics=None,
        graph_step: GraphStep | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, vocab] (only the last ``logits_to_keep`` positions when it is > 0, as
        generation asks); with labels [B, T], the mean next-token cross-entropy (-100 ignored)."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        graph = None
        if (
            self.config.decode_graphs and graph_step is None and input_ids is not None and inputs_embeds is None
            and labels is None and attention_statistics is None and not output_hidden_states
            and use_cache and not torch.is_grad_enabled()
        ):
            graph = decode_graph_for(self, cache, input_ids, attention_mask)
        if graph is not None:
            return CausalLMOutputWithPast(logits=graph.step(cache, input_ids, attention_mask), **{CACHE_FIELD: cache})
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            attention_statistics=attention_statistics,
            graph_step=graph_step,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            kept = hidden[:, logits_to_keep]
        logits = self.logits_from_hidden(kept)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


AutoConfig.register(StickBreakingConfig.model_type, StickBreakingConfig, exist_ok=True)
AutoModelForCausalLM.register(StickBreakingConfig, StickBreakingForCausalLM, exist_ok=True)
