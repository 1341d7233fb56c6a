"""Triton split-key kernels for few queries against many keys: decode and short chunked prefill.

With Tq * group small, one program per query block would leave most of the GPU idle while it walks
a long cache. Instead the keys are cut into splits processed in parallel; each split runs the
stick-breaking recurrence as if its nearest key were the first one, giving a partial output o_s
(weights relative to a fresh stick), the stick it used (``used_s``, in bits) and a partial
distance. The splits combine nearest-first, like a scan:

    o = sum_s 2^(-sum_{s' > s} used_s') * o_s,       rem = 2^(-sum_s used_s)

The distance and the span mass (the weights summed over each span of keys, KEY_SPANS giving each
key's span) combine as o does. All query heads of one key head are processed by the same program,
so K and V are read once.

With HAS_NUM_KEYS the count of keys is read from device memory (NUM_KEYS) instead of taken as an
argument: K and V are then buffers of Tk slots of which the first NUM_KEYS hold keys, and the
same launch serves every step of a decode loop, as a CUDA graph needs. Splits past the last key
write an empty part (o = 0, used = 0), which leaves the combination unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import _key_block, key_head, row_tile_mask, walk_start


@triton.jit
def add_span_mass(span_mass, weights, key_spans_ptr, key_pos, Tk, offs_span, NUM_SPANS: tl.constexpr):
    """span_mass [queries, BLOCK_SPANS] plus, for each span s, the weights [queries, keys] of the keys
    whose index in key_spans_ptr (one int32 per key) is s: a float32 row sum per span."""
    spans = tl.load(key_spans_ptr + key_pos, mask=key_pos < Tk, other=-1)
    for s in tl.static_range(NUM_SPANS):
        in_span = tl.sum(tl.where((spans == s)[None, :], weights, 0.0), 1)
        span_mass += tl.where((offs_span == s)[None, :], in_span[:, None], 0.0)
    return span_mass


@triton.jit
def stickbreaking_split_kernel(
    Q, K, V, KEY_MASK, KEY_SPANS, NUM_KEYS, O_PART, USED_PART, DIST_PART, SPAN_PART,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_mb, stride_mt, stride_sb,
    num_kv_heads, Tq, Tk, group, qk_scale, split_len, num_splits,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, RETURN_STATS: tl.constexpr,
    HAS_NUM_KEYS: tl.constexpr, NUM_SPANS: tl.constexpr, BLOCK_SPANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (num_splits, B * Hkv). Row m of a program is query t = m % Tq of head group m // Tq.
    With HAS_NUM_KEYS, Tk is the buffers' length and NUM_KEYS (one int32) the count of keys.

    Writes O_PART [B*Hq*Tq, num_splits, D] fp32, USED_PART and DIST_PART [B*Hq*Tq, num_splits],
    and with NUM_SPANS > 0 SPAN_PART [B*Hq*Tq, num_splits, NUM_SPANS] from KEY_SPANS [B, Tk]
    int32 (batch stride stride_sb, key stride 1).
    """
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    if HAS_NUM_KEYS:
        # Clamped so that a wrong count cannot read outside the buffers or put a query before key 0.
        Tk = tl.minimum(tl.maximum(tl.load(NUM_KEYS), Tq), Tk)
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < group * Tq
    t = offs_m % Tq
    h = h_kv * group + offs_m // Tq
    query_pos = Tk - Tq + t

    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :]
    q_mask = row_tile_mask(row_valid, offs_d, HEAD_DIM, EVEN_D)
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    K, V, key_mask_ptr = key_head(K, V, KEY_MASK, b, h_kv, stride_kb, stride_kh, stride_vb,
                                  stride_vh, stride_mb)
    strict_upper_ones, o, used, distance = walk_start(offs_n, BLOCK_M, BLOCK_D)
    offs_span = tl.arange(0, BLOCK_SPANS)
    span_mass = tl.zeros([BLOCK_M, BLOCK_SPANS], dtype=tl.float32)
    key_spans_ptr = KEY_SPANS + b * stride_sb

    split_start = pid_s * split_len
    num_blocks = tl.cdiv(tl.minimum(split_len, Tk - split_start), BLOCK_N)
    for step in tl.range(0, num_blocks, num_stages=NUM_STAGES):
        block_start = split_start + (num_blocks - 1 - step) * BLOCK_N
        o, used, distance, weights = _key_block(
            q, o, used, distance, K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
            block_start, query_pos, Tk, qk_scale,
            offs_n, offs_d, strict_upper_ones,
            HEAD_DIM, True, ATTEND_CURRENT, HAS_KEY_MASK, RETURN_STATS, EVEN_D, DOT_PRECISION,
        )
        if NUM_SPANS > 0:
            span_mass = add_span_mass(span_mass, weights, key_spans_ptr, block_start + offs_n, Tk, offs_span, NUM_SPANS)

    row = (b * num_kv_heads * group + h) * Tq + t  # row of [B, Hq, Tq]
    part = row * num_splits + pid_s
    o_ptrs = O_PART + part[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, o, mask=q_mask)
    tl.store(USED_PART + part, used, mask=row_valid)
    if RETURN_STATS:
        tl.store(DIST_PART + part, distance, mask=row_valid)
    if NUM_SPANS > 0:
        span_ptrs = SPAN_PART + part[:, None] * NUM_SPANS + offs_span[None, :]
        tl.store(span_ptrs, span_mass, mask=row_valid[:, None] & (offs_span < NUM_SPANS)[None, :])


@triton.jit
def stickbreaking_combine_kernel(
    O_PART, USED_PART, DIST_PART, SPAN_PART, REMAINDER, O, REM, DIST, SPAN_MASS,
    stride_ob, stride_oh, stride_ot,
    num_heads, Tq, num_splits,
    HAS_REMAINDER: tl.constexpr, RETURN_STATS: tl.constexpr, NUM_SPANS: tl.constexpr,
    BLOCK_SPANS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Grid (B * Hq * Tq,): combines one query row's splits (BLOCK_S of them at most), nearest
    (last) split first; SPAN_MASS [B*Hq*Tq, NUM_SPANS]."""
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_valid = offs_s < num_splits
    d_valid = offs_d < HEAD_DIM

    used = tl.load(USED_PART + row * num_splits + offs_s, mask=split_valid, other=0.0)
    used_by_nearer = tl.cumsum(used, 0, reverse=True) - used
    weight = tl.where(split_valid, tl.math.exp2(-used_by_nearer), 0.0)
    parts = tl.load(
        O_PART + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=split_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    o = tl.sum(weight[:, None] * parts, 0)
    rem = tl.math.exp2(-tl.sum(used, 0))

    b = row // (num_heads * Tq)
    h = (row // Tq) % num_heads
    t = row % Tq
    if HAS_REMAINDER:
        r = tl.load(REMAINDER + h * HEAD_DIM + offs_d, mask=d_valid, other=0.0).to(tl.float32)
        o += rem * r
    o_ptrs = O + b * stride_ob + h * stride_oh + t * stride_ot + offs_d
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=d_valid)
    tl.store(REM + row, rem)
    if RETURN_STATS:
        dist = tl.load(DIST_PART + row * num_splits + offs_s, mask=split_valid, other=0.0)
        tl.store(DIST + row, tl.sum(weight * dist, 0))
    if NUM_SPANS > 0:
        offs_span = tl.arange(0, BLOCK_SPANS)
        span_valid = offs_span < NUM_SPANS
        span_parts = tl.load(
            SPAN_PART + (row * num_splits + offs_s)[:, None] * NUM_SPANS + offs_span[None, :],
            mask=split_valid[:, None] & span_valid[None, :],
            other=0.0,
        )
        tl.store(SPAN_MASS + row * NUM_SPANS + offs_span, tl.sum(weight[:, None] * span_parts, 0), mask=span_valid)
