"""The model on a GPU: the Triton kernels inside it (prefill, split-key decode, padding masks)."""

import pytest
import torch

from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny_config(n_embd=256, n_head=4, n_layer=3, n_inner=512, num_key_value_heads=2, attention_head_type="gqa")
    folder = write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", config, seed=5)
    return StickBreakingForCausalLM.from_pretrained(folder).cuda().eval()


def left_padded_batch(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), vocab)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids.cuda(), mask.cuda()


@torch.no_grad()
def test_triton_and_torch_backends_agree_inside_the_model(model):
    ids, mask = left_padded_batch([700, 1100, 333])
    logits = {}
    for backend in ("triton", "torch"):
        model.set_attention_backend(backend)
        logits[backend] = model(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    model.set_attention_backend("auto")
    error = (logits["triton"] - logits["torch"]).norm() / logits["torch"].norm()
    assert error < 1e-4


@torch.no_grad()
def test_generation_on_gpu_equals_recompute(model):
    ids, mask = left_padded_batch([900, 400], seed=1)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=256)
    for row in range(2):
        prompt = ids[row, mask[row].bool()][None]
        for _ in range(16):
            next_token = model(prompt, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            prompt = torch.cat([prompt, next_token], 1)
        assert torch.equal(generated[row, ids.shape[1]:], prompt[0, -16:])


@torch.no_grad()
def test_preallocated_cache_decodes_as_the_dynamic_cache_does(model):
    """bf16 on the Triton kernels: the preallocated cache's strided views give the same logits as
    transformers' concatenated DynamicCache, bit for bit."""
    from transformers import DynamicCache

    from sb_eval.model.cache import PreallocatedCache
    from sb_eval.model.modeling import CACHE_FIELD

    bf16 = model.to(torch.bfloat16)
    try:
        ids, mask = left_padded_batch([1500, 700, 1100], seed=2)
        outputs = {}
        for kind, cache in (("preallocated", PreallocatedCache(1600)), ("dynamic", DynamicCache())):
            steps = [bf16(ids, attention_mask=mask, logits_to_keep=1, **{CACHE_FIELD: cache}).logits]
            step_mask = mask
            for _ in range(8):
                token = steps[-1][:, -1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], 1)
                steps.append(bf16(token, attention_mask=step_mask, **{CACHE_FIELD: cache}).logits)
            outputs[kind] = torch.cat(steps, 1)
        assert torch.equal(outputs["preallocated"], outputs["dynamic"])
    finally:
        model.float()


@torch.no_grad()
def test_a_left_padded_batch_generates_what_its_rows_generate_alone(model):
    ids, mask = left_padded_batch([1500, 700, 1100], seed=3)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=256)
    for row in range(ids.shape[0]):
        alone = ids[row, mask[row].bool()][None]
        single = model.generate(alone, max_new_tokens=12, do_sample=False, pad_token_id=256)
        assert torch.equal(batched[row, ids.shape[1]:], single[0, alone.shape[1]:])


@torch.no_grad()
def test_decode_graphs_generate_what_launched_kernels_generate(model):
    """Greedy generation with each decode step replayed as a CUDA graph gives the tokens of the
    same steps launched kernel by kernel: a left-padded batch (a key mask), a single prompt, and
    a cache that runs out of room at the 13th new token (it grows eagerly there, and the graph is
    captured again on the new buffers)."""
    from sb_eval.model.cache import PreallocatedCache
    from sb_eval.model.modeling import CACHE_FIELD

    ids, mask = left_padded_batch([1500, 700, 1100], seed=4)
    cases = [
        dict(input_ids=ids, attention_mask=mask),
        dict(input_ids=ids[:1, -333:]),
        dict(input_ids=ids[1:2, -500:], **{CACHE_FIELD: PreallocatedCache(512)}),
    ]
    for case in cases:
        outputs = {}
        for graphs in (False, True):
            model.set_decode_graphs(graphs)
            arguments = {name: (PreallocatedCache(512) if name == CACHE_FIELD else value) for name, value in case.items()}
            result = model.generate(**arguments, max_new_tokens=24, do_sample=False, pad_token_id=256,
                                    return_dict_in_generate=True, output_logits=True)
            cache = getattr(result, CACHE_FIELD)
            assert (cache.decode_graph is not None) == graphs
            if graphs and CACHE_FIELD in case:
                assert cache.layers[0].capacity > 512 and cache.decode_graph.fits(model, cache, 1, True)
            outputs[graphs] = result
        model.set_decode_graphs(False)
        assert torch.equal(outputs[True].sequences, outputs[False].sequences)
        for graphed, launched in zip(outputs[True].logits, outputs[False].logits):
            assert torch.allclose(graphed, launched, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def test_decode_graphs_without_a_mask_and_off_the_triton_backend(model):
    """Steps without an attention mask replay a graph captured without one and give the logits
    of launched steps; with the torch backend (which reads the key count on the host) no graph
    is captured."""
    from sb_eval.model.cache import PreallocatedCache
    from sb_eval.model.modeling import CACHE_FIELD

    ids = left_padded_batch([700, 700], seed=6)[0]
    logits, caches = {}, {}
    for graphs in (False, True):
        model.set_decode_graphs(graphs)
        cache = caches[graphs] = PreallocatedCache(720)
        steps = [model(ids, logits_to_keep=1, **{CACHE_FIELD: cache}).logits]
        for _ in range(8):
            steps.append(model(steps[-1].argmax(-1), **{CACHE_FIELD: cache}).logits)
        logits[graphs] = torch.cat(steps, 1)
    assert caches[True].decode_graph is not None and not caches[True].decode_graph.masked
    assert torch.allclose(logits[True], logits[False], atol=1e-3, rtol=1e-3)
    model.set_attention_backend("torch")
    try:
        result = model.generate(ids[:1, :300], max_new_tokens=4, do_sample=False, pad_token_id=256, return_dict_in_generate=True)
        assert getattr(result, CACHE_FIELD).decode_graph is None
    finally:
        model.set_attention_backend("auto")
        model.set_decode_graphs(False)


@torch.no_grad()
def test_decode_graphs_step_aside_for_hooks_inside_the_model(model):
    """A forward hook on the decoder (how attention statistics reach the layers) or on a module
    in it must see every step, so such steps are launched kernel by kernel; a hook on the model
    itself runs around each replay, even one that synchronises (it would break a capture)."""
    from sb_eval.analysis.attention_stats import collecting_attention_statistics
    from sb_eval.model.modeling import CACHE_FIELD

    ids = left_padded_batch([600], seed=5)[0]
    calls = {"model": 0, "mlp": 0}

    def count(name):
        def hook(module, args):
            torch.cuda.synchronize()
            calls[name] += 1
        return hook

    model.set_decode_graphs(True)
    try:
        with collecting_attention_statistics(model) as statistics:
            model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
        assert statistics.forward_passes == 5  # the prefill and four decode steps
        handle = model.transformer.h[1].mlp.register_forward_pre_hook(count("mlp"))
        try:
            model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256)
        finally:
            handle.remove()
        assert calls["mlp"] == 5
        handle = model.register_forward_pre_hook(count("model"))
        try:
            result = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=256, return_dict_in_generate=True)
        finally:
            handle.remove()
        assert calls["model"] == 5 and getattr(result, CACHE_FIELD).decode_graph is not None
    finally:
        model.set_decode_graphs(False)
