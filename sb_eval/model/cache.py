"""A key-value cache whose buffers are allocated ahead: each layer's keys and values are written in
place, and attention reads views of the filled part, never a concatenated copy.

transformers' DynamicCache concatenates every new token's keys and values onto the whole cache, so
decoding one token against a 64K-token cache copies the cache (24 GB at the released 3B's shapes).
Here a layer's buffers, [batch, kv_heads, capacity, head_dim], are made once with room for
`capacity` tokens (the prompt and the tokens to generate, as `generate` knows them); a write past
the end grows them by at least GROWTH times, one copy, so that use without a known length stays
cheap too.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

# When a write does not fit, the buffers grow to at least this many times their capacity.
GROWTH = 1.25
# Capacities are rounded up to a multiple of this many tokens.
CAPACITY_STEP = 256


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in preallocated buffers; `keys` and `values` are views of their
    filled part, [batch, kv_heads, filled, head_dim]."""

    is_sliding = False
    is_croppable = True

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self.filled = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._allocate(key_states, value_states, max(self.capacity, key_states.shape[-2]))
        self.is_initialized = True

    def _allocate(self, key_like: torch.Tensor, value_like: torch.Tensor, tokens: int) -> None:
        """New buffers for at least `tokens` tokens, holding the filled part of the old ones."""
        capacity = CAPACITY_STEP * math.ceil(tokens / CAPACITY_STEP)
        batch, heads, _, key_dim = key_like.shape
        key_buffer = key_like.new_empty(batch, heads, capacity, key_dim)
        value_buffer = value_like.new_empty(batch, heads, capacity, value_like.shape[-1])
        if self.filled:
            key_buffer[:, :, : self.filled] = self.keys
            value_buffer[:, :, : self.filled] = self.values
        self._key_buffer, self._value_buffer, self.capacity = key_buffer, value_buffer, capacity
        self._refresh_views()

    def _refresh_views(self) -> None:
        self.keys = self._key_buffer[:, :, : self.filled]
        self.values = self._value_buffer[:, :, : self.filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes key_states and value_states [batch, kv_heads, new, head_dim] after the filled part;
        returns views of all keys and values so far, [batch, kv_heads, filled, head_dim]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.filled + new > self.capacity:
            self._allocate(key_states, value_states, max(self.filled + new, math.ceil(GROWTH * self.capacity)))
        self._key_buffer[:, :, self.filled : self.filled + new] = key_states
        self._value_buffer[:, :, self.filled : self.filled + new] = value_states
        self.advance(new)
        return self.keys, self.values

    def write_at(self, key_states: torch.Tensor, value_states: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes key_states and value_states [batch, kv_heads, 1, head_dim] into the slot that
        `position` ([1] int64, on the buffers' device) names, without moving the filled count
        (advance does that); returns the whole buffers, [batch, kv_heads, capacity, head_dim].
        The slot is read on the device: one launch serves every position, as a CUDA graph needs."""
        self._key_buffer.index_copy_(2, position, key_states)
        self._value_buffer.index_copy_(2, position, value_states)
        return self._key_buffer, self._value_buffer

    def advance(self, tokens: int) -> None:
        """Counts `tokens` more slots as filled (after update or write_at has written them)."""
        if self.filled + tokens > self.capacity:
            raise ValueError(f"advancing by {tokens} tokens would pass the capacity ({self.filled} of {self.capacity} filled)")
        self.filled += tokens
        self._refresh_views()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of transformers' mask builders: the keys a query block sees."""
        return self.filled + query_length, 0

    def get_seq_length(self) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return -1  # it grows on demand

    def reset(self) -> None:
        self.filled = 0
        if self.is_initialized:
            self._refresh_views()

    def crop(self, tokens_to_remove: int) -> None:
        """Forgets the last `tokens_to_remove` tokens (a negative count, as transformers passes it)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.filled = max(0, self.filled + tokens_to_remove)
        if self.is_initialized:
            self._refresh_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._refresh_views()

    def _select_rows(self, rows: torch.Tensor) -> None:
        """Keeps rows `rows` of the batch, in that order. As many rows as before (beam search
        reordering its beams every step) stay in the same buffers, so that a decode graph
        captured on them still fits."""
        if self.is_initialized:
            rows = rows.to(self._key_buffer.device)
            if rows.numel() == self._key_buffer.shape[0]:
                self._key_buffer.copy_(self._key_buffer.index_select(0, rows))
                self._value_buffer.copy_(self._value_buffer.index_select(0, rows))
            else:
                self._key_buffer = self._key_buffer.index_select(0, rows)
                self._value_buffer = self._value_buffer.index_select(0, rows)
            self._refresh_views()


class PreallocatedCache(Cache):
    """A cache of PreallocatedLayers with room for `capacity` tokens each (they grow beyond it
    when asked to). `generate` on a StickBreakingForCausalLM makes one sized to its prompt and
    max_new_tokens; pass one yourself as `cache=` (or `past_key_values=`) to forward or generate."""

    def __init__(self, capacity: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be a number of tokens >= 0, got {capacity}")
        self.capacity = capacity
        # A partial, not a bound method: a reference from the cache to itself would keep its
        # buffers (24 GB at 64K tokens and the 3B's shapes) alive until the garbage collector
        # runs, not until the last reference goes.
        super().__init__(layer_class_to_replicate=partial(PreallocatedLayer, capacity))
        # A sb_eval.model.decode_graph.DecodeGraph of this cache's decode step, once one is run.
        self.decode_graph = None

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, to reuse a prompt's cache) captures its own graph: a CUDA graph
        # cannot be copied, and this one points at the original's buffers.
        return {**self.__dict__, "decode_graph": None}
