"""Stick-breaking attention in PyTorch with O(chunk^2) working memory: the CPU path.

Same algorithm as the Triton kernel, in blocks of ``chunk_size`` queries x ``chunk_size`` keys:
each query block walks its keys from the nearest block back towards key 0, carrying the stick
already used (``used``: sum of softplus over the keys passed, in nats), and stops early once every
row has less than 2^-20 of its stick left. Differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .layout import HALT_NATS, query_positions, span_members, visible_keys


def stickbreaking_attention_chunked(
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
    chunk_size: int = 512,
    early_halting: bool = True,
):
    """Blocked stick-breaking attention; shapes and outputs as the reference.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; remainder: [Hq, D]; key_mask: [B, Tk] bool;
    key_spans: [B, Tk] span indices, or None. Computes in float32 (float64 for float64 inputs).
    Returns (o, rem, distance or None, span_mass or None).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    # Query heads of one group share a key head: [B, Hkv, group, T, D] avoids copying k and v.
    q_grouped = q.reshape(B, Hkv, group, Tq, D)
    positions = query_positions(Tq, Tk, q.device)

    o_blocks, rem_blocks, dist_blocks, span_blocks = [], [], [], []
    for q_start in range(0, Tq, chunk_size):
        q_end = min(q_start + chunk_size, Tq)
        j = positions[q_start:q_end]
        qb = q_grouped[:, :, :, q_start:q_end].to(compute) * scale
        o = torch.zeros(B, Hkv, group, q_end - q_start, v.shape[-1], dtype=compute, device=q.device)
        used = torch.zeros(B, Hkv, group, q_end - q_start, dtype=compute, device=q.device)
        distance = torch.zeros_like(used) if return_stats else None
        span_mass = used.new_zeros(*used.shape, num_spans) if key_spans is not None else None

        last_key = int(j[-1]) + (1 if attend_current else 0)  # exclusive bound of visible keys
        for k_end in range(last_key, 0, -chunk_size):
            k_start = max(k_end - chunk_size, 0)
            i = torch.arange(k_start, k_end, device=q.device)
            kb = k[:, :, None, k_start:k_end].to(compute)
            vb = v[:, :, None, k_start:k_end].to(compute)
            mask = None if key_mask is None else key_mask[:, k_start:k_end]
            visible = visible_keys(j, i, attend_current, mask)[:, :, None]  # [B|1, 1, 1, q, k]

            z = qb @ kb.transpose(-1, -2)
            softplus = torch.where(visible, F.softplus(z, threshold=15.0), 0.0)
            # stick used by keys nearer than i inside this block, then by the blocks already passed
            used_nearer = softplus.flip(-1).cumsum(-1).flip(-1) - softplus
            log_weights = F.logsigmoid(z) - used_nearer - used[..., None]
            weights = torch.where(visible, torch.exp(log_weights), 0.0)

            o = o + weights @ vb
            used = used + softplus.sum(-1)
            if return_stats:
                gap = (j[:, None] - i[None, :]).to(compute)
                distance = distance + (weights * gap).sum(-1)
            if key_spans is not None:
                members = span_members(key_spans[:, k_start:k_end], num_spans, compute)
                span_mass = span_mass + weights @ members[:, None, None]
            if early_halting and bool((used >= HALT_NATS).all()):
                break

        rem = torch.exp(-used)
        if remainder is not None:
            r = remainder.to(compute).reshape(1, Hkv, group, 1, D)
            o = o + rem[..., None] * r
        o_blocks.append(o)
        rem_blocks.append(rem)
        dist_blocks.append(distance)
        span_blocks.append(span_mass)

    o = torch.cat(o_blocks, dim=3).reshape(B, Hq, Tq, -1).to(q.dtype)
    rem = torch.cat(rem_blocks, dim=3).reshape(B, Hq, Tq).float()
    distance = torch.cat(dist_blocks, dim=3).reshape(B, Hq, Tq).float() if return_stats else None
    span_mass = None
    if key_spans is not None:
        span_mass = torch.cat(span_blocks, dim=3).reshape(B, Hq, Tq, num_spans).float()
    return o, rem, distance, span_mass
