"""Span mass in the attention op (the weights summed over spans of keys) against explicit float64
matrices, for every backend: reference, torch (chunked) and triton (the split-key kernels, in
Triton's CPU interpreter without a GPU)."""

import pytest
import torch
from test_attention_stats import stick_breaking_matrix
from test_kernels import device_for, long_range_inputs, random_inputs

from sb_eval.kernels.attention import MAX_SPANS, stickbreaking_attention
from sb_eval.kernels.layout import HALT_BITS

# span_mass is float32 whatever the inputs: float64 inputs are exact to float32 rounding
TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3}
CASES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend, dtype in [("reference", torch.float64), ("torch", torch.float64), ("torch", torch.float32),
                           ("torch", torch.float16), ("triton", torch.float32), ("triton", torch.float16)]
]


def visibility(Tq, Tk, attend_current, key_mask):
    """[B|1, 1, Tq, Tk] bool: which keys each query row sees."""
    j = torch.arange(Tk - Tq, Tk)[:, None]
    i = torch.arange(Tk)[None, :]
    visible = ((i <= j) if attend_current else (i < j))[None, None]
    return visible if key_mask is None else visible & key_mask[:, None, None, :]


def explicit_span_mass(q, k, scale, visible, key_spans, num_spans):
    """sum over the keys of span s of A_ij, from the full float64 matrix: [B, Hq, Tq, num_spans]."""
    A = stick_breaking_matrix(q, k, scale, visible)
    return torch.stack([(A * (key_spans == s)[:, None, None, :]).sum(-1) for s in range(num_spans)], dim=-1)


def random_spans(B, Tk, num_spans, seed):
    """Runs of keys with random span indices (spans need not be contiguous: an index may recur)."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, num_spans, (B, Tk // 5 + 1), generator=g)
    return cuts.repeat_interleave(5, dim=1)[:, :Tk].contiguous()


@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize(
    "Hq, Hkv, Tq, Tk, attend_current, padded",
    [
        (2, 2, 1, 1, False, False),  # the first position: it sees no key, all of its stick remains
        (3, 3, 1, 67, False, False),  # one query against a cache of odd length
        (4, 2, 1, 131, True, True),  # grouped-query heads, attend_current, left padding
        (6, 2, 5, 94, False, True),  # the last rows of a prefill, 15 rows of a key head's program
        (1, 1, 3, 3, True, False),  # every key is a diagonal key
    ],
)
def test_span_mass_matches_the_matrix(backend, dtype, Hq, Hkv, Tq, Tk, attend_current, padded, kernel_device):
    device = device_for(backend, kernel_device)
    B, D, num_spans = 2, 16, 4
    q, k, v = random_inputs(B, Hq, Hkv, Tq, Tk, D, dtype, device, logit_std=2.0, seed=Tk)
    key_mask = None
    if padded:
        key_mask = torch.ones(B, Tk, dtype=torch.bool, device=device)
        key_mask[1, : Tk // 3] = False
    key_spans = random_spans(B, Tk, num_spans, seed=Tq).to(device)
    o, rem, span_mass = stickbreaking_attention(
        q, k, v, scale=0.3, attend_current=attend_current, key_mask=key_mask,
        key_spans=key_spans, num_spans=num_spans, backend=backend,
    )
    assert span_mass.shape == (B, Hq, Tq, num_spans) and span_mass.dtype == torch.float32
    visible = visibility(Tq, Tk, attend_current, None if key_mask is None else key_mask.cpu())
    expected = explicit_span_mass(q.cpu(), k.cpu(), 0.3, visible, key_spans.cpu(), num_spans)
    tolerance = TOLERANCE[dtype]
    assert (span_mass.cpu().double() - expected).abs().max().item() <= tolerance
    # every key has a span: the spans and the remainder share the whole stick
    assert (span_mass.sum(-1) + rem - 1).abs().max().item() <= max(tolerance, 1e-6)
    # the op's other outputs do not depend on whether span mass is asked for
    plain = stickbreaking_attention(q, k, v, scale=0.3, attend_current=attend_current, key_mask=key_mask, backend=backend)
    assert torch.equal(plain[0], o) and torch.equal(plain[1], rem)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_span_mass_survives_many_key_blocks_and_splits(backend, kernel_device):
    """A long-range stick over 1500 keys (many chunks, many splits), and early halting in the
    torch backend: the mass is exact up to the halting threshold."""
    device = device_for(backend, kernel_device)
    q, k, v = long_range_inputs(1, 2, 1, 1, 1500, 32, torch.float32, device, logit=-6.0)
    key_spans = torch.zeros(1, 1500, dtype=torch.long)
    key_spans[0, 100:130] = 1  # a needle far back
    key_spans[0, 1400:] = 2  # the recent keys
    key_spans[0, 700:710] = 7  # not a span: counted nowhere
    _, rem, span_mass = stickbreaking_attention(q, k, v, key_spans=key_spans.to(device), num_spans=3, backend=backend)
    expected = explicit_span_mass(q.cpu(), k.cpu(), 32**-0.5, visibility(1, 1500, False, None), key_spans, 3)
    assert (span_mass.cpu().double() - expected).abs().max().item() <= 1e-5 + 2**-HALT_BITS
    assert expected[..., 1].min().item() > 1e-4  # the far needle does take part of the stick
    outside = 1 - rem.double().cpu() - span_mass.double().cpu().sum(-1)
    assert outside.min().item() > 0  # the keys of index 7 took the rest


def test_torch_backend_gives_span_mass_for_every_row_of_a_prefill():
    q, k, v = random_inputs(1, 2, 2, 300, 300, 16, torch.float32, "cpu", logit_std=3.0)
    key_spans = random_spans(1, 300, 3, seed=4)
    _, _, span_mass = stickbreaking_attention(q, k, v, key_spans=key_spans, num_spans=3, backend="torch")
    expected = explicit_span_mass(q, k, 16**-0.5, visibility(300, 300, False, None), key_spans, 3)
    assert (span_mass.double() - expected).abs().max().item() <= 1e-5


def test_span_mass_of_a_prefill_row_equals_decoding_it(kernel_device):
    """The last row of a prefill, asked alone against the same keys, is that row of the prefill."""
    q, k, v = random_inputs(1, 4, 2, 40, 40, 16, torch.float32, kernel_device, logit_std=2.0)
    key_spans = random_spans(1, 40, 3, seed=5).to(kernel_device)
    whole = stickbreaking_attention(q.cpu(), k.cpu(), v.cpu(), key_spans=key_spans.cpu(), num_spans=3, backend="torch")
    last = stickbreaking_attention(q[:, :, -1:], k, v, key_spans=key_spans, num_spans=3, backend="triton")
    assert torch.allclose(last[2].cpu(), whole[2][:, :, -1:], atol=1e-6)
    assert torch.allclose(last[1].cpu(), whole[1][:, :, -1:], atol=1e-6)


def test_triton_span_mass_with_gradients_enabled(kernel_device):
    q, k, v = random_inputs(1, 2, 2, 1, 50, 16, torch.float32, kernel_device)
    q.requires_grad_(True)
    key_spans = torch.zeros(1, 50, dtype=torch.int32, device=kernel_device)
    o, rem, span_mass = stickbreaking_attention(q, k, v, key_spans=key_spans, num_spans=1, backend="triton")
    assert not span_mass.requires_grad and o.requires_grad
    assert torch.allclose(span_mass[..., 0] + rem, torch.ones_like(rem), atol=1e-6)


def test_triton_span_mass_asks_for_few_rows(kernel_device):
    q, k, v = random_inputs(1, 2, 2, 65, 65, 16, torch.float32, kernel_device)
    key_spans = torch.zeros(1, 65, dtype=torch.long, device=kernel_device)
    with pytest.raises(ValueError, match=r"at most 64 query rows x group.*q\[:, :, -1:\]"):
        stickbreaking_attention(q, k, v, key_spans=key_spans, num_spans=1, backend="triton")


@pytest.mark.parametrize(
    "spans, num_spans, message",
    [
        (torch.zeros(2, 9, dtype=torch.long), None, "key_spans and num_spans go together"),
        (None, 2, "key_spans and num_spans go together"),
        (torch.zeros(2, 9), 2, "must be an integer tensor"),
        (torch.zeros(2, 9, dtype=torch.bool), 2, "must be an integer tensor"),
        (torch.zeros(1, 9, dtype=torch.long), 2, r"shape \[batch, Tk\] = \(2, 9\)"),
        (torch.zeros(2, 9, dtype=torch.long), 0, f"from 1 to {MAX_SPANS}"),
        (torch.zeros(2, 9, dtype=torch.long), MAX_SPANS + 1, f"from 1 to {MAX_SPANS}"),
        (torch.zeros(2, 9, dtype=torch.long), 2.0, f"from 1 to {MAX_SPANS}"),
    ],
)
def test_bad_span_arguments_name_the_argument(spans, num_spans, message):
    q, k, v = random_inputs(2, 2, 2, 1, 9, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=message):
        stickbreaking_attention(q, k, v, key_spans=spans, num_spans=num_spans, backend="torch")


def test_empty_query_gives_empty_span_mass():
    q, k, v = random_inputs(1, 2, 2, 0, 5, 16, torch.float32, "cpu")
    _, _, span_mass = stickbreaking_attention(q, k, v, key_spans=torch.zeros(1, 5, dtype=torch.long), num_spans=3, backend="torch")
    assert span_mass.shape == (1, 2, 0, 3)
