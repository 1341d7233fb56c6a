"""A decode step captured as a CUDA graph: one launch for the whole step instead of ~15 per layer.

At the released 3B's shapes a step against a 64K-token cache keeps the GPU busy for about 13 ms,
but launching its ~600 kernels from Python takes longer, so the GPU waits on the host
(BENCHMARKS.md). A CUDA graph replays the launches recorded once. Its launches cannot change
from step to step, so the captured step writes its keys and values into the preallocated
buffers at a slot held in a device tensor (PreallocatedLayer.write_at) and the attention reads
the count of keys from another one (stickbreaking_attention's num_keys); the host only fills
those before each replay.

A graph belongs to one cache and is kept on it (`PreallocatedCache.decode_graph`), so it goes when
the cache goes; it is captured again when what its launches point at changes: the model, its
parameters (moved or cast), its attention backend, the cache's buffers (a cache that grew or got
another batch), the batch size or the presence of an attention mask.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.nn.modules import module as torch_module

from .cache import PreallocatedCache


@dataclass
class GraphStep:
    """What a captured step reads from the device instead of the host: the cache slot it writes
    (position, [1] int64), the count of keys (num_keys, [1] int32, position + 1) and the key mask
    over the whole buffers ([batch, capacity] bool) or None."""

    position: torch.Tensor
    num_keys: torch.Tensor
    key_mask: torch.Tensor | None

    def prepare(self, filled: int, attention_mask: torch.Tensor | None) -> None:
        """Points the step at slot `filled` (the cache holds `filled` tokens) with attention_mask
        [batch, filled + 1] (0 for padding), or None when the step has no key mask."""
        self.position.fill_(filled)
        self.num_keys.fill_(filled + 1)
        if self.key_mask is not None:
            self.key_mask[:, : filled + 1].copy_(attention_mask)


class DecodeGraph:
    """One decode step (one new token per row) of a StickBreakingForCausalLM against a
    PreallocatedCache, captured as a CUDA graph from the step of input_ids [batch, 1] and
    attention_mask [batch, filled + 1] or None; later steps must have the same batch and the
    same presence of a mask. Made by `decode_graph_for`; `step` runs it."""

    def __init__(self, model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        device, capacity = input_ids.device, cache.layers[0].capacity
        self.batch_size, self.masked = input_ids.shape[0], attention_mask is not None
        self.model = weakref.ref(model)  # not the model itself: the cache holds this graph
        self.target = replay_target(model, cache)
        self.ids = input_ids.clone()
        self.graph_step = GraphStep(
            position=torch.empty(1, dtype=torch.long, device=device),
            num_keys=torch.empty(1, dtype=torch.int32, device=device),
            key_mask=torch.ones(self.batch_size, capacity, dtype=torch.bool, device=device) if self.masked else None,
        )
        self.graph_step.prepare(cache.layers[0].filled, attention_mask)

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

    def fits(self, model, cache, batch_size: int, masked: bool) -> bool:
        """Whether this graph can run the next step of `model` against `cache` as captured."""
        return ((batch_size, masked) == (self.batch_size, self.masked) and self.model() is model
                and replay_target(model, cache) == self.target)

    def step(self, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """input_ids [batch, 1], attention_mask [batch, filled + 1] (0 for padding) or None ->
        logits [batch, 1, vocab], a tensor of the caller's; the cache counts one more token."""
        self.ids.copy_(input_ids)
        self.graph_step.prepare(cache.layers[0].filled, attention_mask)
        self.graph.replay()
        for layer in cache.layers:
            layer.advance(1)
        return self.logits.clone()


def replay_target(model, cache) -> tuple:
    """What a captured step's launches point at: the attention backend, where the model's weights
    are (the embedding's and the final norm's addresses: moving or casting a model moves every
    parameter; reading all of them would cost a tenth of a step), and every layer's key and value
    buffers, their addresses and capacity."""
    return (
        model.config.attention_backend,
        model.get_input_embeddings().weight.data_ptr(),
        model.transformer.ln_f.weight.data_ptr(),
        tuple((layer.keys.data_ptr(), layer.values.data_ptr(), layer.capacity) for layer in cache.layers),
    )


def observed(decoder: torch.nn.Module) -> bool:
    """Whether something would see the decoder's modules run that a replay would skip: a forward
    hook on any of them or on every module, or accelerate's device hooks (a model spread over
    devices or offloaded)."""
    if torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks:
        return True
    return any(module._forward_pre_hooks or module._forward_hooks or "_hf_hook" in module.__dict__ for module in decoder.modules())


def decode_graph_for(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> DecodeGraph | None:
    """The cache's decode graph for this step, captured when there is none that fits; None when
    the step cannot run as a graph (then the caller runs it eagerly): not one new token per row
    on a GPU through the triton backend (the torch backends read the key count on the host), a
    decoder that is observed (`observed`), not a PreallocatedCache filled to the same length in
    every layer with room for one more token, or an attention mask that is not [batch, filled + 1]."""
    if not (isinstance(cache, PreallocatedCache) and input_ids.is_cuda and input_ids.dim() == 2 and input_ids.shape[1] == 1):
        return None
    if model.config.attention_backend not in ("auto", "triton") or observed(model.transformer):
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
    if graph is None or not graph.fits(model, cache, batch_size, masked):
        cache.decode_graph = None  # the old graph's memory goes before the new one is captured
        graph = cache.decode_graph = DecodeGraph(model, cache, input_ids, attention_mask)
    return graph
