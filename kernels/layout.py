"""Shape conventions shared by every backend of the attention op.

Tensors are [batch, heads, seq, head_dim]. The Tq queries are the last Tq of the Tk positions, so
query row r sits at absolute position Tk - Tq + r; it sees keys i < that position (i <= with
``attend_current``). Key heads are shared by Hq // Hkv consecutive query heads.
"""

from __future__ import annotations

import math
import os

import torch

# Early halting: once the remaining stick of every query row in a block is below 2^-HALT_BITS,
# farther keys can add at most that fraction of the output and are skipped.
HALT_BITS = 20.0
HALT_NATS = HALT_BITS * math.log(2.0)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1), as in CI."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def expand_kv_heads(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hq, T, D], repeating each key/value head for its query group."""
    group = num_query_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def query_positions(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Absolute positions [Tq] of the query rows: the last Tq of the Tk key positions."""
    return torch.arange(num_keys - num_queries, num_keys, device=device)


def visible_keys(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    attend_current: bool,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which keys each query may attend to: bool [B or 1, 1, q, k].

    query_pos: [q] absolute query positions; key_pos: [k] key positions;
    key_mask: [B, k] bool for those keys (False for padding), or None.
    """
    if attend_current:
        visible = key_pos[None, :] <= query_pos[:, None]
    else:
        visible = key_pos[None, :] < query_pos[:, None]
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return visible


def span_members(key_spans: torch.Tensor, num_spans: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, k] span indices -> [B, k, num_spans] one-hot in `dtype`: 1 where a key is in span s
    (an index outside [0, num_spans) gives a row of zeros)."""
    spans = torch.arange(num_spans, device=key_spans.device)
    return (key_spans[..., None] == spans).to(dtype)
