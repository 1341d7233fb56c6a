"""Stick-breaking attention: Triton kernels, a chunked PyTorch path and the reference definition.

Knows nothing of models: tensors in [batch, heads, seq, head_dim], tensors out.
"""

from .attention import BACKENDS, stickbreaking_attention
from .chunked import stickbreaking_attention_chunked
from .layout import HALT_BITS
from .reference import stickbreaking_attention_reference

__all__ = [
    "BACKENDS",
    "HALT_BITS",
    "stickbreaking_attention",
    "stickbreaking_attention_chunked",
    "stickbreaking_attention_reference",
]
