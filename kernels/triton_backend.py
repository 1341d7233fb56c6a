"""Launches the Triton kernels: block sizes per head_dim and dtype, the split-key choice, and the
autograd Function that pairs the forward with the backward kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from torch.autograd.function import once_differentiable

from .backward import stickbreaking_backward_dkv_kernel, stickbreaking_backward_dq_kernel, stickbreaking_backward_totals_kernel
from .decode import stickbreaking_combine_kernel, stickbreaking_split_kernel
from .forward import stickbreaking_forward_kernel
from .layout import HALT_BITS, triton_interpreting

# Queries x group heads up to this many rows go to the split-key kernel (decode, short chunks).
SPLIT_KEY_MAX_ROWS = 64
# The combine kernel holds every split of a row in registers.
MAX_SPLITS = 128


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Early halting stops a row block whose stick is spent within the diagonal and this many
    # key blocks behind it (16 x 32 = 512 keys); one whose stick outlasts them runs to key 0.
    halting_window: int = 16
    max_registers: int | None = None  # ptxas register cap per thread (None: its own choice)


def forward_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Block sizes of the forward kernel (small blocks when interpreted): 64 x 32 blocks with 4
    warps were the fastest tried at head_dim 64 and 128 on H100 and H200 (BENCHMARKS.md)."""
    if triton_interpreting():
        return KernelConfig(16, 16, 1, 1, halting_window=4)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(64, 32, 4, 2)
    if head_dim > 64:
        # Left alone, ptxas gives the kernel with early halting 206 registers and it runs 9-12%
        # slower than without halting; capped at 184 (no spills) halting costs 2-3% (H100).
        return KernelConfig(64, 32, 4, 3, max_registers=184)
    return KernelConfig(64, 32, 4, 3)


def span_block(num_spans: int) -> int:
    """Columns of the split kernel's span-mass tile for `num_spans` spans: a power of two (tl.arange),
    16 at least, the narrowest tile the kernels are compiled and tested with."""
    return max(16, triton.next_power_of_2(num_spans))


def split_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Key block size, warps and pipelining depth of the split-key kernel."""
    if triton_interpreting():
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(16, 32, 4, 2)
    return KernelConfig(16, 64, 4, 3)


@dataclass(frozen=True)
class BackwardConfig:
    """Settings of the three backward kernels (kernels/backward.py)."""

    queries: KernelConfig  # passes 1 and 2: block_m query rows per program, block_n keys per step
    keys: KernelConfig  # pass 3: block_n keys per block, block_m query rows per step
    # Pass 3 programs that fit on one multiprocessor at once (registers), and so are launched per
    # multiprocessor.
    keys_programs_per_sm: int = 1
    # Pairs of key ranges per (batch, key head) in pass 3, one program each; None: from the
    # multiprocessor count and keys_programs_per_sm.
    range_pairs: int | None = None


def backward_config(head_dim: int, dtype: torch.dtype, key_mask: bool = False) -> BackwardConfig:
    """Block sizes of the backward kernels (small blocks when interpreted), chosen to compile for
    sm_90 without register spills (scripts/compile_kernels.py), not yet timed: passes 1 and 2 take
    the forward's 64 x 32 tiles; pass 3 holds dk^T and dv^T [head_dim, block_n] in float32
    registers, which at head_dim 128 leaves room for 32 keys with 128 query rows and 8 warps
    (64 keys spill at every size tried), pipelined without a key_mask, not with one. float32
    inputs multiply on the FMA units, not the
    tensor cores, as in the forward: an exact path, not a fast one, and at head_dim 128 its passes
    1-2 spill 0.5-1 KB per thread (the float32 forward spills too). At head_dim > 128 the dq pass
    spills ~70 B, and pass 3 takes 32 x 32 tiles with 8 warps: on an H100 with triton 3.6, 64
    query rows x 16 keys read out of bounds at head_dim 256 (not under the interpreter), and 64 x
    32 needs more shared memory than there is; 32 x 32 x 8 warps was right and the fastest of
    the four that ran (1.50 ms for a training step of MQRAR's 64 x 768 tokens x 256)."""
    if triton_interpreting():
        return BackwardConfig(KernelConfig(16, 16, 1, 1), KernelConfig(16, 16, 1, 1))
    if dtype == torch.float32:
        return BackwardConfig(KernelConfig(32, 32, 8, 1), KernelConfig(32, 16, 8, 1))
    if head_dim > 128:
        return BackwardConfig(KernelConfig(64, 32, 8, 2), KernelConfig(32, 32, 8, 1))
    if head_dim > 64:
        return BackwardConfig(KernelConfig(64, 32, 4, 3), KernelConfig(128, 32, 8, 1 if key_mask else 2))
    # 4 warps x 242 registers: two programs per multiprocessor
    return BackwardConfig(KernelConfig(64, 32, 4, 3), KernelConfig(64, 32, 4, 3), keys_programs_per_sm=2)


def _key_ranges(num_keys: int, block: int, kv_programs: int, cfg: BackwardConfig,
                device: torch.device) -> tuple[int, int]:
    """(range length, number of ranges) of pass 3: an even number of ranges of whole key blocks,
    cfg.range_pairs pairs per (batch, key head), by default as many programs in all as the
    multiprocessors hold at once (one wave: every program does the same work)."""
    pairs = cfg.range_pairs
    if pairs is None:
        if triton_interpreting():
            pairs = 2
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            pairs = max(1, sms * cfg.keys_programs_per_sm // kv_programs)
    range_len = triton.cdiv(triton.cdiv(num_keys, 2 * pairs), block) * block
    num_ranges = triton.cdiv(num_keys, range_len)
    # An odd count gets an empty last range: its partner, range 0, sees every query and is a
    # full pair's work by itself.
    return range_len, num_ranges + num_ranges % 2


def _num_splits(num_keys: int, block_n: int, programs_per_split: int, device: torch.device) -> int:
    """Enough splits for ~4 programs per multiprocessor, each at least one key block long."""
    if triton_interpreting():
        target = 4
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = math.ceil(4 * sms / programs_per_split)
    return max(1, min(target, MAX_SPLITS, triton.cdiv(num_keys, block_n)))


def stickbreaking_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    attend_current: bool = False,
    remainder: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    key_spans: torch.Tensor | None = None,
    num_spans: int | None = None,
    num_keys: torch.Tensor | None = None,
    early_halting: bool = True,
    config: KernelConfig | None = None,
):
    """Triton stick-breaking attention; arguments and outputs as the reference.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] (any strides); remainder: [Hq, D];
    key_mask: [B, Tk] bool; key_spans: [B, Tk] integer span indices (split-key path only: at most
    SPLIT_KEY_MAX_ROWS query rows x group); num_keys: [1] int32 on q's device, the count of keys
    when k and v are buffers of Tk slots (split-key path only; the launch is the same for every
    count, so that it can be captured in a CUDA graph). Returns (o [B, Hq, Tq, D], rem [B, Hq, Tq] fp32,
    distance or None, span_mass [B, Hq, Tq, num_spans] fp32 or None).
    ``early_halting=False`` and ``config`` (forward-kernel settings) are for benchmarks.
    """
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * math.log2(math.e)

    o = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
    rem = torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device)
    distance = torch.empty_like(rem) if return_stats else rem
    mask = key_mask.to(torch.uint8) if key_mask is not None else rem
    mask_strides = (mask.stride(0), mask.stride(1)) if key_mask is not None else (0, 0)
    r = remainder.to(torch.float32).contiguous() if remainder is not None else rem
    span_mass = None
    if key_spans is not None:
        if group * Tq > SPLIT_KEY_MAX_ROWS:
            raise ValueError(
                f"span mass on the triton backend covers at most {SPLIT_KEY_MAX_ROWS} query rows x "
                f"group (the split-key kernel); got {Tq} queries x {group}: pass only the rows "
                "wanted (e.g. q[:, :, -1:] for the last query), or use backend='torch'"
            )
        key_spans = key_spans.to(torch.int32).contiguous()
        span_mass = torch.empty(B, Hq, Tq, num_spans, dtype=torch.float32, device=q.device)

    if num_keys is not None and group * Tq > SPLIT_KEY_MAX_ROWS:
        raise ValueError(
            f"num_keys is for the split-key kernel, at most {SPLIT_KEY_MAX_ROWS} query rows x group; "
            f"got {Tq} queries x {group}"
        )

    if group * Tq <= SPLIT_KEY_MAX_ROWS:
        cfg = split_config(D, q.dtype)
        splits = _num_splits(Tk, cfg.block_n, B * Hkv, q.device)
        split_len = triton.cdiv(triton.cdiv(Tk, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(Tk, split_len)
        rows = B * Hq * Tq
        o_part = torch.empty(rows, splits, D, dtype=torch.float32, device=q.device)
        used_part = torch.empty(rows, splits, dtype=torch.float32, device=q.device)
        dist_part = torch.empty_like(used_part) if return_stats else used_part
        spans = dict(NUM_SPANS=0, BLOCK_SPANS=16)
        span_part, key_spans_arg, span_out = used_part, used_part, used_part
        if key_spans is not None:
            spans = dict(NUM_SPANS=num_spans, BLOCK_SPANS=span_block(num_spans))
            span_part = torch.empty(rows, splits, num_spans, dtype=torch.float32, device=q.device)
            key_spans_arg, span_out = key_spans, span_mass
        stickbreaking_split_kernel[(splits, B * Hkv)](
            q, k, v, mask, key_spans_arg, num_keys.to(torch.int32) if num_keys is not None else used_part,
            o_part, used_part, dist_part, span_part,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *mask_strides, key_spans_arg.stride(0) if key_spans is not None else 0,
            Hkv, Tq, Tk, group, qk_scale, split_len, splits,
            ATTEND_CURRENT=int(attend_current), HAS_KEY_MASK=key_mask is not None,
            RETURN_STATS=return_stats, HAS_NUM_KEYS=num_keys is not None, **spans,
            BLOCK_M=max(16, triton.next_power_of_2(group * Tq)), BLOCK_N=cfg.block_n,
            BLOCK_D=block_d, HEAD_DIM=D, DOT_PRECISION=dot_precision, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps,
        )
        stickbreaking_combine_kernel[(rows,)](
            o_part, used_part, dist_part, span_part, r, o, rem, distance, span_out,
            o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, splits,
            HAS_REMAINDER=remainder is not None, RETURN_STATS=return_stats, **spans,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, HEAD_DIM=D,
            num_warps=4 if not triton_interpreting() else 1,
        )
    else:
        cfg = config or forward_config(D, q.dtype)
        stickbreaking_forward_kernel[(triton.cdiv(Tq, cfg.block_m), B * Hq)](
            q, k, v, mask, r, o, rem, distance,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            *mask_strides,
            Hq, Tq, Tk, group, qk_scale, HALT_BITS,
            ATTEND_CURRENT=int(attend_current), HAS_KEY_MASK=key_mask is not None,
            HAS_REMAINDER=remainder is not None, RETURN_STATS=return_stats,
            EARLY_HALTING=early_halting, HALTING_WINDOW=cfg.halting_window,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, HEAD_DIM=D,
            DOT_PRECISION=dot_precision, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps, maxnreg=cfg.max_registers,
        )
    return o, rem, (distance if return_stats else None), span_mass


def stickbreaking_attention_triton_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    do: torch.Tensor,
    drem: torch.Tensor,
    *,
    scale: float,
    attend_current: bool = False,
    remainder: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    want_dq: bool = True,
    want_dkv: bool = True,
    config: BackwardConfig | None = None,
):
    """Gradients of stickbreaking_attention_triton's (o, rem) with respect to q, k, v, remainder.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; do: [B, Hq, Tq, D] (gradient of o); drem:
    [B, Hq, Tq] (gradient of rem); remainder: [Hq, D]; key_mask: [B, Tk] bool. Any strides.
    Returns (dq or None, dk or None, dv or None, dremainder or None) in the inputs' dtypes;
    ``want_dq`` / ``want_dkv`` skip the pass that computes them. Deterministic: no atomics.
    """
    q, k, v, do = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, do))
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    cfg = config or backward_config(D, q.dtype, key_mask is not None)
    block_d = max(16, triton.next_power_of_2(D))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    qk_scale = scale * math.log2(math.e)
    floats = dict(dtype=torch.float32, device=q.device)

    drem_in = drem.to(torch.float32).contiguous()
    drem_eff, total, bound = torch.empty(3, B * Hq, Tq, **floats)
    mask = key_mask.to(torch.uint8) if key_mask is not None else total
    mask_strides = (mask.stride(0), mask.stride(1)) if key_mask is not None else (0, 0)
    r = remainder.to(torch.float32).contiguous() if remainder is not None else total
    # |v_i| <= sqrt(D) max |v| per (batch, key head): a loose bound is enough (its logarithm enters
    # the error), and amax / amin read v without a float32 copy.
    value_bound = torch.maximum(v.amax(dim=(2, 3)), -v.amin(dim=(2, 3))).float() * math.sqrt(D)
    range_block = max(cfg.queries.block_n, cfg.keys.block_n)
    if want_dkv:
        range_len, num_ranges = _key_ranges(Tk, range_block, B * Hkv, cfg, q.device)
        used_snap = torch.empty(B * Hq, num_ranges, Tq, **floats)
        a_snap = torch.empty_like(used_snap)
    else:  # one range longer than the keys: pass 1 meets no boundary and stores no snapshot
        range_len, num_ranges = triton.cdiv(Tk + 1, range_block) * range_block, 1
        used_snap = a_snap = total
    query_blocks = triton.cdiv(Tq, cfg.queries.block_m)
    dr_part = torch.empty(B * Hq, query_blocks, D, **floats) if remainder is not None else total
    common = dict(
        ATTEND_CURRENT=int(attend_current), HAS_KEY_MASK=key_mask is not None,
        BLOCK_D=block_d, HEAD_DIM=D, DOT_PRECISION=dot_precision,
    )
    strides = [*(x.stride(i) for x in (q, k, v, do) for i in range(3))]

    stickbreaking_backward_totals_kernel[(query_blocks, B * Hq)](
        q, k, v, do, drem_in, mask, r, value_bound, drem_eff, total, bound, used_snap, a_snap,
        dr_part, *strides, *mask_strides,
        Hq, Tq, Tk, group, qk_scale, range_len, num_ranges,
        HAS_REMAINDER=remainder is not None, BLOCK_M=cfg.queries.block_m,
        BLOCK_N=cfg.queries.block_n, NUM_STAGES=cfg.queries.num_stages, **common,
        num_warps=cfg.queries.num_warps, maxnreg=cfg.queries.max_registers,
    )
    dq = dk = dv = None
    if want_dq:
        dq = torch.empty(B, Hq, Tq, D, dtype=q.dtype, device=q.device)
        stickbreaking_backward_dq_kernel[(query_blocks, B * Hq)](
            q, k, v, do, mask, drem_eff, total, bound, dq,
            *strides, dq.stride(0), dq.stride(1), dq.stride(2), *mask_strides,
            Hq, Tq, Tk, group, qk_scale, scale,
            BLOCK_M=cfg.queries.block_m, BLOCK_N=cfg.queries.block_n,
            NUM_STAGES=cfg.queries.num_stages, **common,
            num_warps=cfg.queries.num_warps, maxnreg=cfg.queries.max_registers,
        )
    if want_dkv:
        dk = torch.empty(B, Hkv, Tk, D, dtype=k.dtype, device=k.device)
        dv = torch.empty(B, Hkv, Tk, D, dtype=v.dtype, device=v.device)
        stickbreaking_backward_dkv_kernel[(num_ranges // 2, B * Hkv)](
            q, k, v, do, mask, drem_eff, total, bound, used_snap, a_snap, dk, dv,
            *strides, *(x.stride(i) for x in (dk, dv) for i in range(3)), *mask_strides,
            Hkv, Tq, Tk, group, qk_scale, scale, range_len, num_ranges,
            BLOCK_M=cfg.keys.block_m, BLOCK_N=cfg.keys.block_n, NUM_STAGES=cfg.keys.num_stages,
            **common, num_warps=cfg.keys.num_warps, maxnreg=cfg.keys.max_registers,
        )
    dremainder = None
    if remainder is not None:
        dremainder = dr_part.view(B, Hq, query_blocks, D).sum((0, 2)).to(remainder.dtype)
    return dq, dk, dv, dremainder


class StickbreakingTritonFunction(torch.autograd.Function):
    """(o, rem, distance, span_mass) = stickbreaking_attention_triton(...), differentiable in q,
    k, v and remainder through both o and rem; distance and span_mass are not differentiable.
    Saves only the inputs: the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, q, k, v, remainder, key_mask, scale, attend_current, return_stats, key_spans, num_spans):
        o, rem, distance, span_mass = stickbreaking_attention_triton(
            q, k, v, scale=scale, attend_current=attend_current, remainder=remainder,
            key_mask=key_mask, return_stats=return_stats, key_spans=key_spans, num_spans=num_spans,
        )
        ctx.save_for_backward(q, k, v, remainder, key_mask)
        ctx.scale = scale
        ctx.attend_current = attend_current
        ctx.mark_non_differentiable(*(x for x in (distance, span_mass) if x is not None))
        return o, rem, distance, span_mass

    @staticmethod
    @once_differentiable
    def backward(ctx, do, drem, _ddistance, _dspan_mass):
        q, k, v, remainder, key_mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dq, dk, dv, dremainder = stickbreaking_attention_triton_backward(
            q, k, v, do, drem, scale=ctx.scale, attend_current=ctx.attend_current,
            remainder=remainder, key_mask=key_mask, want_dq=needs[0], want_dkv=needs[1] or needs[2],
        )
        return dq, dk, dv, dremainder, None, None, None, None, None, None
