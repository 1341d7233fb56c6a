"""The stick-breaking attention definition, written out over the full Tq x Tk matrix.

This is the oracle the fast paths are tested against: it materialises every logit, so it costs
O(Tq * Tk) memory and is meant for short sequences and float64 checks, not for evaluation runs.

For query row r (absolute position j = Tk - Tq + r) and key i, with z_ij = scale * q_j . k_i:

    A_ij  = sigmoid(z_ij) * prod_{i < k < j} (1 - sigmoid(z_kj))
          = exp(z_ij - sum_{k=i}^{j-1} softplus(z_kj))
    o_j   = sum_i A_ij v_i  (+ rem_j * remainder[h])
    rem_j = 1 - sum_i A_ij = exp(-sum_i softplus(z_ij))

Keys i < j are visible (i <= j with ``attend_current``); masked keys (``key_mask`` False) take no
weight and leave the stick unchanged. The span mass of query j over a set of keys S is
sum_{i in S} A_ij.
"""

from __future__ import annotations

import torch

from .layout import expand_kv_heads, query_positions, span_members, visible_keys


def stickbreaking_attention_reference(
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
):
    """Naive stick-breaking attention.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D]; remainder: [Hq, D]; key_mask: [B, Tk] bool;
    key_spans: [B, Tk] span index of each key, in [0, num_spans), or None.
    Computes in float64 when the inputs are float64, otherwise in float32.
    Returns (o [B, Hq, Tq, D] in q's dtype, rem [B, Hq, Tq] float32,
    distance [B, Hq, Tq] float32 or None, span_mass [B, Hq, Tq, num_spans] float32 or None):
    distance is sum_i A_ij * (j - i), in tokens; span_mass the weights summed over each span.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    qc = q.to(compute)
    kc = expand_kv_heads(k, Hq).to(compute)
    vc = expand_kv_heads(v, Hq).to(compute)

    z = scale * qc @ kc.transpose(-1, -2)  # [B, Hq, Tq, Tk]
    j = query_positions(Tq, Tk, q.device)
    i = torch.arange(Tk, device=q.device)
    visible = visible_keys(j, i, attend_current, key_mask)  # [B or 1, 1, Tq, Tk]
    softplus = torch.logaddexp(z, torch.zeros((), dtype=compute, device=z.device))
    softplus = torch.where(visible, softplus, 0.0)
    # sum_{k=i}^{j-1} softplus(z_kj): a reverse cumulative sum; keys past j are masked to 0.
    stick_used = softplus.flip(-1).cumsum(-1).flip(-1)
    weights = torch.where(visible, torch.exp(z - stick_used), 0.0)

    o = weights @ vc
    rem = torch.exp(-softplus.sum(-1))
    if remainder is not None:
        o = o + rem[..., None] * remainder.to(compute)[None, :, None, :]
    distance = None
    if return_stats:
        distance = (weights * (j[:, None] - i[None, :]).to(compute)).sum(-1).float()
    span_mass = None
    if key_spans is not None:
        span_mass = (weights @ span_members(key_spans, num_spans, compute)[:, None]).float()
    return o.to(q.dtype), rem.float(), distance, span_mass
