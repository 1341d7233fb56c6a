"""GPU-only checks of the compiled kernels at the block sizes and lengths they run at in use."""

import pytest
import torch
from test_kernels import check_against_reference, long_range_inputs, random_inputs

from sb_eval.kernels.attention import stickbreaking_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [(1, 4, 2, 2051, 2051, 128), (2, 3, 3, 1500, 1500, 64), (1, 2, 1, 777, 4099, 128), (1, 8, 2, 5, 9001, 64)],
    ids=["prefill-128-gqa", "prefill-64", "chunk-after-cache", "short-chunk-gqa"],
)
@pytest.mark.parametrize("inputs", ["random", "long_range"])
def test_real_sizes_match_reference(dtype, shape, inputs):
    make = random_inputs if inputs == "random" else long_range_inputs
    q, k, v = make(*shape, dtype, "cuda")
    check_against_reference(q, k, v, "triton", attend_current=inputs == "random")


@pytest.mark.parametrize("head_dim", [16, 48, 96, 256])
def test_uncommon_head_dims(head_dim):
    q, k, v = random_inputs(1, 2, 2, 300, 300, head_dim, torch.bfloat16, "cuda")
    check_against_reference(q, k, v, "triton")


@pytest.mark.parametrize("Tq,Tk", [(1, 65536), (32768, 32768)], ids=["decode-64K", "prefill-32K"])
def test_long_range_stick_over_tens_of_thousands_of_keys(Tq, Tk):
    """A bias of the fast log2 (~1e-7 per key) would shift the stick by ~2e-3 here."""
    q, k, v = long_range_inputs(1, 4, 4, Tq, Tk, 128, torch.bfloat16, "cuda")
    out = stickbreaking_attention(q, k, v, return_stats=True)
    ref = stickbreaking_attention(q.float(), k.float(), v.float(), return_stats=True, backend="torch")
    assert ((out[0].float() - ref[0]).norm() / ref[0].norm()).item() < 1e-2
    assert (out[1] - ref[1]).abs().max().item() < 2e-4


def test_forward_is_deterministic():
    q, k, v = long_range_inputs(1, 4, 4, 3000, 3000, 64, torch.bfloat16, "cuda")
    first = stickbreaking_attention(q, k, v, return_stats=True)
    second = stickbreaking_attention(q, k, v, return_stats=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_memory_is_linear_in_length():
    """64K tokens x 16 heads x 128 take well under 1 GiB beyond inputs and outputs."""
    q, k, v = long_range_inputs(1, 16, 16, 65536, 65536, 128, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, rem = stickbreaking_attention(q, k, v)
    torch.cuda.synchronize()
    outputs = o.numel() * o.element_size() + rem.numel() * 4
    assert torch.cuda.max_memory_allocated() - before - outputs < 2**28


def test_extreme_logits_stay_finite():
    """Softplus values beyond float16's range saturate in the in-block sum instead of making it
    inf (and then NaN through 0 * inf in the triangular matmul)."""
    q, k, v = random_inputs(1, 2, 2, 300, 300, 64, torch.bfloat16, "cuda", logit_std=3e5)
    check_against_reference(q, k, v, "triton")
