"""Configuration of stick-breaking checkpoints in the dolomite format (``model_type: "stickbreaking"``).

Field names are dolomite's, so a released config.json loads as it is; extra fields of dolomite's
that do not change inference (dropout, init method, ...) are kept as plain attributes. The
``sb_*`` fields beyond dolomite's ``sb_remainder`` cover the paper's later variants.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from sb_eval.kernels.attention import BACKENDS

ACTIVATIONS = ("swiglu", "gelu", "gelu_pytorch_tanh", "silu", "relu")
GATED_ACTIVATIONS = ("swiglu",)
NORMALIZATIONS = ("rmsnorm", "layernorm")
HEAD_TYPES = ("mha", "mqa", "gqa")


class StickBreakingConfig(PretrainedConfig):
    """A decoder-only transformer whose attention is stick-breaking (no position embedding).

    Attention-specific fields:
        attention_multiplier: the logit scale (the released 3B uses 1 / head_dim, muP); None
            means 1 / sqrt(head_dim), and scale_attn_weights=False means 1.
        sb_remainder: dolomite's remainder: add rem_j * v_j (the query's own value) to the output.
        sb_remainder_bias: the paper's remainder bias (App. C): add rem_j * r_h, r learned per head.
        sb_group_norm: a per-head GroupNorm on the attention output (paper App. C).
        sb_attend_current: a query also attends to its own position.

    Not saved with the checkpoint, choices of the machine that runs the model: attention_backend,
    which sb_eval.kernels backend the layers run ("auto": triton on CUDA, torch elsewhere), and
    decode_graphs, whether decode steps on a GPU run as CUDA graphs (sb_eval.model.decode_graph).
    """

    model_type = "stickbreaking"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "max_position_embeddings": "n_positions",
        "intermediate_size": "n_inner",
    }

    def __init__(
        self,
        vocab_size: int = 50304,
        n_positions: int = 4096,
        n_embd: int = 2304,
        n_layer: int = 40,
        n_head: int = 36,
        num_key_value_heads: int | None = None,
        attention_head_type: str = "mha",
        n_inner: int | None = None,
        activation_function: str = "swiglu",
        normalization_function: str = "rmsnorm",
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        attention_multiplier: float | None = None,
        scale_attn_weights: bool = True,
        m_emb: float | None = None,
        m_residual: float | None = None,
        m_width: float | None = None,
        add_bias: bool = False,
        add_qkv_bias: bool = False,
        position_embedding_type: str = "nope",
        sb_remainder: bool = True,
        sb_remainder_bias: bool = False,
        sb_group_norm: bool = False,
        sb_attend_current: bool = False,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = 50256,
        attention_backend: str = "auto",
        decode_graphs: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.attention_head_type = attention_head_type
        if num_key_value_heads is None:
            num_key_value_heads = 1 if attention_head_type == "mqa" else n_head
        self.num_key_value_heads = num_key_value_heads
        self.n_inner = 4 * n_embd if n_inner is None else n_inner
        self.activation_function = activation_function
        self.normalization_function = normalization_function
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.attention_multiplier = attention_multiplier
        self.scale_attn_weights = scale_attn_weights
        self.m_emb = m_emb
        self.m_residual = m_residual
        self.m_width = m_width
        self.add_bias = add_bias
        self.add_qkv_bias = add_qkv_bias
        self.position_embedding_type = position_embedding_type
        self.sb_remainder = sb_remainder
        self.sb_remainder_bias = sb_remainder_bias
        self.sb_group_norm = sb_group_norm
        self.sb_attend_current = sb_attend_current
        self.use_cache = use_cache
        self.attention_backend = attention_backend
        self.decode_graphs = decode_graphs
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_fields()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def attention_scale(self) -> float:
        """The logit scale z = scale * q . k, as dolomite computes it."""
        if not self.scale_attn_weights:
            return 1.0
        if self.attention_multiplier is None:
            return self.head_dim**-0.5
        return float(self.attention_multiplier)

    def to_dict(self) -> dict[str, Any]:
        """As transformers' (what config.json holds), without the runtime attention_backend and decode_graphs."""
        output = super().to_dict()
        output.pop("attention_backend", None)
        output.pop("decode_graphs", None)
        return output

    def validate_fields(self) -> None:
        """Raises ValueError naming the config.json field that cannot describe a model we run."""
        problems = []
        if self.n_embd % self.n_head != 0:
            problems.append(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.attention_head_type not in HEAD_TYPES:
            problems.append(f"attention_head_type is {self.attention_head_type!r}; expected one of {HEAD_TYPES}")
        elif self.attention_head_type == "mha" and self.num_key_value_heads != self.n_head:
            problems.append(
                f"attention_head_type 'mha' needs num_key_value_heads == n_head ({self.n_head}), "
                f"got {self.num_key_value_heads}"
            )
        elif self.attention_head_type == "mqa" and self.num_key_value_heads != 1:
            problems.append(f"attention_head_type 'mqa' needs num_key_value_heads 1, got {self.num_key_value_heads}")
        if self.num_key_value_heads < 1 or self.n_head % self.num_key_value_heads != 0:
            problems.append(
                f"n_head ({self.n_head}) must be a multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.activation_function not in ACTIVATIONS:
            problems.append(f"activation_function is {self.activation_function!r}; expected one of {ACTIVATIONS}")
        if self.normalization_function not in NORMALIZATIONS:
            problems.append(
                f"normalization_function is {self.normalization_function!r}; expected one of {NORMALIZATIONS}"
            )
        if self.position_embedding_type != "nope":
            problems.append(
                f"position_embedding_type is {self.position_embedding_type!r}; stick-breaking models "
                "use none ('nope')"
            )
        if self.attention_backend not in BACKENDS:
            problems.append(f"attention_backend is {self.attention_backend!r}; expected one of {BACKENDS}")
        if not isinstance(self.decode_graphs, bool):
            problems.append(f"decode_graphs is {self.decode_graphs!r}; expected true or false")
        if self.add_bias and self.add_qkv_bias:
            problems.append("add_bias and add_qkv_bias are both set; dolomite allows one of them")
        if problems:
            raise ValueError("config.json: " + "; ".join(problems))


def tiny_config(**overrides) -> StickBreakingConfig:
    """A small stick-breaking config in the released format, sized for CPU tests and demos:
    the 3B's choices (swiglu, rmsnorm, muP multipliers, attention_multiplier 1/head_dim, no
    remainder, tied embeddings) at 4 layers x 128 wide, for the byte-level tokenizer's 257 ids."""
    fields = dict(
        vocab_size=257, n_positions=2048, n_embd=128, n_layer=4, n_head=4, n_inner=256,
        activation_function="swiglu", normalization_function="rmsnorm", layer_norm_epsilon=1e-5,
        attention_multiplier=1 / 32, m_emb=12.0, m_residual=0.22, m_width=2.0,
        sb_remainder=False, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )
    fields.update(overrides)
    return StickBreakingConfig(**fields)


def released_3b_config(**overrides) -> StickBreakingConfig:
    """The released 3B checkpoint's config (shawntan/stickbreaking-3b's config.json), for benchmarks at its shapes."""
    fields = dict(
        vocab_size=50304, n_positions=4096, n_embd=2304, n_layer=40, n_head=36, n_inner=9216,
        activation_function="swiglu", normalization_function="rmsnorm", layer_norm_epsilon=1e-5,
        attention_multiplier=1 / 64, m_emb=12, m_residual=0.22, m_width=9, sb_remainder=False,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=50256,
    )
    fields.update(overrides)
    return StickBreakingConfig(**fields)
