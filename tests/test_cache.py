"""The preallocated key-value cache (sb_eval.model.cache): generation with it equals recomputation
and transformers' DynamicCache, it grows when it must, and sb_hf's batches answer as single
requests do."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import DynamicCache

from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.cache import CAPACITY_STEP, PreallocatedCache
from sb_eval.model.configuration import tiny_config
from sb_eval.model.decode_graph import GraphStep
from sb_eval.model.modeling import CACHE_FIELD, StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint

PAD = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = StickBreakingForCausalLM(tiny_config(n_layer=2, n_embd=64, n_head=4, n_inner=128, num_key_value_heads=2,
                                                 attention_head_type="gqa")).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(5.0)  # sticks that last: every cached key matters
    model.set_attention_backend("torch")
    return model


def left_padded(lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(0, 256, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def recomputed(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation from a full forward pass over everything so far at every step."""
    for _ in range(new_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_generation_with_the_preallocated_cache_equals_recomputation_and_dynamic_cache(model):
    ids, mask = left_padded((33, 20, 27), seed=1)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                            return_dict_in_generate=True)
    assert isinstance(getattr(cached, CACHE_FIELD), PreallocatedCache)
    assert torch.equal(cached.sequences, recomputed(model, ids, mask, 12))
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                             **{CACHE_FIELD: DynamicCache()}, return_dict_in_generate=True)
    assert isinstance(getattr(dynamic, CACHE_FIELD), DynamicCache)  # a cache the caller passes is kept
    assert torch.equal(dynamic.sequences, cached.sequences)


def test_generate_sizes_the_cache_for_prompt_and_new_tokens(model):
    ids, mask = left_padded((300,), seed=2)
    result = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD,
                            return_dict_in_generate=True)
    cache = getattr(result, CACHE_FIELD)
    assert cache.get_seq_length() == 304  # the last new token is never fed back
    assert all(layer.capacity == 2 * CAPACITY_STEP for layer in cache.layers)  # 305 rounded up, no growth


def test_the_cache_grows_past_its_capacity_and_keeps_what_it_holds(model):
    ids, mask = left_padded((30,), seed=3)
    cache = PreallocatedCache(capacity=8)
    with torch.no_grad():
        first = model(input_ids=ids[:, :20], attention_mask=mask[:, :20], **{CACHE_FIELD: cache}).logits
        layer = cache.layers[0]
        capacity, buffer = layer.capacity, layer.keys.untyped_storage().data_ptr()
        rest = model(input_ids=ids[:, 20:], attention_mask=mask, **{CACHE_FIELD: cache}).logits
        whole = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert capacity == CAPACITY_STEP and layer.keys.untyped_storage().data_ptr() == buffer  # room for all 30: no copy
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-5)
    grown = PreallocatedCache(capacity=1)
    keys = torch.randn(1, 2, CAPACITY_STEP + 3, 16)
    grown.update(keys[:, :, :CAPACITY_STEP], keys[:, :, :CAPACITY_STEP], 0)
    all_keys, _ = grown.update(keys[:, :, CAPACITY_STEP:], keys[:, :, CAPACITY_STEP:], 0)
    assert grown.layers[0].capacity == 2 * CAPACITY_STEP and torch.equal(all_keys, keys)


def test_a_cache_is_freed_with_its_last_reference_not_by_the_garbage_collector():
    cache = PreallocatedCache(16)
    cache.update(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 0)
    buffer = weakref.ref(cache.layers[0]._key_buffer)
    gc.disable()
    try:
        del cache
        assert buffer() is None
    finally:
        gc.enable()


def test_crop_and_batch_selection(model):
    cache = PreallocatedCache()
    keys = torch.randn(3, 2, 10, 16)
    cache.update(keys, -keys, 0)
    cache.crop(-4)
    assert cache.get_seq_length() == 6 and torch.equal(cache.layers[0].keys, keys[:, :, :6])
    cache.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(cache.layers[0].values, -keys[[2, 0], :, :6])
    more, _ = cache.update(keys[:2, :, :1], keys[:2, :, :1], 0)
    assert torch.equal(more[:, :, 6], keys[:2, :, 0])
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(2)
    with pytest.raises(ValueError, match="capacity must be a number of tokens >= 0"):
        PreallocatedCache(-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_graph_step_decodes_as_an_ordinary_step_does(model, backend, kernel_device):
    """The arithmetic a CUDA graph captures (sb_eval.model.decode_graph), run eagerly: writing
    each token's keys into a slot named on the device and reading a count of keys from the
    device gives the logits of ordinary decode steps, for a left-padded batch."""
    device = kernel_device if backend == "triton" else "cpu"
    model.to(device).set_attention_backend(backend)
    try:
        ids, mask = (x.to(device) for x in left_padded((30, 17), seed=4))
        caches = PreallocatedCache(40), PreallocatedCache(40)
        with torch.no_grad():
            for cache in caches:
                model(input_ids=ids, attention_mask=mask, **{CACHE_FIELD: cache})
            capacity = caches[1].layers[0].capacity
            step = GraphStep(position=torch.zeros(1, dtype=torch.long, device=device),
                             num_keys=torch.zeros(1, dtype=torch.int32, device=device),
                             key_mask=torch.zeros(2, capacity, dtype=torch.bool, device=device))
            token = ids[:, -1:]
            for _ in range(5):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                ordinary = model(input_ids=token, attention_mask=mask, **{CACHE_FIELD: caches[0]}).logits
                step.prepare(caches[1].get_seq_length(), mask)
                graphed = model(input_ids=token, cache=caches[1], logits_to_keep=1, graph_step=step).logits
                for layer in caches[1].layers:
                    layer.advance(1)
                assert torch.allclose(graphed, ordinary, atol=1e-5)
                token = ordinary[:, -1:].argmax(-1)
        assert caches[1].get_seq_length() == caches[0].get_seq_length() == 35
        assert torch.allclose(caches[1].layers[1].keys, caches[0].layers[1].keys, atol=1e-5)
        with pytest.raises(ValueError, match="would pass the capacity"):
            caches[1].layers[0].advance(capacity)
    finally:
        model.to("cpu").set_attention_backend("torch")


def test_decode_graphs_are_never_used_off_the_gpu_and_are_checked(model):
    model.set_decode_graphs(True)
    try:
        ids, mask = left_padded((9,), seed=5)
        cache = PreallocatedCache(16)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **{CACHE_FIELD: cache})
            model(input_ids=ids[:, -1:], **{CACHE_FIELD: cache})
        assert cache.decode_graph is None and cache.get_seq_length() == 10
        with pytest.raises(ValueError, match=r"set_decode_graphs\(enabled\) takes True or False, got 'yes'"):
            model.set_decode_graphs("yes")
    finally:
        model.set_decode_graphs(False)
    assert "decode_graphs" not in model.config.to_dict()


def test_a_decoder_is_observed_by_any_forward_hook_inside_it_or_on_every_module(model):
    """Replays skip the decoder's modules, so steps that something watches must not replay."""
    from sb_eval.model.decode_graph import observed

    decoder = model.transformer
    assert not observed(decoder)
    for register in (decoder.h[1].mlp.register_forward_hook, decoder.register_forward_pre_hook,
                     torch.nn.modules.module.register_module_forward_hook):
        handle = register(lambda *args: None)
        try:
            assert observed(decoder)
        finally:
            handle.remove()
    decoder.h[0].attn._hf_hook = object()  # accelerate's device placement hook
    try:
        assert observed(decoder)
    finally:
        del decoder.h[0].attn._hf_hook
    assert not observed(decoder)


def test_what_a_graph_replays_against_changes_with_the_backend_the_weights_and_the_buffers(model):
    from sb_eval.model.decode_graph import replay_target

    ids, mask = left_padded((9,), seed=7)
    cache = PreallocatedCache(10)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **{CACHE_FIELD: cache})
    captured = replay_target(model, cache)
    assert replay_target(model, cache) == captured
    model.set_attention_backend("triton")
    assert replay_target(model, cache) != captured
    model.set_attention_backend("torch")
    model.double()
    try:
        assert replay_target(model, cache) != captured  # a cast model's weights live elsewhere
    finally:
        model.float()
    grown = replay_target(model, cache)
    cache.update(*(torch.zeros(1, 2, CAPACITY_STEP, 16),) * 2, 0)  # past the capacity: new buffers for layer 0
    assert replay_target(model, cache) != grown


def test_a_graph_step_that_cannot_run_is_named(model):
    ids, mask = left_padded((9,), seed=6)
    step = GraphStep(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.int32), None)
    cache = PreallocatedCache(16)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_FIELD: cache})
        with pytest.raises(ValueError, match="graph_step needs use_cache and a PreallocatedCache, got use_cache=True and DynamicCache"):
            model(input_ids=ids[:, -1:], graph_step=step, **{CACHE_FIELD: DynamicCache()})
        with pytest.raises(ValueError, match="graph_step needs use_cache and a PreallocatedCache, got use_cache=False"):
            model(input_ids=ids[:, -1:], graph_step=step, use_cache=False)
        with pytest.raises(ValueError, match=r"graph_step runs one new token per row, got 2"):
            model(input_ids=ids[:, -2:], graph_step=step, **{CACHE_FIELD: cache})
        with pytest.raises(ValueError, match="graph_step does not record attention statistics"):
            model.transformer(input_ids=ids[:, -1:], graph_step=step, attention_spans=object(), cache=cache)


def test_a_copied_cache_leaves_its_graph_behind_and_reordered_rows_stay_in_their_buffers():
    import copy
    import threading

    cache = PreallocatedCache(16)
    keys = torch.randn(3, 2, 5, 8)
    cache.update(keys, -keys, 0)
    cache.decode_graph = threading.Lock()  # stands in for a DecodeGraph: neither can be copied
    copied = copy.deepcopy(cache)
    assert copied.decode_graph is None and torch.equal(copied.layers[0].keys, keys)
    address = cache.layers[0].keys.data_ptr()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.layers[0].keys.data_ptr() == address
    assert torch.equal(cache.layers[0].keys, keys[[2, 2, 0]]) and torch.equal(cache.layers[0].values, -keys[[2, 2, 0]])
    cache.batch_select_indices(torch.tensor([1]))
    assert torch.equal(cache.layers[0].keys, keys[[2]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config(n_layer=2, n_embd=64, n_head=4, n_inner=128)
    return write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", config, seed=5)


def requests(prompts: list[str], max_gen_toks: int = 6) -> list[Instance]:
    gen_kwargs = {"until": [], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (prompt, gen_kwargs), index) for index, prompt in enumerate(prompts)]


def test_batched_generation_answers_as_single_requests_do(checkpoint):
    prompts = [f"Request {i}: " + "abcdefghij"[: i + 1] * (3 + 5 * i) for i in range(5)]
    single = StickBreakingLM(pretrained=str(checkpoint), device="cpu", batch_size=1, attention_backend="torch")
    batched = StickBreakingLM(pretrained=str(checkpoint), device="cpu", batch_size=4, attention_backend="torch")
    answers = single.generate_until(requests(prompts))
    assert batched.generate_until(requests(prompts)) == answers
    assert len(set(answers)) > 1  # the prompts are told apart


def test_batch_size_auto_shrinks_on_out_of_memory_and_means_one_off_the_gpu(checkpoint, monkeypatch):
    lm = StickBreakingLM(pretrained=str(checkpoint), device="cpu", batch_size="auto", max_batch_size=64, attention_backend="torch")
    assert lm._largest_batch(lambda batch_size: None) == 1
    tried = []

    def probe(batch_size: int) -> None:
        tried.append(batch_size)
        if batch_size > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StickBreakingLM, "device", property(lambda self: torch.device("cuda")))
    assert lm._largest_batch(probe) == 5 and tried[0] == 64 and tried[-1] == 5 and tried == sorted(tried, reverse=True)
    # generate_until runs HFLM with the chosen size, then is auto again
    monkeypatch.setattr(StickBreakingLM, "_largest_batch", lambda self, probe: 3)
    seen = []
    monkeypatch.setattr("lm_eval.models.huggingface.HFLM.generate_until", lambda self, reqs, disable_tqdm=False: seen.append(self.batch_size) or [])
    lm.generate_until(requests(["x"]))
    assert seen == [3] and lm.batch_size == "auto"
