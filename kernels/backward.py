"""Triton backward kernels: deterministic, no atomics or locks, O(T) extra memory.

The gradient, for query j, key i, z_ij = scale q_j . k_i, beta = sigmoid(z),
A_ij = beta_ij prod_{i<k<j} (1 - beta_kj) = beta_ij W_ij (W: the stick left when key i is reached),
upstream gradients do_j and drem_j, and a remainder r folded in as drem_j += do_j . r:

    g_ij  = do_j . v_i - drem_j          a_ij = A_ij g_ij
    S_ij  = sum_{m <= i} a_mj            (key i and every key farther back)
    dz_ij = a_ij - beta_ij S_ij
    dq_j  = scale sum_i dz_ij k_i        dk_i = scale sum_j dz_ij q_j        dv_i = sum_j A_ij do_j

Two directions meet here. A_ij needs the stick used by the keys *nearer* than i, a running sum from
the diagonal back; taking it as the total (log rem) minus a running sum from key 0, as a walk from
key 0 would, cancels catastrophically: with saturated logits the total is ~10^6 bits and float32
keeps a quarter of a bit of it. S_ij is a sum over the keys *farther* than i. Walking
nearest-first, S_ij = total_j - sum_{m > i} a_mj, and the total must be consistent with the a
values of the walk itself: taken from the forward's bfloat16 o (do . o - drem (1 - rem), as flash
attention takes its delta), its rounding error is multiplied by beta ~ 1 at every key behind the
one that broke the stick. In a float64 simulation at T = 2048 that put 12% (logits ~ N(0, 1)) to
100% (saturated logits) of error into dq; with the total summed from the same float32 a values,
2e-6 to 2e-5. Hence three kernels, all walking keys nearest-first:

1. ``stickbreaking_backward_totals_kernel``, one program per query block as in the forward: for
   each query, total_j = sum_i a_ij from the backward's own a, drem_j with the remainder folded in,
   a bound G_j >= |g_ij| (see Precision) and d(remainder) partial sums; and at every key-range
   boundary k (see 3) a snapshot of the query's state there: the stick taken by the keys >= k
   (bits) and sum_{m >= k} a_mj.
2. ``stickbreaking_backward_dq_kernel``: the same walk again, now with dz and dq.
3. ``stickbreaking_backward_dkv_kernel``: dk and dv of a key block need, for every later query,
   that query's state at the block: per query, not local to any tile. The keys are cut into
   ranges; one program owns a range (and every query head of its key head, so GQA needs no
   reduction) and walks its key blocks nearest-first. For each key block it loops over all later
   query blocks with dk and dv in registers, reading each query's state (the range's snapshot at
   first), moving it past the block and writing it back: a read-modify-write of two floats per
   query, separated from the next key block by a barrier. Each dk/dv row is written once, by its
   owner: no atomics, no partial copies, the same bits every run. Ranges are of equal length and
   a program takes ranges p and R-1-p, so that all do the same work (far ranges see more queries)
   and R/2 programs per key head fill the GPU in one wave.

Alternatives: fla-core 0.6.0 snapshots the state at every (query, key block of 64), O(T^2 / 64)
memory (two float32 [T, H, T/64] arrays: 8 GiB at 64K x 16 heads); the official kernel adds dk/dv partials under a spin lock, which
hangs on Hopper; a launch per key block carrying the state from key 0 has the cancellation above
and hundreds of launches. The backward has no early halting yet: it walks every key even where the
forward stopped (short-range heads, where passes 1 and 2 could stop as the forward does).

All three passes use the forward's tiles, queries as rows and keys as columns, and one piece of
tile math. Pass 3 accumulates dk^T and dv^T, [head_dim, BLOCK_N]: 2 BLOCK_N D / threads registers
per thread. With keys as rows, dk and dv would cost D registers per thread whatever the block
(Triton's wgmma layouts split rows over warp groups) and the triangle of ones would be a register
operand; that spilled at every block size tried.

Extra memory, float32: drem, total and G per query row, [B, Hq, Tq], and two snapshots per row
and key range, [B, Hq, R, Tq]: (2R + 3) floats per row, linear in T. On a 132-SM card with 16 key
heads R = 16: 140 bytes per row, 150 MiB at 64K tokens x 16 heads (q takes 256 bytes per row at
head_dim 128).

Precision: dz_ij = beta_ij (W_ij g_ij - S_ij) and |S_ij| <= (W_ij - rem_j) max|g|, so
|beta_ij S_ij| <= A_ij G_j; clamping beta S to that bound makes any error of the running sums vanish
with A behind a broken stick (the error summed over keys grows with log(G / error), not with T; in
the simulation above it took dq's error from 2e-6 - 2e-5 to 2e-7 - 3e-7). The in-block sums over
nearer keys run as matmuls with a triangle of ones, as in the forward: softplus in saturating
float16 (an absolute error, which is what the exponent needs), a as a_ij / G_j in float16 (a scales
with the upstream gradient; divided by G it lies in [-A, A]). dz goes to the tensor cores in the
inputs' dtype, as flash attention's dS does: with float16 inputs, upstream gradients far below
1e-3 lose precision there (train with loss scaling, or in bfloat16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .forward import (
    diagonal_blocks,
    in_block_nearer_sum,
    kept_keys,
    key_head,
    load_key_block,
    query_block_setup,
    row_tile_mask,
    softplus2,
    tile_weights,
    visible_tile,
)


@triton.jit
def _tile_gradient(q, do, kb, vb, used, drem, visible, qk_scale, ones,
                   MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One tile of query rows q, do against keys kb, vb: A, log2(beta), a = A (do . v - drem) and
    per row the stick the tile's keys take (bits). used: stick taken by the keys nearer than the
    tile."""
    x = tl.dot(q, tl.trans(kb), input_precision=DOT_PRECISION) * qk_scale
    dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PRECISION)
    weights, log_beta, sp = tile_weights(x, softplus2(x, DOT_PRECISION == "ieee"), visible, used,
                                         ones, MASKED, DOT_PRECISION)
    return weights, log_beta, weights * (dp - drem[:, None]), tl.sum(sp, 1)


@triton.jit
def _logit_gradient(a, weights, log_beta, a_farther, bound, visible, ones,
                    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dz = a - beta S with S_ij = sum_{m <= i} a_mj = a_farther - (a over the tile's keys nearer
    than i), a_farther = sum of a over this tile's keys and the farther ones, beta S clamped to
    +-A G. 16-bit inputs sum a / G (|a / G| <= A) in float16, so that neither large nor tiny
    upstream gradients leave float16's range."""
    if DOT_PRECISION == "ieee":
        a_nearer = in_block_nearer_sum(a, ones, DOT_PRECISION)
    else:
        inverse = 1.0 / tl.maximum(bound, 1e-30)  # G = 0 only where a = 0
        a_nearer = tl.dot((a * inverse[:, None]).to(tl.float16), ones) * bound[:, None]
    beta = tl.math.exp2(log_beta)
    if MASKED:
        beta = tl.where(visible, beta, 0.0)
    farther = a_farther[:, None] - a_nearer
    limit = weights * bound[:, None]
    return a - tl.minimum(tl.maximum(beta * farther, -limit), limit)


@triton.jit
def _query_major_block(
    q, do, drem, bound, used, a_sum, a_total, dq,
    K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
    block_start, query_pos, Tk, qk_scale,
    offs_n, offs_d, strict_upper_ones,
    HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
):
    """Passes 1 and 2: one block of BLOCK_N keys for the program's BLOCK_M query rows.

    used: stick taken by the keys already passed (bits); a_sum: sum of a over them. With COMPUTE_DQ,
    a_total is sum_i a_ij over all keys and dq gains dz @ k (in units of 1 / scale).
    """
    key_pos = block_start + offs_n
    kb, vb = load_key_block(K, V, key_pos, offs_d, stride_kt, stride_vt, Tk,
                            HEAD_DIM, DIAGONAL, EVEN_D)
    keep = kept_keys(key_mask_ptr, key_pos, stride_mt, Tk, HAS_KEY_MASK)
    MASKED: tl.constexpr = DIAGONAL or HAS_KEY_MASK
    visible = visible_tile(key_pos, query_pos, keep, DIAGONAL, ATTEND_CURRENT)
    weights, log_beta, a, used_here = _tile_gradient(
        q, do, kb, vb, used, drem, visible, qk_scale, strict_upper_ones, MASKED, DOT_PRECISION)
    if COMPUTE_DQ:
        dz = _logit_gradient(a, weights, log_beta, a_total - a_sum, bound, visible,
                             strict_upper_ones, MASKED, DOT_PRECISION)
        dq += tl.dot(dz.to(kb.dtype), kb, input_precision=DOT_PRECISION)
    return used + used_here, a_sum + tl.sum(a, 1), dq


@triton.jit
def _query_major_blocks(
    q, do, drem, bound, used, a_sum, a_total, dq,
    K, V, key_mask_ptr, USED_SNAP, A_SNAP, stride_kt, stride_vt, stride_mt,
    end_block, num_blocks, query_pos, Tk, Tq, qk_scale, snap_ptrs, row_valid, range_len,
    offs_n, offs_d, strict_upper_ones,
    HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    COMPUTE_DQ: tl.constexpr, BLOCK_N: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """Passes 1 and 2: the num_blocks key blocks before block end_block, nearest-first. Pass 1
    (not COMPUTE_DQ) stores the rows' state at every key-range boundary it passes. LOOP_STAGES:
    the loop's software-pipelining depth (None: the compiler's default)."""
    for step in tl.range(0, num_blocks, num_stages=LOOP_STAGES):
        block_start = (end_block - 1 - step) * BLOCK_N
        used, a_sum, dq = _query_major_block(
            q, do, drem, bound, used, a_sum, a_total, dq,
            K, V, key_mask_ptr, stride_kt, stride_vt, stride_mt,
            block_start, query_pos, Tk, qk_scale, offs_n, offs_d, strict_upper_ones,
            HEAD_DIM, DIAGONAL, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION, COMPUTE_DQ,
        )
        if not COMPUTE_DQ:
            at_boundary = (block_start % range_len == 0) & (block_start > 0)
            snap = snap_ptrs + (block_start // range_len - 1) * Tq
            tl.store(USED_SNAP + snap, used, mask=row_valid & at_boundary)
            tl.store(A_SNAP + snap, a_sum, mask=row_valid & at_boundary)
    return used, a_sum, dq


@triton.jit
def _query_major_pass(
    Q, K, V, DO, KEY_MASK, DREM_IN, REMAINDER, VALUE_BOUND,
    DREM, TOTAL, BOUND, USED_SNAP, A_SNAP, DR_PART, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_mb, stride_mt,
    num_heads, Tq, Tk, group, qk_scale, scale, range_len, num_ranges,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_REMAINDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
):
    """One program of pass 1 (not COMPUTE_DQ) or pass 2 (COMPUTE_DQ): both walk the same keys in
    the same blocks, so pass 2 sees the a values pass 1 summed. The kernels below say what each
    reads and writes; a pass ignores the other's arguments."""
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, h_kv, offs_m, offs_n, offs_d, row_valid, query_pos, row_mask, q = query_block_setup(
        Q, pid_m, pid_bh, stride_qb, stride_qh, stride_qt, num_heads, Tq, Tk, group,
        BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, EVEN_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_mask, other=0.0)
    rows = pid_bh * Tq + offs_m
    if COMPUTE_DQ:
        drem = tl.load(DREM + rows, mask=row_valid, other=0.0)
        a_total = tl.load(TOTAL + rows, mask=row_valid, other=0.0)
        bound = tl.load(BOUND + rows, mask=row_valid, other=0.0)
    else:
        drem = tl.load(DREM_IN + rows, mask=row_valid, other=0.0)
        if HAS_REMAINDER:
            r = tl.load(REMAINDER + h * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)
            drem += tl.sum(do.to(tl.float32) * r[None, :], 1)
        do_norm = tl.sqrt(tl.sum(do.to(tl.float32) * do.to(tl.float32), 1))
        bound = do_norm * tl.load(VALUE_BOUND + b * (num_heads // group) + h_kv) + tl.abs(drem)
    K, V, key_mask_ptr = key_head(K, V, KEY_MASK, b, h_kv, stride_kb, stride_kh, stride_vb,
                                  stride_vh, stride_mb)
    snap_ptrs = pid_bh * num_ranges * Tq + offs_m

    strict_upper_ones = (offs_n[:, None] > offs_n[None, :]).to(tl.float16)
    used = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if COMPUTE_DQ:
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    else:
        a_total = a_sum  # not read without COMPUTE_DQ
        dq = tl.zeros([1, 1], dtype=tl.float32)

    shared_blocks, diag_blocks = diagonal_blocks(pid_m, Tq, Tk, BLOCK_M, BLOCK_N, ATTEND_CURRENT)
    used, a_sum, dq = _query_major_blocks(
        q, do, drem, bound, used, a_sum, a_total, dq,
        K, V, key_mask_ptr, USED_SNAP, A_SNAP, stride_kt, stride_vt, stride_mt,
        shared_blocks + diag_blocks, diag_blocks, query_pos, Tk, Tq, qk_scale, snap_ptrs,
        row_valid, range_len, offs_n, offs_d, strict_upper_ones,
        HEAD_DIM, True, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION, COMPUTE_DQ,
        BLOCK_N, None,
    )
    used, a_sum, dq = _query_major_blocks(
        q, do, drem, bound, used, a_sum, a_total, dq,
        K, V, key_mask_ptr, USED_SNAP, A_SNAP, stride_kt, stride_vt, stride_mt,
        shared_blocks, shared_blocks, query_pos, Tk, Tq, qk_scale, snap_ptrs,
        row_valid, range_len, offs_n, offs_d, strict_upper_ones,
        HEAD_DIM, False, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION, COMPUTE_DQ,
        BLOCK_N, NUM_STAGES,
    )

    if COMPUTE_DQ:
        dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)
    else:
        tl.store(DREM + rows, drem, mask=row_valid)
        tl.store(TOTAL + rows, a_sum, mask=row_valid)
        tl.store(BOUND + rows, bound, mask=row_valid)
        if HAS_REMAINDER:
            rem = tl.where(row_valid, tl.math.exp2(-used), 0.0)
            part = tl.sum(rem[:, None] * do.to(tl.float32), 0)
            tl.store(DR_PART + (pid_bh * tl.cdiv(Tq, BLOCK_M) + pid_m) * HEAD_DIM + offs_d, part,
                     mask=offs_d < HEAD_DIM)


@triton.jit
def stickbreaking_backward_totals_kernel(
    Q, K, V, DO, DREM_IN, KEY_MASK, REMAINDER, VALUE_BOUND,
    DREM, TOTAL, BOUND, USED_SNAP, A_SNAP, DR_PART,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_mb, stride_mt,
    num_heads, Tq, Tk, group, qk_scale, range_len, num_ranges,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, HAS_REMAINDER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Pass 1. Grid (cdiv(Tq, BLOCK_M), B * Hq), heaviest query blocks first.

    Reads DREM_IN [B*Hq, Tq] (upstream gradient of rem) and VALUE_BOUND [B*Hkv] (>= |v_i| for
    every key). Writes, per query row of [B*Hq, Tq]: DREM (with do . r folded in), TOTAL
    (sum_i a_ij), BOUND (G_j = |do_j| VALUE_BOUND + |DREM_j| >= |g_ij|); USED_SNAP and A_SNAP
    [B*Hq, num_ranges, Tq]: entry r holds the state after the keys >= (r + 1) * range_len; and with
    a remainder DR_PART [B*Hq, cdiv(Tq, BLOCK_M), D]: sum over the block's rows of rem_j do_j.
    """
    _query_major_pass(
        Q, K, V, DO, KEY_MASK, DREM_IN, REMAINDER, VALUE_BOUND,
        DREM, TOTAL, BOUND, USED_SNAP, A_SNAP, DR_PART, None,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        None, None, None,
        stride_mb, stride_mt,
        num_heads, Tq, Tk, group, qk_scale, None, range_len, num_ranges,
        ATTEND_CURRENT, HAS_KEY_MASK, HAS_REMAINDER, BLOCK_M, BLOCK_N, BLOCK_D,
        HEAD_DIM, DOT_PRECISION, NUM_STAGES, False,
    )


@triton.jit
def stickbreaking_backward_dq_kernel(
    Q, K, V, DO, KEY_MASK, DREM, TOTAL, BOUND, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_mb, stride_mt,
    num_heads, Tq, Tk, group, qk_scale, scale,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Pass 2. Grid (cdiv(Tq, BLOCK_M), B * Hq); the same walk as pass 1 (same block sizes, so
    the same a values), now computing dz and dq = scale * sum_i dz_ij k_i."""
    _query_major_pass(
        Q, K, V, DO, KEY_MASK, None, None, None,
        DREM, TOTAL, BOUND, None, None, None, DQ,
        stride_qb, stride_qh, stride_qt,
        stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot,
        stride_dqb, stride_dqh, stride_dqt,
        stride_mb, stride_mt,
        num_heads, Tq, Tk, group, qk_scale, scale, 0, 0,
        ATTEND_CURRENT, HAS_KEY_MASK, False, BLOCK_M, BLOCK_N, BLOCK_D,
        HEAD_DIM, DOT_PRECISION, NUM_STAGES, True,
    )


@triton.jit
def _key_block_queries(
    kb, vb, keep, dk_t, dv_t, Q, DO, DREM, TOTAL, BOUND, USED_STATE, A_STATE,
    stride_qt, stride_dot, key_pos, block_end, row_start, Tq, Tk, qk_scale,
    offs_m, offs_d, strict_upper_ones,
    HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 3: one key block against BLOCK_M query rows from row_start. Adds to dk^T (units of
    1 / scale) and dv^T, [BLOCK_D, BLOCK_N], and moves the rows' state past the block.

    A row's state (USED_STATE, A_STATE) is valid only if it sees the key block_end (the first key
    of the nearer block); otherwise it sees no key nearer than this block and its state is zero.
    """
    rows = row_start + offs_m
    row_valid = rows < Tq
    query_pos = Tk - Tq + rows
    row_mask = row_tile_mask(row_valid, offs_d, HEAD_DIM, EVEN_D)
    q = tl.load(Q + rows[:, None] * stride_qt + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + offs_d[None, :], mask=row_mask, other=0.0)
    if DIAGONAL:
        has_state = row_valid & (query_pos + ATTEND_CURRENT > block_end)
    else:
        has_state = row_valid
    used = tl.load(USED_STATE + rows, mask=has_state, other=0.0)
    a_sum = tl.load(A_STATE + rows, mask=has_state, other=0.0)
    drem = tl.load(DREM + rows, mask=row_valid, other=0.0)
    bound = tl.load(BOUND + rows, mask=row_valid, other=0.0)
    MASKED: tl.constexpr = DIAGONAL or HAS_KEY_MASK
    visible = visible_tile(key_pos, query_pos, keep, DIAGONAL, ATTEND_CURRENT)
    weights, log_beta, a, used_here = _tile_gradient(
        q, do, kb, vb, used, drem, visible, qk_scale, strict_upper_ones, MASKED, DOT_PRECISION)
    tl.store(USED_STATE + rows, used + used_here, mask=row_valid)
    tl.store(A_STATE + rows, a_sum + tl.sum(a, 1), mask=row_valid)
    a_farther = tl.load(TOTAL + rows, mask=row_valid, other=0.0) - a_sum
    dz = _logit_gradient(a, weights, log_beta, a_farther, bound, visible, strict_upper_ones,
                         MASKED, DOT_PRECISION)
    # Rows whose q, do, drem, G load as zero (past Tq) add nothing: a = dz = 0 there.
    dv_t += tl.dot(tl.trans(do), weights.to(do.dtype), input_precision=DOT_PRECISION)
    dk_t += tl.dot(tl.trans(q), dz.to(q.dtype), input_precision=DOT_PRECISION)
    return dk_t, dv_t


@triton.jit
def _key_block_query_blocks(
    kb, vb, keep, dk_t, dv_t, Q, DO, DREM, TOTAL, BOUND, USED_SNAP, A_SNAP,
    stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
    b, h_kv, group, num_heads, num_ranges, key_range, first_qblock, num_qblocks,
    key_pos, block_end, Tq, Tk, qk_scale, offs_m, offs_d, strict_upper_ones,
    HEAD_DIM: tl.constexpr, DIAGONAL: tl.constexpr, ATTEND_CURRENT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """Pass 3: one key block against num_qblocks query blocks from first_qblock, of every query
    head of key head h_kv, in one flat loop over (query head, query block). LOOP_STAGES: the
    loop's software-pipelining depth (None: the compiler's default)."""
    for it in tl.range(0, group * num_qblocks, num_stages=LOOP_STAGES):
        h = h_kv * group + it // num_qblocks
        row_base = (b * num_heads + h) * Tq
        snap_base = ((b * num_heads + h) * num_ranges + key_range) * Tq
        dk_t, dv_t = _key_block_queries(
            kb, vb, keep, dk_t, dv_t, Q + b * stride_qb + h * stride_qh,
            DO + b * stride_dob + h * stride_doh, DREM + row_base, TOTAL + row_base,
            BOUND + row_base, USED_SNAP + snap_base, A_SNAP + snap_base, stride_qt,
            stride_dot, key_pos, block_end, (first_qblock + it % num_qblocks) * BLOCK_M, Tq, Tk,
            qk_scale, offs_m, offs_d, strict_upper_ones,
            HEAD_DIM, DIAGONAL, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION,
        )
    return dk_t, dv_t


@triton.jit
def stickbreaking_backward_dkv_kernel(
    Q, K, V, DO, KEY_MASK, DREM, TOTAL, BOUND, USED_SNAP, A_SNAP, DK, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_mb, stride_mt,
    num_kv_heads, Tq, Tk, group, qk_scale, scale, range_len, num_ranges,
    ATTEND_CURRENT: tl.constexpr, HAS_KEY_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Pass 3. Grid (num_ranges // 2, B * Hkv): program p owns key ranges p and num_ranges-1-p.

    BLOCK_N keys per block, BLOCK_M queries per step. The snapshots of pass 1 are the starting
    state of each range and are overwritten as the range is walked.
    """
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_kv_heads
    h_kv = pid_bh % num_kv_heads
    num_heads = num_kv_heads * group

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    strict_upper_ones = (offs_n[:, None] > offs_n[None, :]).to(tl.float16)
    K, V, key_mask_ptr = key_head(K, V, KEY_MASK, b, h_kv, stride_kb, stride_kh, stride_vb,
                                  stride_vh, stride_mb)
    DK += b * stride_dkb + h_kv * stride_dkh
    DV += b * stride_dvb + h_kv * stride_dvh
    num_query_blocks = tl.cdiv(Tq, BLOCK_M)

    # One flat loop over the key blocks of both ranges, nearest-first within each, and flat loops
    # over (query head, query block): nested loops cost registers (spills at every block size).
    near_range = num_ranges - 1 - pid_p
    far_blocks = tl.cdiv(tl.minimum(range_len, Tk - pid_p * range_len), BLOCK_N)
    near_blocks = tl.cdiv(tl.minimum(range_len, Tk - near_range * range_len), BLOCK_N)
    for step in range(0, far_blocks + tl.maximum(near_blocks, 0)):
        in_far = step < far_blocks
        key_range = tl.where(in_far, pid_p, near_range)
        range_blocks = tl.where(in_far, far_blocks, near_blocks)
        range_step = tl.where(in_far, step, step - far_blocks)
        block_start = key_range * range_len + (range_blocks - 1 - range_step) * BLOCK_N
        block_end = block_start + BLOCK_N
        key_pos = block_start + offs_n
        kv_mask = (key_pos < Tk)[:, None] & d_valid[None, :]
        kb = tl.load(K + key_pos[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        vb = tl.load(V + key_pos[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        keep = kept_keys(key_mask_ptr, key_pos, stride_mt, Tk, HAS_KEY_MASK)
        dk_t = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        dv_t = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

        # Query rows that see key block_start, and those that also see key block_end (all of this
        # block, and a state from the nearer blocks); query blocks with rows before the latter run
        # masked, after the others (before them, the pipelined loop spilled registers).
        first_row = tl.maximum(block_start + 1 - ATTEND_CURRENT - (Tk - Tq), 0)
        state_row = tl.maximum(block_end + 1 - ATTEND_CURRENT - (Tk - Tq), 0)
        first_qblock = first_row // BLOCK_M
        plain_qblock = tl.maximum(tl.minimum(tl.cdiv(state_row, BLOCK_M), num_query_blocks),
                                  first_qblock)
        diag_count = plain_qblock - first_qblock
        plain_count = num_query_blocks - plain_qblock
        dk_t, dv_t = _key_block_query_blocks(
            kb, vb, keep, dk_t, dv_t, Q, DO, DREM, TOTAL, BOUND, USED_SNAP, A_SNAP,
            stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
            b, h_kv, group, num_heads, num_ranges, key_range, plain_qblock, plain_count,
            key_pos, block_end, Tq, Tk, qk_scale, offs_m, offs_d, strict_upper_ones,
            HEAD_DIM, False, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION, BLOCK_M,
            NUM_STAGES,
        )
        dk_t, dv_t = _key_block_query_blocks(
            kb, vb, keep, dk_t, dv_t, Q, DO, DREM, TOTAL, BOUND, USED_SNAP, A_SNAP,
            stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,
            b, h_kv, group, num_heads, num_ranges, key_range, first_qblock, diag_count,
            key_pos, block_end, Tq, Tk, qk_scale, offs_m, offs_d, strict_upper_ones,
            HEAD_DIM, True, ATTEND_CURRENT, HAS_KEY_MASK, EVEN_D, DOT_PRECISION, BLOCK_M,
            None,
        )
        kv_mask_t = d_valid[:, None] & (key_pos < Tk)[None, :]
        tl.store(DK + key_pos[None, :] * stride_dkt + offs_d[:, None],
                 (dk_t * scale).to(DK.dtype.element_ty), mask=kv_mask_t)
        tl.store(DV + key_pos[None, :] * stride_dvt + offs_d[:, None],
                 dv_t.to(DV.dtype.element_ty), mask=kv_mask_t)
        # The next (farther) key block reads the states this one wrote, from other threads.
        tl.debug_barrier()
