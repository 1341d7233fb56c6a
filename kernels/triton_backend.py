"""Launches the Triton kernels: block sizes per head_dim and dtype, and the split-key choice."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

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


def split_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """Key block size, warps and pipelining depth of the split-key kernel."""
    if triton_interpreting():
        return KernelConfig(16, 16, 1, 1)
    if dtype == torch.float32 or head_dim > 128:
        return KernelConfig(16, 32, 4, 2)
    return KernelConfig(16, 64, 4, 3)


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
    early_halting: bool = True,
    config: KernelConfig | None = None,
):
    """Triton stick-breaking attention; arguments and outputs as the reference.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] (any strides); remainder: [Hq, D];
    key_mask: [B, Tk] bool. Returns (o [B, Hq, Tq, D], rem [B, Hq, Tq] fp32, distance or None).
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

    if group * Tq <= SPLIT_KEY_MAX_ROWS:
        cfg = split_config(D, q.dtype)
        splits = _num_splits(Tk, cfg.block_n, B * Hkv, q.device)
        split_len = triton.cdiv(triton.cdiv(Tk, splits), cfg.block_n) * cfg.block_n
        splits = triton.cdiv(Tk, split_len)
        rows = B * Hq * Tq
        o_part = torch.empty(rows, splits, D, dtype=torch.float32, device=q.device)
        used_part = torch.empty(rows, splits, dtype=torch.float32, device=q.device)
        dist_part = torch.empty_like(used_part) if return_stats else used_part
        stickbreaking_split_kernel[(splits, B * Hkv)](
            q, k, v, mask, o_part, used_part, dist_part,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *mask_strides,
            Hkv, Tq, Tk, group, qk_scale, split_len, splits,
            ATTEND_CURRENT=int(attend_current), HAS_KEY_MASK=key_mask is not None,
            RETURN_STATS=return_stats,
            BLOCK_M=max(16, triton.next_power_of_2(group * Tq)), BLOCK_N=cfg.block_n,
            BLOCK_D=block_d, HEAD_DIM=D, DOT_PRECISION=dot_precision, NUM_STAGES=cfg.num_stages,
            num_warps=cfg.num_warps,
        )
        stickbreaking_combine_kernel[(rows,)](
            o_part, used_part, dist_part, r, o, rem, distance,
            o.stride(0), o.stride(1), o.stride(2),
            Hq, Tq, splits,
            HAS_REMAINDER=remainder is not None, RETURN_STATS=return_stats,
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
    return o, rem, (distance if return_stats else None)
