"""The one entry point every model and task goes through: checks its inputs, picks a backend."""

from __future__ import annotations

import math

import torch

from .chunked import stickbreaking_attention_chunked
from .layout import triton_interpreting
from .reference import stickbreaking_attention_reference

BACKENDS = ("auto", "triton", "torch", "reference")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Span mass keeps one accumulator per span in each query row's registers (triton).
MAX_SPANS = 32


def stickbreaking_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    attend_current: bool = False,
    remainder: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    return_stats: bool = False,
    key_spans: torch.Tensor | None = None,
    num_spans: int | None = None,
    num_keys: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Causal stick-breaking attention (Tan et al., 2025) with queries at the end of the keys.

    Args:
        q: [B, Hq, Tq, D] queries: the last Tq of the Tk positions (Tq = Tk for a full pass,
            Tq = 1 for decoding against a cache).
        k, v: [B, Hkv, Tk, D]; Hq must be a multiple of Hkv (grouped-query attention).
        scale: logit scale, z = scale * q . k; default 1 / sqrt(D). Pass the checkpoint's
            (e.g. attention_multiplier = 1 / D for muP models).
        attend_current: a query also sees its own position's key.
        remainder: [Hq, D]; adds rem * remainder[h] to the output (the paper's remainder bias).
        key_mask: [B, Tk] bool, False for padding keys: they take no weight and leave the stick
            unchanged.
        return_stats: also return the per-query distance sum_i A_ij * (j - i), in tokens (not
            normalised by the attended mass 1 - rem); it is not differentiable.
        key_spans, num_spans: key_spans [B, Tk] integer, the span each key belongs to, in
            [0, num_spans) (a key with another index counts in no span); with them the op also
            returns each query's span mass sum_{i in span s} A_ij, so that the spans' masses and
            rem sum to 1 when every key has a span. Not differentiable. The triton backend
            computes it in its split-key kernel, for up to 64 query rows x group (decoding, the
            last rows of a prefill); num_spans is at most MAX_SPANS.
        num_keys: [1] integer tensor on q's device, for k and v that are buffers (a preallocated
            cache): only the first num_keys of their Tk slots are keys (and of key_mask's and
            key_spans' columns); the queries are the last Tq of those. The triton backend reads
            the count on the device, so that one launch serves every count (a CUDA graph of a
            decode step), and takes it for up to 64 query rows x group; the other backends read it
            on the host. Not differentiable.
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1; differentiable in q, k, v and
            remainder through o and rem, with Triton backward kernels), "torch" (chunked PyTorch,
            O(chunk^2) memory, differentiable), "reference" (the O(Tq * Tk) definition, float64
            capable), or "auto" (triton on CUDA, torch elsewhere).

    Returns:
        (o, rem), then distance with return_stats, then span_mass with key_spans: o
        [B, Hq, Tq, D] in q's dtype; rem = 1 - sum_i A_ij and distance as [B, Hq, Tq] float32;
        span_mass [B, Hq, Tq, num_spans] float32.
    """
    _check_inputs(q, k, v, remainder, key_mask, backend)
    _check_spans(q, k, key_spans, num_spans)
    _check_num_keys(q, num_keys)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    backend = _resolve_backend(backend, q)
    if key_mask is not None and key_mask.dtype != torch.bool:
        key_mask = key_mask != 0
    if num_keys is not None and backend != "triton":
        k, v, key_mask, key_spans = _first_keys(q.shape[2], k, v, key_mask, key_spans, num_keys)
        num_keys = None
    options = dict(
        scale=float(scale),
        attend_current=bool(attend_current),
        remainder=remainder,
        key_mask=key_mask,
        return_stats=return_stats,
        key_spans=key_spans,
        num_spans=num_spans,
    )

    if q.shape[2] == 0:
        o, rem, distance, span_mass = _empty_outputs(q, return_stats, num_spans)
    elif backend == "reference":
        o, rem, distance, span_mass = stickbreaking_attention_reference(q, k, v, **options)
    elif backend == "torch":
        o, rem, distance, span_mass = stickbreaking_attention_chunked(q, k, v, **options)
    else:
        from .triton_backend import StickbreakingTritonFunction, stickbreaking_attention_triton

        if torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, remainder)
        ):
            if num_keys is not None:
                raise ValueError("num_keys is for inference (decoding against a cache's buffers); it is not differentiable")
            o, rem, distance, span_mass = StickbreakingTritonFunction.apply(
                q, k, v, remainder, key_mask, options["scale"], options["attend_current"],
                return_stats, key_spans, num_spans,
            )
        else:
            o, rem, distance, span_mass = stickbreaking_attention_triton(q, k, v, num_keys=num_keys, **options)
    return (o, rem) + ((distance,) if return_stats else ()) + ((span_mass,) if key_spans is not None else ())


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    if backend == "triton":
        if not q.is_cuda and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {q.device}; use "
                "backend='torch' on the CPU (or set TRITON_INTERPRET=1 to run the kernels "
                "in Triton's CPU interpreter)"
            )
        try:
            import triton  # noqa: F401
        except ImportError as error:
            raise ValueError("backend='triton' needs the triton package (Linux only)") from error
    return backend


def _check_inputs(q, k, v, remainder, key_mask, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got {shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if B != Bk:
        raise ValueError(f"q and k must have the same batch size, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if D != Dk:
        raise ValueError(f"q and k must have the same head_dim, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"q's heads ({Hq}) must be a multiple of k's heads ({Hkv}) for grouped-query "
            f"attention; got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if Tq > Tk:
        raise ValueError(
            f"q cannot be longer than k: the queries are the last Tq of the Tk positions; got "
            f"Tq={Tq} (q {tuple(q.shape)}) and Tk={Tk} (k {tuple(k.shape)})"
        )
    dtypes = KERNEL_DTYPES + ((torch.float64,) if backend in ("torch", "reference") else ())
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {x.dtype}; backend {backend!r} takes {dtypes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if backend in ("auto", "triton") and (q.is_cuda or backend == "triton"):
        if D % 16 != 0 or not 16 <= D <= 256:
            raise ValueError(
                f"the triton backend takes head_dim a multiple of 16 from 16 to 256, got {D} "
                f"(q {tuple(q.shape)}); use backend='torch' for other sizes"
            )
    if remainder is not None and tuple(remainder.shape) != (Hq, D):
        raise ValueError(f"remainder must have shape [Hq, D] = ({Hq}, {D}), got {tuple(remainder.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (B, Tk):
        raise ValueError(f"key_mask must have shape [batch, Tk] = ({B}, {Tk}), got {tuple(key_mask.shape)}")
    for name, x in (("k", k), ("v", v), ("remainder", remainder), ("key_mask", key_mask)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; put them on one device")


def _check_spans(q, k, key_spans, num_spans) -> None:
    if key_spans is None and num_spans is None:
        return
    if key_spans is None or num_spans is None:
        raise ValueError("key_spans and num_spans go together: pass both for span mass, or neither")
    B, Tk = q.shape[0], k.shape[2]
    if not isinstance(key_spans, torch.Tensor) or key_spans.dtype.is_floating_point or key_spans.dtype == torch.bool:
        kind = key_spans.dtype if isinstance(key_spans, torch.Tensor) else type(key_spans).__name__
        raise ValueError(f"key_spans must be an integer tensor of span indices, got {kind}")
    if tuple(key_spans.shape) != (B, Tk):
        raise ValueError(f"key_spans must have shape [batch, Tk] = ({B}, {Tk}), got {tuple(key_spans.shape)}")
    if key_spans.device != q.device:
        raise ValueError(f"key_spans is on {key_spans.device} but q is on {q.device}; put them on one device")
    if isinstance(num_spans, bool) or not isinstance(num_spans, int) or not 1 <= num_spans <= MAX_SPANS:
        raise ValueError(f"num_spans must be an integer from 1 to {MAX_SPANS}, got {num_spans!r}")


def _check_num_keys(q, num_keys) -> None:
    if num_keys is None:
        return
    if (not isinstance(num_keys, torch.Tensor) or num_keys.numel() != 1
            or num_keys.dtype.is_floating_point or num_keys.dtype == torch.bool):
        kind = f"{num_keys.dtype} of shape {tuple(num_keys.shape)}" if isinstance(num_keys, torch.Tensor) else type(num_keys).__name__
        raise ValueError(f"num_keys must be an integer tensor of one element (the count of keys), got {kind}")
    if num_keys.device != q.device:
        raise ValueError(f"num_keys is on {num_keys.device} but q is on {q.device}; put them on one device")


def _first_keys(Tq: int, k, v, key_mask, key_spans, num_keys):
    """k, v, key_mask and key_spans cut to their first num_keys keys (read on the host), checked."""
    Tk = k.shape[2]
    count = int(num_keys.item())
    if not Tq <= count <= Tk:
        raise ValueError(f"num_keys must be from Tq={Tq} (the queries are the last keys) to Tk={Tk} (k's slots), got {count}")
    k, v = k[:, :, :count], v[:, :, :count]
    key_mask = key_mask[:, :count] if key_mask is not None else None
    key_spans = key_spans[:, :count] if key_spans is not None else None
    return k, v, key_mask, key_spans


def _empty_outputs(q: torch.Tensor, return_stats: bool, num_spans: int | None):
    B, Hq, _, D = q.shape
    rem = q.new_empty(B, Hq, 0, dtype=torch.float32)
    span_mass = q.new_empty(B, Hq, 0, num_spans, dtype=torch.float32) if num_spans is not None else None
    return q.new_empty(B, Hq, 0, D), rem, (rem.clone() if return_stats else None), span_mass
