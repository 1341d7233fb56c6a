"""GPU-only checks of the backward kernels at the block sizes and lengths they run at in use:
gradients against the float64 definition, bitwise determinism, and memory linear in T."""

import pytest
import torch
from test_kernels import long_range_inputs, random_inputs, relative_error
from test_kernels_backward import check_gradients, gradients, upstream_gradients

from sb_eval.kernels.attention import stickbreaking_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [(1, 4, 2, 1500, 1500, 128), (2, 3, 3, 1500, 1500, 64), (1, 2, 1, 777, 4099, 128),
     (1, 8, 2, 5, 9001, 64)],
    ids=["prefill-128-gqa", "prefill-64", "chunk-after-cache", "short-chunk-gqa"],
)
@pytest.mark.parametrize("inputs", ["random", "long_range"])
def test_real_sizes_match_reference(dtype, shape, inputs):
    make = random_inputs if inputs == "random" else long_range_inputs
    q, k, v = make(*shape, dtype, "cuda")
    check_gradients(q, k, v, attend_current=inputs == "random")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_long_range_over_4099_keys(head_dim):
    q, k, v = long_range_inputs(1, 2, 2, 4099, 4099, head_dim, torch.bfloat16, "cuda")
    _, (_, rem) = check_gradients(q, k, v)
    assert rem[..., -1].min() > 0.5  # the stick of the last queries spans every key range


@pytest.mark.parametrize("head_dim", [64, 128])
def test_saturated_logits(head_dim):
    q, k, v = random_inputs(1, 4, 2, 1500, 1500, head_dim, torch.bfloat16, "cuda", logit_std=30.0)
    check_gradients(q, k, v, attend_current=True)


def test_tiny_upstream_gradients_in_bfloat16():
    """a = A * g scales with the upstream gradient (here ~1e-12): its in-block sums must not
    underflow, as they would in plain float16."""
    q, k, v = long_range_inputs(1, 2, 2, 1000, 1000, 64, torch.bfloat16, "cuda")
    check_gradients(q, k, v, do_scale=1e-7)


def test_remainder_key_mask_and_custom_scale():
    q, k, v = random_inputs(2, 4, 2, 1000, 1200, 64, torch.bfloat16, "cuda", seed=3)
    remainder = torch.randn(4, 64, device="cuda")
    key_mask = torch.ones(2, 1200, dtype=torch.bool, device="cuda")
    key_mask[0, :300] = False  # left padding
    key_mask[1, 500:520] = False
    check_gradients(q, k, v, remainder=remainder, key_mask=key_mask, scale=1 / 64, attend_current=True)


@pytest.mark.parametrize("head_dim", [16, 48, 96, 256])
def test_uncommon_head_dims(head_dim):
    q, k, v = random_inputs(1, 2, 2, 300, 300, head_dim, torch.bfloat16, "cuda")
    check_gradients(q, k, v)


def test_backward_is_deterministic():
    q, k, v = long_range_inputs(1, 8, 2, 3000, 3000, 128, torch.bfloat16, "cuda")
    do, drem = upstream_gradients(q)
    first, _ = gradients(q, k, v, "triton", do, drem)
    for _ in range(3):
        again, _ = gradients(q, k, v, "triton", do, drem)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _training_step_extra_memory(T: int) -> int:
    """Peak bytes a forward + backward allocates beyond its inputs, outputs, upstream gradients
    and the gradients it returns, at 16 heads x 128, bf16."""
    q, k, v = (x.requires_grad_(True) for x in long_range_inputs(1, 16, 16, T, T, 128, torch.bfloat16, "cuda"))
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, rem = stickbreaking_attention(q, k, v)
    o.backward(do)
    torch.cuda.synchronize()
    kept = sum(x.numel() * x.element_size() for x in (o, rem, q.grad, k.grad, v.grad))
    return torch.cuda.max_memory_allocated() - before - kept


def test_training_memory_is_linear_in_length():
    """Quadratic memory (a partial dK/dV per query block, or a state per query and key block)
    would grow 16x from 16K to 64K tokens; ours grows with T."""
    small, large = _training_step_extra_memory(16384), _training_step_extra_memory(65536)
    assert large < 4.5 * small
    # 64K x 16 heads: per query row 3 floats, 2 per key range (16 ranges on a 132-SM card), and
    # the zero gradient autograd makes for the unused rem: ~150 MiB
    assert large < 2**28


def test_gradients_match_the_torch_backend_at_length():
    """Against autograd through the chunked torch path (float32) where the float64 definition
    would not fit: 16K keys."""
    q, k, v = long_range_inputs(1, 2, 1, 2048, 16384, 64, torch.bfloat16, "cuda")
    do, drem = upstream_gradients(q)
    got, _ = gradients(q, k, v, "triton", do, drem)
    expected, _ = gradients(q.float(), k.float(), v.float(), "torch", do, drem)
    for grad, ref in zip(got, expected):
        assert relative_error(grad, ref) <= 2e-2
