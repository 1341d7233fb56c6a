"""Attention statistics on a GPU: the Triton kernels' fused statistics and the softmax path at the
dtypes and lengths they run at, against explicit float64 matrices; and their memory."""

import pytest
import torch
from test_attention_stats import (
    assert_statistics_match,
    explicit_statistics,
    left_padded_batch,
    record_sdpa_inputs,
    record_stick_breaking_inputs,
    softmax_matrix,
    stick_breaking_matrix,
)
from transformers import LlamaConfig, LlamaForCausalLM

from sb_eval.analysis.attention_stats import collecting_attention_statistics
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM

pytestmark = pytest.mark.gpu

# Relative error of per-head means: the kernels' own distance tolerance per input dtype
# (tests/test_kernels.py); the softmax path computes in float32 from the very q and k it gets.
SB_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def assert_close_means(found, expected, rtol):
    for layer, wanted in enumerate(expected):
        for convention in ("ignore", "renormalize", "farthest"):
            got = torch.tensor(found["tokens_back"][convention]["mean"][layer], dtype=torch.float64)
            assert torch.allclose(got, wanted[convention], rtol=rtol), (layer, convention)
        got_mass = torch.tensor(found["mass"]["mean"][layer], dtype=torch.float64)
        assert torch.allclose(got_mass, wanted["mass"], rtol=rtol), layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stick_breaking_statistics_from_the_kernels(dtype, monkeypatch):
    torch.manual_seed(0)
    config = tiny_config(n_embd=256, n_head=4, n_layer=2, n_inner=512, num_key_value_heads=2, attention_head_type="gqa")
    model = StickBreakingForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4.0)  # a stick that lasts for more than a few keys
    model = model.to("cuda", dtype)
    calls = record_stick_breaking_inputs(monkeypatch)
    ids, mask = left_padded_batch((1500, 1100, 700), config.vocab_size, seed=1)
    ids, mask = ids.cuda(), mask.cuda()
    with collecting_attention_statistics(model, "all") as statistics, torch.no_grad():
        model.transformer(input_ids=ids, attention_mask=mask, use_cache=False)
    T = ids.shape[1]
    positions = torch.arange(T, device="cuda")
    visible = (positions[None, :] < positions[:, None])[None, None] & mask.bool()[:, None, None, :]
    counted = mask.bool() & visible.any(-1)[:, 0]
    expected = [
        explicit_statistics_on(stick_breaking_matrix(q, k, config.attention_scale, visible), positions, visible, counted)
        for q, k in calls
    ]
    assert_close_means(statistics.to_dict(), expected, SB_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_statistics_beside_sdpa(dtype, monkeypatch):
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=257, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to("cuda", dtype).eval()
    ids, mask = left_padded_batch((1300, 900), 257, seed=2)
    ids, mask = ids.cuda(), mask.cuda()
    real = mask.bool()  # padding rows see no key; compare the real ones
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits[real]
    calls = record_sdpa_inputs(monkeypatch)
    with collecting_attention_statistics(model, "all") as statistics, torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[real]
    assert torch.equal(logits, reference)
    T = ids.shape[1]
    positions = torch.arange(T, device="cuda")
    visible = (positions[None, :] <= positions[:, None])[None, None] & mask.bool()[:, None, None, :]
    expected = [
        explicit_statistics_on(softmax_matrix(q, k, config.head_dim ** -0.5, visible), positions, visible, mask.bool())
        for q, k in calls
    ]
    assert_statistics_match(statistics.to_dict(), expected)


def explicit_statistics_on(A, positions, visible, counted):
    """explicit_statistics (which works on CPU tensors) of matrices built on the GPU."""
    return explicit_statistics(A.cpu(), positions.cpu(), visible.cpu(), counted.cpu())


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@torch.no_grad()
def test_statistics_memory_is_linear_in_length():
    """At 16K tokens: stick-breaking statistics add per-query vectors only; the softmax path adds
    bounded tiles, far below one layer's [heads, T, T] float32 matrix (8 GiB for 8 heads)."""
    T = 16384
    ids = torch.randint(0, 256, (1, T), device="cuda")
    sb = StickBreakingForCausalLM(tiny_config(n_embd=512, n_head=8, n_layer=1, n_inner=1024)).to("cuda", torch.bfloat16).eval()
    plain = peak_extra_bytes(lambda: sb.transformer(input_ids=ids, use_cache=False))
    with collecting_attention_statistics(sb, "all"):
        with_stats = peak_extra_bytes(lambda: sb.transformer(input_ids=ids, use_cache=False))
    assert with_stats - plain < 64 * T * 8 * 8  # a few dozen float64 values per query and head

    config = LlamaConfig(
        vocab_size=257, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=T,
    )
    config._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    plain = peak_extra_bytes(lambda: llama.model(input_ids=ids, use_cache=False))
    with collecting_attention_statistics(llama, "all"):
        with_stats = peak_extra_bytes(lambda: llama.model(input_ids=ids, use_cache=False))
    assert with_stats - plain < 2**30
