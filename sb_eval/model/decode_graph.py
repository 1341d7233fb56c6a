"""A decode step captured as a CUDA graph: one launch for the whole step instead of ~15 per layer.

At the released 3B's shapes a step against a 64K-token cache keeps the GPU busy for about 13 ms,
but launching its ~600 kernels from Python takes longer, so the GPU waits on the host
(BENCHMARKS.md). A CUDA graph replays the launches recorded once. Its launches cannot change
from step to step, so the captured step writes its keys and values into the preallocated
buffers at a slot held in a device tensor (PreallocatedLayer.write_at) and the attention reads
the count of keys from another one (stickbreaking_attention's num_keys); the host only fills
those before each replay.

A graph belongs to one cache and is kept on it (`PreallocatedCache.decode_graph`), so it goes when
the cache goes; it is captured again when the batch, the buffers (a cache that grew or was
reordered) or the presence of an attention mask change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import PreallocatedCache


@dataclass
class GraphStep:
    """What a captured step reads from the device instead of the host: the cache slot it writes
    (position, [1] int64), the count of keys (num_keys, [1] int32, position + 1) and the key mask
    over the whole buffers ([batch, capacity] bool) or None."""

    position: torch.Tensor
    num_keys: torch.Tensor
    key_mask: torch.Tensor | None


class DecodeGraph:
    """One decode step (one new token per row) of a StickBreakingForCausalLM against a
    PreallocatedCache, captured as a CUDA graph. Made by `decode_graph_for`; `step` runs it."""

    def __init__(self, model, cache, batch_size: int, masked: bool) -> None:
        layers = cache.layers
        device = layers[0].keys.device
        self.batch_size, self.masked = batch_size, masked
        self.buffers = buffer_addresses(cache)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graph_step = GraphStep(
            position=torch.full((1,), layers[0].filled, dtype=torch.long, device=device),
            num_keys=torch.full((1,), layers[0].filled + 1, dtype=torch.int32, device=device),
            key_mask=torch.ones(batch_size, layers[0].capacity, dtype=torch.bool, device=device) if masked else None,
        )

        # forward, not __call__: the hooks of the model's own call (around this capture) must
        # not run inside it, where a synchronisation would break the capture.
        def run() -> torch.Tensor:
            return model.forward(input_ids=self.ids, cache=cache, use_cache=True, logits_to_keep=1, graph_step=self.graph_step).logits

        # The warm-up compiles the kernels and writes the slot that every replay writes again
        # before reading it; capture wants it on a side stream.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()

    def fits(self, cache, batch_size: int, masked: bool) -> bool:
        """Whether this graph can run the next step of `cache` as captured."""
        return (batch_size, masked) == (self.batch_size, self.masked) and buffer_addresses(cache) == self.buffers

    def step(self, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [batch, 1], attention_mask [batch, filled + 1] (0 for padding) or None ->
        logits [batch, 1, vocab], a tensor of the caller's; the cache counts one more token."""
        filled = cache.layers[0].filled
        self.ids.copy_(input_ids)
        self.graph_step.position.fill_(filled)
        self.graph_step.num_keys.fill_(filled + 1)
        if self.masked:
            self.graph_step.key_mask[:, : filled + 1].copy_(attention_mask)
        self.graph.replay()
        for layer in cache.layers:
            layer.advance(1)
        return self.logits.clone()


def buffer_addresses(cache) -> tuple[int, ...]:
    """The device addresses of every layer's key and value buffers: a graph replays against these."""
    return tuple(buffer.data_ptr() for layer in cache.layers for buffer in (layer.keys, layer.values))


def decode_graph_for(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> DecodeGraph | None:
    """The cache's decode graph for this step, captured when there is none that fits; None when
    the step cannot run as a graph (then the caller runs it eagerly): not one new token per row
    on a GPU, not a PreallocatedCache filled to the same length in every layer with room for one
    more token, or an attention mask that is not [batch, filled + 1]."""
    if not (isinstance(cache, PreallocatedCache) and input_ids.is_cuda and input_ids.dim() == 2 and input_ids.shape[1] == 1):
        return None
    layers = cache.layers
    if not layers or not all(layer.is_initialized for layer in layers):
        return None
    filled = layers[0].filled
    if any(layer.filled != filled or layer.capacity < filled + 1 for layer in layers):
        return None
    batch_size, masked = input_ids.shape[0], attention_mask is not None
    if masked and tuple(attention_mask.shape) != (batch_size, filled + 1):
        return None
    graph = cache.decode_graph
    if graph is None or not graph.fits(cache, batch_size, masked):
        cache.decode_graph = None  # the old graph's memory goes before the new one is captured
        graph = cache.decode_graph = DecodeGraph(model, cache, batch_size, masked)
    return graph
