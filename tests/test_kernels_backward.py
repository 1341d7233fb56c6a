"""Gradients of the triton backend against autograd of the float64 definition.

Without a GPU the kernels run in Triton's CPU interpreter with small blocks (16 x 16), fp16 and
fp32 inputs only (bf16 dots are wrong there); tests/test_kernels_backward_gpu.py covers bf16, real
block sizes and lengths. The loss is sum(o * do) + sum(rem * drem) with random do and drem, so
both outputs carry a gradient.
"""

import pytest
import torch
from test_kernels import long_range_inputs, random_inputs, relative_error

from sb_eval.kernels.attention import stickbreaking_attention

GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def upstream_gradients(q: torch.Tensor, seed: int = 1):
    """Float64 gradients of o ([B, Hq, Tq, D]) and rem ([B, Hq, Tq]), on q's device."""
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    drem = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)
    return do.to(q.device), drem.to(q.device)


def gradients(q, k, v, backend, do, drem, remainder=None, **options):
    """d/d(q, k, v[, remainder]) of sum(o * do) + sum(rem * drem), and (o, rem)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    if remainder is not None:
        leaves.append(remainder.detach().clone().requires_grad_(True))
        options["remainder"] = leaves[-1]
    o, rem = stickbreaking_attention(*leaves[:3], backend=backend, **options)
    ((o.double() * do).sum() + (rem.double() * drem).sum()).backward()
    return [x.grad for x in leaves], (o, rem)


def check_gradients(q, k, v, remainder=None, do_scale=1.0, **options):
    """Triton gradients against the float64 definition's, on the very inputs the kernels got."""
    do, drem = upstream_gradients(q)
    got, (o, rem) = gradients(q, k, v, "triton", do * do_scale, drem * do_scale, remainder, **options)
    options.setdefault("scale", q.shape[-1] ** -0.5)
    expected, _ = gradients(
        q.double(), k.double(), v.double(), "reference", do * do_scale, drem * do_scale,
        None if remainder is None else remainder.double(), **options,
    )
    tol = GRAD_TOLERANCE[q.dtype]
    for name, x, grad, ref in zip(("dq", "dk", "dv", "dremainder"), (q, k, v, remainder), got, expected):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        error = relative_error(grad, ref)
        assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"
    return got, (o, rem)


SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D, dtype, attend_current
    (1, 1, 1, 1, 1, 16, torch.float32, False),     # one position: no key visible, zero gradients
    (1, 1, 1, 2, 2, 16, torch.float16, True),
    (1, 2, 1, 63, 63, 48, torch.float32, False),   # GQA, head_dim padded to 64
    (2, 2, 2, 65, 65, 16, torch.float16, True),
    (1, 4, 2, 40, 130, 16, torch.float32, True),   # queries after a cache, GQA
    (1, 2, 2, 1, 70, 16, torch.float16, False),    # decode (split-key forward)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-{str(s[6])[6:]}-ac{int(s[7])}")
def test_random_inputs_match_reference(shape, kernel_device):
    *dims, dtype, attend_current = shape
    q, k, v = random_inputs(*dims, dtype, kernel_device, seed=sum(dims))
    check_gradients(q, k, v, attend_current=attend_current)


def test_long_range_stick_survives_every_key_block(kernel_device):
    q, k, v = long_range_inputs(1, 2, 1, 130, 130, 16, torch.float16, kernel_device)
    _, (_, rem) = check_gradients(q, k, v)
    assert rem[..., -1].min() > 0.5  # the last query's stick really spans every key range


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_saturated_logits(dtype, kernel_device):
    # logits ~ N(0, 30^2): sigmoids of exactly 0 and 1; most keys lie behind a broken stick
    q, k, v = random_inputs(1, 2, 2, 97, 97, 16, dtype, kernel_device, logit_std=30.0)
    check_gradients(q, k, v, attend_current=True)


def test_remainder_key_mask_and_custom_scale(kernel_device):
    q, k, v = random_inputs(2, 2, 1, 40, 90, 32, torch.float16, kernel_device, seed=3)
    remainder = torch.randn(2, 32, device=kernel_device)
    key_mask = torch.ones(2, 90, dtype=torch.bool, device=kernel_device)
    key_mask[0, :17] = False  # left padding
    key_mask[1, 40:45] = False
    check_gradients(q, k, v, remainder=remainder, key_mask=key_mask, scale=1 / 32, attend_current=True)


@pytest.mark.parametrize("range_pairs", [1, 3])
def test_any_split_of_the_keys_into_ranges_gives_the_same_gradients(range_pairs, kernel_device):
    """Pass 3's key ranges start from pass 1's snapshots; an odd number of ranges leaves an empty
    one. The default under the interpreter is 2 pairs."""
    from sb_eval.kernels.triton_backend import BackwardConfig, KernelConfig, stickbreaking_attention_triton_backward

    q, k, v = random_inputs(1, 2, 1, 70, 100, 16, torch.float32, kernel_device, seed=4)
    do, drem = (x.float() for x in upstream_gradients(q))
    options = dict(scale=0.25, attend_current=True)
    default = stickbreaking_attention_triton_backward(q, k, v, do, drem, **options)
    cfg = BackwardConfig(KernelConfig(16, 16, 1, 1), KernelConfig(16, 16, 1, 1), range_pairs=range_pairs)
    split = stickbreaking_attention_triton_backward(q, k, v, do, drem, config=cfg, **options)
    for name, a, b in zip(("dq", "dk", "dv"), default[:3], split[:3]):
        assert relative_error(a, b) < 1e-6, name


def test_gradient_through_rem_alone(kernel_device):
    """o is unused, so autograd hands the backward no gradient for it."""
    q, k, v = random_inputs(1, 2, 1, 30, 30, 16, torch.float32, kernel_device, seed=6)
    grads = []
    for backend, cast in (("triton", torch.Tensor.float), ("reference", torch.Tensor.double)):
        leaves = [cast(x.detach()).requires_grad_(True) for x in (q, k, v)]
        _, rem = stickbreaking_attention(*leaves, backend=backend, scale=0.25)
        rem.sum().backward()
        grads.append([x.grad for x in leaves])
    (dq, dk, dv), (dq_ref, dk_ref, dv_ref) = grads
    assert relative_error(dq, dq_ref) <= 1e-4 and relative_error(dk, dk_ref) <= 1e-4
    assert dv_ref is None and not dv.any()  # rem does not depend on v


def test_only_the_gradients_asked_for(kernel_device):
    """q alone runs passes 1 and 2, k alone passes 1 and 3 (without snapshots for q alone); the
    gradients are those of the full backward."""
    q, k, v = random_inputs(1, 2, 1, 40, 40, 16, torch.float32, kernel_device, seed=8)
    do, drem = upstream_gradients(q)
    full, _ = gradients(q, k, v, "triton", do, drem)
    for needed in (0, 1):
        leaves = [x.detach().clone().requires_grad_(i == needed) for i, x in enumerate((q, k, v))]
        o, rem = stickbreaking_attention(*leaves, backend="triton")
        ((o.double() * do).sum() + (rem.double() * drem).sum()).backward()
        assert torch.equal(leaves[needed].grad, full[needed])


def test_distance_statistics_are_not_differentiable(kernel_device):
    q, k, v = random_inputs(1, 2, 1, 20, 20, 16, torch.float32, kernel_device)
    q.requires_grad_(True)
    o, rem, distance = stickbreaking_attention(q, k, v, backend="triton", return_stats=True)
    assert o.requires_grad and rem.requires_grad and not distance.requires_grad
