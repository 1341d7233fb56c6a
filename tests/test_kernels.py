"""The attention op against its float64 definition, for the torch and triton backends.

Without a GPU the triton backend runs in Triton's CPU interpreter (fp16 and fp32 only: bf16 dots
are wrong there); with a GPU the same tests run the compiled kernels, bf16 included.
"""

import math

import pytest
import torch

from sb_eval.kernels.attention import stickbreaking_attention
from sb_eval.kernels.layout import HALT_BITS

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "output has NaN or inf"
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(1e-30)).item()


def random_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device, logit_std=1.0, seed=0):
    """q, k, v with logits scale * q.k ~ N(0, logit_std^2) at the default scale 1/sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, D, generator=g) * math.sqrt(logit_std)
    k = torch.randn(B, Hkv, Tk, D, generator=g) * math.sqrt(logit_std)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    return (x.to(dtype=dtype, device=device) for x in (q, k, v))


def long_range_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device, logit=-10.0, seed=0):
    """q and k share a direction with opposite signs: logits near `logit`, so the stick survives
    thousands of keys and no block can be skipped (a head trained for long-range retrieval)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    size = math.sqrt(-logit * math.sqrt(D))
    q = size * u + 0.3 * torch.randn(B, Hq, Tq, D, generator=g)
    k = -size * u + 0.3 * torch.randn(B, Hkv, Tk, D, generator=g)
    v = torch.randn(B, Hkv, Tk, D, generator=g)
    return (x.to(dtype=dtype, device=device) for x in (q, k, v))


def check_against_reference(q, k, v, backend, **options):
    """Runs the op and the float64 definition on the very inputs the op received."""
    out = stickbreaking_attention(q, k, v, backend=backend, return_stats=True, **options)
    extra = {
        name: (value.double() if name == "remainder" else value)
        for name, value in options.items()
    }
    ref = stickbreaking_attention(
        q.double(), k.double(), v.double(), backend="reference", return_stats=True, **extra
    )
    o, rem, distance = out
    assert o.shape == q.shape[:3] + (v.shape[-1],) and o.dtype == q.dtype
    assert rem.shape == q.shape[:3] and rem.dtype == torch.float32
    tol = TOLERANCE[q.dtype]
    assert relative_error(o, ref[0]) <= tol
    # rem lies in [0, 1]; halting may leave up to 2^-20 of it unaccounted for.
    assert (rem.double() - ref[1].double()).abs().max().item() <= max(tol, 2 * 2**-HALT_BITS)
    assert relative_error(distance, ref[2]) <= tol
    return out, ref


def backends_and_dtypes():
    """(backend, dtype) pairs that run on this machine."""
    pairs = [("torch", torch.float32), ("torch", torch.bfloat16), ("torch", torch.float16),
             ("triton", torch.float32), ("triton", torch.float16)]
    if torch.cuda.is_available():
        pairs.append(("triton", torch.bfloat16))
    return [pytest.param(b, d, id=f"{b}-{str(d).removeprefix('torch.')}") for b, d in pairs]


def device_for(backend: str, kernel_device: str) -> str:
    return kernel_device if backend == "triton" else "cpu"


SHAPES = [
    # B, Hq, Hkv, Tq, Tk, D
    (1, 1, 1, 1, 1, 16),
    (2, 2, 2, 2, 2, 32),
    (1, 2, 1, 63, 63, 64),
    (2, 4, 2, 65, 65, 48),
    (1, 2, 2, 1, 200, 32),    # decode
    (2, 6, 2, 3, 130, 32),    # short chunk with a cache, GQA
    (1, 2, 1, 50, 177, 16),   # chunked prefill: more rows than the split-key kernel takes
]


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("attend_current", [False, True])
def test_random_inputs_match_reference(backend, dtype, shape, attend_current, kernel_device):
    q, k, v = random_inputs(*shape, dtype, device_for(backend, kernel_device), seed=hash(shape) % 1000)
    check_against_reference(q, k, v, backend, attend_current=attend_current)


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
def test_long_sequence_odd_length(backend, dtype, kernel_device):
    q, k, v = random_inputs(1, 2, 1, 777, 777, 32, dtype, device_for(backend, kernel_device), seed=7)
    check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
@pytest.mark.parametrize("shape", [(1, 2, 1, 777, 777, 32), (1, 4, 2, 1, 777, 32)], ids=["prefill", "decode"])
def test_long_range_stick_survives_many_blocks(backend, dtype, shape, kernel_device):
    q, k, v = long_range_inputs(*shape, dtype, device_for(backend, kernel_device))
    (_, rem, _), _ = check_against_reference(q, k, v, backend)
    assert rem[..., -1].min() > 0.5  # the last query's stick really spans every key


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
@pytest.mark.parametrize("Tq", [97, 1])
def test_saturated_logits(backend, dtype, Tq, kernel_device):
    # logits ~ N(0, 30^2): sigmoids of exactly 0 and 1, softplus of large arguments
    q, k, v = random_inputs(1, 2, 2, Tq, 97, 32, dtype, device_for(backend, kernel_device), logit_std=30.0)
    check_against_reference(q, k, v, backend, attend_current=True)


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
@pytest.mark.parametrize("Tq", [40, 2])
def test_remainder_key_mask_and_custom_scale(backend, dtype, Tq, kernel_device):
    device = device_for(backend, kernel_device)
    q, k, v = random_inputs(2, 4, 2, Tq, 90, 32, dtype, device, seed=3)
    remainder = torch.randn(4, 32, device=device)
    key_mask = torch.ones(2, 90, dtype=torch.bool, device=device)
    key_mask[0, :17] = False  # left padding
    key_mask[1, 40:45] = False
    check_against_reference(
        q, k, v, backend, remainder=remainder, key_mask=key_mask, scale=1 / 32, attend_current=True
    )


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
def test_padding_keys_leave_the_stick_unchanged(backend, dtype, kernel_device):
    """Left-padded rows give the same outputs as the unpadded sequence."""
    device = device_for(backend, kernel_device)
    q, k, v = random_inputs(1, 2, 2, 30, 30, 32, dtype, device, seed=5)
    pad = 11
    padded = [torch.cat([torch.randn(1, 2, pad, 32, dtype=dtype, device=device) * 5, x], 2) for x in (q, k, v)]
    key_mask = torch.ones(1, 30 + pad, dtype=torch.bool, device=device)
    key_mask[:, :pad] = False
    o, rem, dist = stickbreaking_attention(q, k, v, backend=backend, return_stats=True)
    o_pad, rem_pad, dist_pad = stickbreaking_attention(
        *padded, key_mask=key_mask, backend=backend, return_stats=True
    )
    tol = TOLERANCE[dtype]
    assert relative_error(o_pad[:, :, pad:], o) <= tol
    assert torch.allclose(rem_pad[:, :, pad:], rem, atol=1e-6)
    assert relative_error(dist_pad[:, :, pad:], dist) <= tol


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes())
def test_prefill_then_decode_equals_one_pass(backend, dtype, kernel_device):
    device = device_for(backend, kernel_device)
    q, k, v = random_inputs(2, 4, 2, 70, 70, 32, dtype, device, seed=11)
    full, full_rem = stickbreaking_attention(q, k, v, backend=backend)
    prefix = 61
    pieces = [stickbreaking_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], backend=backend)]
    for t in range(prefix + 1, 71):  # decode one token at a time against the growing cache
        pieces.append(stickbreaking_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], backend=backend))
    o = torch.cat([p[0] for p in pieces], 2)
    rem = torch.cat([p[1] for p in pieces], 2)
    assert relative_error(o, full) <= TOLERANCE[dtype]
    assert torch.allclose(rem, full_rem, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", backends_and_dtypes() + [pytest.param("reference", torch.float64, id="reference")])
def test_num_keys_reads_only_the_first_keys_of_buffers(backend, dtype, kernel_device):
    """A decode step against buffers of which only the first keys are filled (the rest garbage),
    with the count in a tensor, equals the step against the filled part alone, at odd counts and
    GQA, with and without a key mask."""
    device = device_for(backend, kernel_device)
    q, k, v = random_inputs(2, 6, 2, 1, 300, 32, dtype, device, seed=12)
    key_mask = torch.rand(2, 300, generator=torch.Generator().manual_seed(3)) > 0.2
    key_mask = key_mask.to(device)
    for count in (1, 77, 299):
        for mask in (None, key_mask):
            expected = stickbreaking_attention(q, k[:, :, :count], v[:, :, :count], backend=backend,
                                               key_mask=None if mask is None else mask[:, :count])
            got = stickbreaking_attention(q, k, v, backend=backend, key_mask=mask,
                                          num_keys=torch.tensor([count], device=device))
            assert relative_error(got[0], expected[0]) <= TOLERANCE[dtype], count
            assert torch.allclose(got[1], expected[1], atol=1e-6)


def test_triton_clamps_a_key_count_outside_the_buffers(kernel_device):
    """The triton backend cannot check a count it reads on the device: one past the buffers is
    read as all of them, one below the queries as the queries' own positions."""
    q, k, v = random_inputs(1, 2, 2, 3, 40, 16, torch.float32, kernel_device)
    whole = stickbreaking_attention(q, k, v, backend="triton")
    past = stickbreaking_attention(q, k, v, num_keys=torch.tensor([90], device=kernel_device), backend="triton")
    assert torch.equal(past[0], whole[0]) and torch.equal(past[1], whole[1])
    below = stickbreaking_attention(q, k, v, num_keys=torch.tensor([1], device=kernel_device), backend="triton")
    first = stickbreaking_attention(q, k[:, :, :3], v[:, :, :3], backend="triton")
    assert relative_error(below[0], first[0]) <= TOLERANCE[torch.float32]


def test_triton_num_keys_is_for_few_query_rows(kernel_device):
    q, k, v = random_inputs(1, 2, 2, 65, 65, 16, torch.float32, kernel_device)
    with pytest.raises(ValueError, match=r"num_keys is for the split-key kernel, at most 64 query rows x group"):
        stickbreaking_attention(q, k, v, num_keys=torch.tensor([65], device=kernel_device), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("head_dim", [16, 80, 128])
def test_head_dims(backend, head_dim, kernel_device):
    q, k, v = random_inputs(1, 2, 1, 33, 33, head_dim, torch.float16, device_for(backend, kernel_device))
    check_against_reference(q, k, v, backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs(backend, kernel_device):
    device = device_for(backend, kernel_device)
    # [B, T, H, D] storage viewed as [B, H, T, D], plus a strided head_dim
    q = torch.randn(2, 45, 4, 32, device=device).transpose(1, 2)
    k = torch.randn(2, 45, 2, 32, device=device).transpose(1, 2)
    v = torch.randn(2, 45, 2, 64, device=device)[..., ::2].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v, backend)


def test_torch_backend_float64_is_exact():
    q, k, v = random_inputs(1, 2, 1, 40, 40, 16, torch.float64, "cpu")
    check_against_reference(q, k, v, "torch")


def test_early_halting_drops_at_most_its_threshold(kernel_device):
    from sb_eval.kernels.triton_backend import stickbreaking_attention_triton

    q, k, v = random_inputs(1, 2, 2, 300, 300, 32, torch.float32, kernel_device, logit_std=4.0)
    options = dict(scale=32**-0.5, return_stats=True)
    halted = stickbreaking_attention_triton(q, k, v, **options)
    exact = stickbreaking_attention_triton(q, k, v, early_halting=False, **options)
    bound = 2**-HALT_BITS * v.abs().max().item()
    assert (halted[0] - exact[0]).abs().max().item() <= bound + 1e-6
    assert (halted[1] - exact[1]).abs().max().item() <= 2**-HALT_BITS


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_and_inf_inputs_finish(backend, kernel_device):
    device = device_for(backend, kernel_device)
    q, k, v = random_inputs(1, 2, 2, 50, 50, 16, torch.float32, device)
    q[0, 0, 10] = float("nan")
    k[0, 1, 20] = float("inf")
    o, rem = stickbreaking_attention(q, k, v, backend=backend)
    assert o.shape == q.shape and rem.shape == q.shape[:3]
    assert torch.isnan(o[0, 0, 10]).all()


def test_torch_backend_is_differentiable():
    q, k, v = random_inputs(1, 2, 1, 20, 20, 16, torch.float64, "cpu")
    for x in (q, k, v):
        x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: stickbreaking_attention(q, k, v, backend="torch")[0], (q, k, v)
    )


def test_empty_query():
    q = torch.randn(1, 2, 0, 16)
    k = v = torch.randn(1, 2, 5, 16)
    o, rem = stickbreaking_attention(q, k, v)
    assert o.shape == (1, 2, 0, 16) and rem.shape == (1, 2, 0)


BAD_INPUTS = [
    (dict(q=torch.randn(2, 4, 8)), "q must be a 4-D tensor"),
    (dict(v=torch.randn(1, 2, 9, 16)), "k and v must have the same shape"),
    (dict(k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16)), "same batch size"),
    (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), "same head_dim"),
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of k's heads"),
    (dict(q=torch.randn(1, 4, 9, 16)), "q cannot be longer than k"),
    (dict(q=torch.randn(1, 4, 8, 16).to(torch.int32)), "dtype"),
    (dict(q=torch.randn(1, 4, 8, 16).half()), "share a dtype"),
    (dict(remainder=torch.randn(2, 16)), "remainder must have shape"),
    (dict(key_mask=torch.ones(1, 7, dtype=torch.bool)), "key_mask must have shape"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(num_keys=8), "num_keys must be an integer tensor of one element"),
    (dict(num_keys=torch.tensor([8.0])), "num_keys must be an integer tensor of one element"),
    (dict(num_keys=torch.tensor([8, 8])), "num_keys must be an integer tensor of one element"),
    (dict(num_keys=torch.tensor([9])), r"num_keys must be from Tq=8 .* to Tk=8"),
    (dict(num_keys=torch.tensor([7])), r"num_keys must be from Tq=8 .* to Tk=8"),
]


@pytest.mark.parametrize("change,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_name_the_argument(change, message):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16))
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(ValueError, match=message):
        stickbreaking_attention(q, k, v, **args)


def test_triton_backend_rejects_bad_head_dim(kernel_device):
    q = torch.randn(1, 2, 8, 24, device=kernel_device)
    with pytest.raises(ValueError, match="head_dim a multiple of 16"):
        stickbreaking_attention(q, q, q, backend="triton")


def test_triton_backend_gradients_match_torch_backend(kernel_device):
    """tests/test_kernels_backward.py checks the triton backward against the float64 definition."""
    q, k, v = random_inputs(1, 2, 1, 20, 20, 16, torch.float32, kernel_device)
    grads = []
    for backend, device in (("triton", kernel_device), ("torch", "cpu")):
        leaves = [x.detach().to(device).requires_grad_(True) for x in (q, k, v)]
        o, rem = stickbreaking_attention(*leaves, backend=backend)
        (o.sum() + rem.sum()).backward()
        grads.append([x.grad.cpu() for x in leaves])
    for got, expected in zip(*grads):
        assert relative_error(got, expected) <= 1e-4
