"""Triton forward kernel: one program per (block of BLOCK_M query rows, batch x query head).

Each program walks its keys in blocks of BLOCK_N from the diagonal back towards key 0 (the stick
breaks nearest-first), carrying ``used``: the stick spent by the keys already passed, in bits
(everything runs in log2 units: x = z * log2(e), softplus2(x) = log2(1 + 2^x)). For a key block:

    used_nearer[m, n] = sum_{n' > n in block} softplus2(x[m, n'])     (a matmul with a strict
                                                                        triangle of ones)
    A[m, n]  = 2^(x - softplus2(x) - used_nearer - used[m])
    o       += A @ V;    used += rowsum(softplus2(x))

The blocks that straddle the diagonal, and a window of blocks behind them, run masked; then, unless
every row's stick is below 2^-20 (early halting), the rest run unmasked and software-pipelined.

The pieces of this walk that the split-key kernel (decode.py) and the backward (backward.py) share
live here once, as @triton.jit helpers that Triton inlines: a program's start, the key block
loads, the visibility mask and the tile math from logits to weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .layout import triton_interpreting

if triton_interpreting():
    # The CPU interpreter runs no inline PTX (and reads this variable when kernels are defined).
    @triton.jit
    def fast_log2(x):
        return tl.math.log2(x)

    @triton.jit
    def saturating_f16(x):
        return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)

else:

    @triton.jit
    def fast_log2(x):
        """The special-function unit's log2 (absolute error ~2^-22); tl.math.log2 compiles to a
        dozen-instruction polynomial, which would dominate the kernel."""
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )

    @triton.jit
    def saturating_f16(x):
        """float32 -> float16, out-of-range values to +-65504 rather than inf, two per instruction."""
        return tl.inline_asm_elementwise(
            "cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.float16,
            is_pure=True, pack=2,
        )


@triton.jit
def softplus2(x, PRECISE: tl.constexpr):
    """log2(1 + 2^x). The special-function log2 is off by up to ~2^-22 absolute, which for a
    softplus of 2^-14 is a bias of 0.1% that adds up over tens of thousands of keys (a long-range
    head's stick at 64K drifted by 2e-3); below x = -12 the series 2^x / ln 2 is used instead
    (relative error < 2^-13). Float32 inputs, which ask for 1e-4, take the exact log2. Above
    x = 24 the correction to x is below float32 resolution."""
    e = tl.math.exp2(x)
    if PRECISE:
        log_term = tl.math.log2(1.0 + e)
    else:
        log_term = tl.where(x < -12.0, e * 1.4426950408889634, fast_log2(1.0 + e))
    return tl.where(x > 24.0, x, log_term)


@triton.jit
def row_tile_mask(row_valid, offs_d, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """[rows, BLOCK_D] mask of a tile of query rows: the valid rows' head_dim columns."""
    mask = row_valid[:, None]
    if not EVEN_D:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def query_block_setup(Q, pid_m, pid_bh, stride_qb, stride_qh, stride_qt, num_heads, Tq, Tk, group,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    """The start of a program over query block pid_m of row pid_bh = batch x query head (the
    forward, backward passes 1 and 2): (b, h, h_kv, offs_m, offs_n, offs_d, row_valid, query_pos,
    row_mask, q), q [BLOCK_M, BLOCK_D] with zeros outside row_mask."""
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < Tq
    query_pos = Tk - Tq + offs_m
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    row_mask = row_tile_mask(row_valid, offs_d, HEAD_DIM, EVEN_D)
    q = tl.load(q_ptrs, mask=row_mask, other=0.0)
    return b, h, h_kv, offs_m, offs_n, offs_d, row_valid, query_pos, row_mask, q


@triton.jit
def key_head(K, V, KEY_MASK, b, h_kv, stride_kb, stride_kh, stride_vb, stride_vh, stride_mb):
    """K, V and KEY_MASK moved to batch b, key head h_kv."""
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    return K, V, KEY_MASK + b * stride_mb


@triton.jit
def walk_start(offs_n, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(strict_upper_ones, o, used, distance) at the start of a forward walk: the triangle
    strict_upper_ones[n', n] = 1 where n' > n (sp @ it sums each row over the nearer keys) and
    zeros."""
    strict_upper_ones = (offs_n[:, None] > offs_n[None, :]).to(tl.float16)
    o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    used = tl.zeros([BLOCK_M], dtype=tl.float32)
    distance = tl.zeros([BLOCK_M], dtype=tl.float32)
    return strict_upper_ones, o, used, distance


@triton.jit
def diagonal_blocks(pid_m, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    ATTEND_CURRENT: tl.constexpr):
    """(shared_blocks, diag_blocks) of query block pid_m: key blocks [0, shared_blocks) are visible
    to every row of the block; the diag_blocks after them only to some rows (the diagonal)."""
    first_row_pos = Tk - Tq + pid_m * BLOCK_M
    last_row_pos = Tk - Tq + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Tq) - 1
    shared_end = first_row_pos + ATTEND_CURRENT  # keys [0, shared_end) are visible to every row
    diag_end = last_row_pos + ATTEND_CURRENT
    shared_blocks = shared_end // BLOCK_N  # blocks [0, shared_blocks) lie entirely below shared_end
    return shared_blocks, tl.cdiv(diag_end, BLOCK_N) - shared_blocks


@triton.jit
def load_key_block(K, V, key_pos, offs_d, stride_kt, stride_vt, Tk,
                   HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, EVEN_D: tl.constexpr):
    """k and v of the keys key_pos, [BLOCK_N, BLOCK_D] each. Only a DIAGONAL block can reach past
    Tk; its keys there load as zeros."""
    k_ptrs = K + key_pos[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + key_pos[:, None] * stride_vt + offs_d[None, :]
    if DIAGONAL:
        in_range = (key_pos < Tk)[:, None]
        if not EVEN_D:
            in_range = in_range & (offs_d < HEAD_DIM)[None, :]
        kb = tl.load(k_ptrs, mask=in_range, other=0.0)
        vb = tl.load(v_ptrs, mask=in_range, other=0.0)
    elif EVEN_D:
        kb = tl.load(k_ptrs)
        vb = tl.load(v_ptrs)
    else:
        kb = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        vb = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return kb, vb


@triton.jit
def kept_keys(key_mask_ptr, key_pos, stride_mt, Tk, HAS_KEY_MASK: tl.constexpr):
    """[keys] bool: key_pos < Tk and, with a key_mask, not padding."""
    keep = key_pos < Tk
    if HAS_KEY_MASK:
        keep = tl.load(key_mask_ptr + key_pos * stride_mt, mask=keep, other=0) != 0
    return keep


@triton.jit
def visible_tile(key_pos, query_pos, keep, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr):
    """[queries, keys] visibility for tiles that need a mask (DIAGONAL or a key_mask).
    keep: [keys], from kept_keys."""
    if DIAGONAL:
        if ATTEND_CURRENT:
            visible = key_pos[None, :] <= query_pos[:, None]
        else:
            visible = key_pos[None, :] < query_pos[:, None]
        visible = visible & keep[None, :]
    else:
        visible = keep[None, :]
    return visible


@triton.jit
def in_block_nearer_sum(x, ones, DOT_PRECISION: tl.constexpr):
    """x @ ones, ones = strict_upper_ones: sums each row over the nearer keys of the block, in
    float32. 16-bit inputs sum in float16 operands, float32 sums: relative error ~2^-11 of each
    term, far below the 16-bit inputs' own; the clamp keeps saturated logits finite (their A is 0
    anyway)."""
    if DOT_PRECISION == "ieee":
        return tl.dot(x, ones.to(tl.float32), input_precision="ieee")
    return tl.dot(saturating_f16(x), ones)


@triton.jit
def tile_weights(x, sp, visible, used, ones, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """From the logits x (bits) of one [queries, keys] tile and sp = softplus2(x): A, log2(beta)
    and sp, 0 where not visible (the stick each key takes, bits). used: the stick taken by the
    keys nearer than the tile; visible (from visible_tile) applies where MASKED."""
    if MASKED:
        sp = tl.where(visible, sp, 0.0)
    used_nearer = in_block_nearer_sum(sp, ones, DOT_PRECISION)
    log_beta = x - sp
    weights = tl.math.exp2(log_beta - used_nearer - used[:, None])
    if MASKED:
        weights = tl.where(visible, weights, 0.0)
    return weights, log_beta, sp


@triton.jit
def _key_block(
    q, o, used, distance,
    K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
    block_start, query_pos, Tk, qk_scale,
    offs_n, offs_d, strict_upper_ones,
    HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    RETURN_STATS: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Adds one block of keys [block_start, block_start + BLOCK_N) to o, used and distance;
    returns them and the block's weights A [queries, keys] (for span mass in decode.py)."""
    key_pos = block_start + offs_n
    kb, vb = load_key_block(K, V, key_pos, offs_d, stride_kt, stride_vt, Tk,
                            HEAD_DIM, DIAGONAL, EVEN_D)
    x = tl.dot(q, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale
    sp = softplus2(x, DOT_PRECISION == "ieee")
    keep = kept_keys(key_mask_ptr, key_pos, stride_mt, Tk, HAS_KEY_MASK)
    visible = visible_tile(key_pos, query_pos, keep, DIAGONAL, ATTEND_CURRENT)
    weights, _, sp = tile_weights(x, sp, visible, used, strict_upper_ones,
                                  DIAGONAL or HAS_KEY_MASK, DOT_PRECISION)
    o += tl.dot(weights.to(vb.dtype), vb, input_precision=DOT_PRECISION)
    used += tl.sum(sp, 1)
    if RETURN_STATS:
        gap = (query_pos[:, None] - key_pos[None, :]).to(tl.float32)
        distance += tl.sum(weights * gap, 1)
    return o, used, distance, weights


@triton.jit
def stickbreaking_forward_kernel(
    Q, K, V, KEY_MASK, REMAINDER, O, REM, DIST,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_mb, stride_mt,
    num_heads, Tq, Tk, group, qk_scale, halt_bits,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_REMAINDER: tl.constexpr,
    RETURN_STATS: tl.constexpr, EARLY_HALTING: tl.constexpr, HALTING_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Grid (cdiv(Tq, BLOCK_M), B * Hq). Strides are in elements; head_dim is contiguous."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, h_kv, offs_m, offs_n, offs_d, row_valid, query_pos, q_mask, q = query_block_setup(
        Q, pid_m, pid_bh, stride_qb, stride_qh, stride_qt, num_heads, Tq, Tk, group,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, EVEN_D)
    K, V, key_mask_ptr = key_head(K, V, KEY_MASK, b, h_kv, stride_kb, stride_kh, stride_vb,
                                  stride_vh, stride_mb)
    strict_upper_ones, o, used, distance = walk_start(offs_n, BLOCK_M, BLOCK_D)

    shared_blocks, diag_blocks = diagonal_blocks(pid_m, Tq, Tk, BLOCK_M, BLOCK_N, ATTEND_CURRENT)

    # The nearest blocks, masked: the diagonal, and with early halting the HALTING_WINDOW shared
    # blocks behind it, after which a row block whose every row has less than 2^-halt_bits of its
    # stick left stops. A stop test inside the main loop (or a second loop) slowed every later
    # block by 8-15% on H100 and H200; one test here costs nothing measurable.
    near_blocks = diag_blocks
    if EARLY_HALTING:
        near_blocks += tl.minimum(HALTING_WINDOW, shared_blocks)
    for step in range(0, near_blocks):
        o, used, distance, _ = _key_block(
            q, o, used, distance, K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
            (shared_blocks + diag_blocks - 1 - step) * BLOCK_N, query_pos, Tk, qk_scale,
            offs_n, offs_d, strict_upper_ones,
            HEAD_DIM, True, ATTEND_CURRENT, HAS_KEY_MASK, RETURN_STATS, EVEN_D, DOT_PRECISION,
        )
    remaining = shared_blocks + diag_blocks - near_blocks  # blocks [0, remaining) are left
    if EARLY_HALTING:
        least_used = tl.min(tl.where(row_valid, used, float("inf")), 0)
        remaining = tl.where(least_used >= halt_bits, 0, remaining)

    # The rest, unmasked and software-pipelined, towards key 0.
    for step in tl.range(0, remaining, num_stages=NUM_STAGES):
        o, used, distance, _ = _key_block(
            q, o, used, distance, K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
            (remaining - 1 - step) * BLOCK_N, query_pos, Tk, qk_scale, offs_n, offs_d,
            strict_upper_ones,
            HEAD_DIM, False, ATTEND_CURRENT, HAS_KEY_MASK, RETURN_STATS, EVEN_D,
            DOT_PRECISION,
        )

    rem = tl.math.exp2(-used)
    if HAS_REMAINDER:
        r_mask = offs_d < HEAD_DIM
        r = tl.load(REMAINDER + h * HEAD_DIM + offs_d, mask=r_mask, other=0.0).to(tl.float32)
        o += rem[:, None] * r[None, :]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
    row_ptrs = pid_bh * Tq + offs_m
    tl.store(REM + row_ptrs, rem, mask=row_valid)
    if RETURN_STATS:
        tl.store(DIST + row_ptrs, distance, mask=row_valid)
