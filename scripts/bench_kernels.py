"""Times the stick-breaking kernels beside torch SDPA flash attention (and, for the forward, SDPA's
cuDNN backend), in one run on one GPU.

    python scripts/bench_kernels.py [--lengths 4096,...] [--shapes 16x128,24x64] [--json out.json] [--sweep]
    python scripts/bench_kernels.py --backward [--lengths 16384,65536] [--sweep]

Forward (prefill, Tq = Tk, causal, batch 1, bf16) at 16 heads x 128 and 24 heads x 64 on inputs
whose stick survives the whole context (logits near -10, so early halting cannot skip anything),
with halting on and off; a separate, labelled line on plain random inputs (where halting skips
almost everything); decode (one query) against 4K/16K/64K caches; the forward's extra memory at
the longest length. Medians of triton.testing.do_bench, ratios against SDPA from the same run.
fla-core's parallel_stickbreaking_attn is timed too when it is installed.

--backward times a training step instead, forward + backward (gradient of o), against SDPA flash's
forward + backward, on the same long-range inputs; the backward alone and its three passes
(kernels/backward.py); and the peak memory of the step beyond its inputs, both ways. --sweep adds
alternative backward block sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from sb_eval.kernels.attention import stickbreaking_attention
from sb_eval.kernels.triton_backend import (
    KernelConfig,
    backward_config,
    forward_config,
    stickbreaking_attention_triton,
    stickbreaking_attention_triton_backward,
)

SHAPES = [(16, 128), (24, 64)]  # heads x head_dim, unless --shapes
# Forward variants for --sweep: KernelConfig(block_m, block_n, num_warps, num_stages[, halting_window]).
FORWARD_SWEEP = [(64, 64, 4, 3), (64, 32, 4, 4), (64, 32, 4, 3, 4), (64, 32, 4, 3, 64), (128, 32, 8, 3),
                 (128, 64, 8, 3), (128, 32, 4, 3), (64, 16, 4, 3), (32, 32, 4, 3), (128, 16, 8, 3)]
# Backward variants for --backward --sweep: one pass's blocks changed from the head_dim's default.
BACKWARD_SWEEP = [
    {"queries": KernelConfig(64, 32, 4, 2)},
    {"queries": KernelConfig(128, 32, 8, 2)},
    {"keys": KernelConfig(128, 32, 8, 1)},
    {"keys": KernelConfig(128, 32, 8, 3)},
    {"keys": KernelConfig(64, 32, 4, 2)},
    {"keys": KernelConfig(64, 16, 4, 3)},
    {"keys": KernelConfig(128, 64, 8, 1)},  # spills at head_dim 128, halves pass 3's q/do reads
]


def long_range_qkv(heads: int, tq: int, tk: int, dim: int, logit: float = -10.0):
    """bf16 q, k, v [1, H, T, D] whose logits sit near `logit`: the stick survives every key."""
    u = torch.randn(heads, 1, dim, device="cuda")
    u = u / u.norm(dim=-1, keepdim=True)
    size = math.sqrt(-logit * math.sqrt(dim))
    q = size * u + 0.3 * torch.randn(1, heads, tq, dim, device="cuda")
    k = -size * u + 0.3 * torch.randn(1, heads, tk, dim, device="cuda")
    v = torch.randn(1, heads, tk, dim, device="cuda")
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def random_qkv(heads: int, tq: int, tk: int, dim: int):
    return tuple(torch.randn(1, heads, t, dim, device="cuda", dtype=torch.bfloat16) for t in (tq, tk, tk))


def median_ms(fn, grad_to_none=None) -> float:
    """Median over at least ~1 s of runs: a 64K forward takes ~60 ms, and fewer repeats are noisy."""
    return triton.testing.do_bench(fn, warmup=100, rep=1000, grad_to_none=grad_to_none,
                                   return_mode="median")


def sdpa(q, k, v, causal: bool, backend: SDPBackend = SDPBackend.FLASH_ATTENTION):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def ours(q, k, v, **options):
    return stickbreaking_attention_triton(q, k, v, scale=q.shape[-1] ** -0.5, **options)


def fla_forward():
    """fla-core's kernel ([B, T, H, D] layout), or None when fla-core is not installed."""
    try:
        from fla.ops.stickbreaking_attn import parallel_stickbreaking_attn
    except ImportError:
        return None

    def run(q, k, v):
        t = lambda x: x.transpose(1, 2)  # noqa: E731
        return parallel_stickbreaking_attn(t(q), t(k), t(v), scale=q.shape[-1] ** -0.5)

    return run


def bench_forward(lengths, rows, sweep_configs, shapes):
    fla = fla_forward()
    for heads, dim in shapes:
        for t in lengths:
            q, k, v = long_range_qkv(heads, t, t, dim)
            base = median_ms(lambda: sdpa(q, k, v, True))
            row = {"kind": "forward", "heads": heads, "dim": dim, "T": t, "sdpa_ms": base}
            # what torch 2.11 picks by default on Hopper, and so what a transformers Llama runs
            row["sdpa_cudnn_ms"] = median_ms(lambda: sdpa(q, k, v, True, SDPBackend.CUDNN_ATTENTION))
            row["ours_ms"] = median_ms(lambda: ours(q, k, v))
            row["ours_no_halting_ms"] = median_ms(lambda: ours(q, k, v, early_halting=False))
            row["ours_stats_ms"] = median_ms(lambda: ours(q, k, v, return_stats=True))
            if fla is not None:
                row["fla_ms"] = median_ms(lambda: fla(q, k, v))
            for cfg in sweep_configs:
                try:
                    row[f"cfg {cfg}"] = median_ms(lambda: ours(q, k, v, config=cfg))
                except Exception as error:  # a config that does not fit in shared memory
                    row[f"cfg {cfg}"] = f"failed: {type(error).__name__}"
            qr, kr, vr = random_qkv(heads, t, t, dim)
            row["ours_random_inputs_ms"] = median_ms(lambda: ours(qr, kr, vr))
            rows.append(row)
            print(format_row(row), flush=True)
            del q, k, v, qr, kr, vr


def bench_decode(cache_lengths, rows, shapes):
    for heads, dim in shapes:
        for t in cache_lengths:
            q, k, v = long_range_qkv(heads, 1, t, dim)
            row = {"kind": "decode", "heads": heads, "dim": dim, "T": t}
            row["sdpa_ms"] = median_ms(lambda: sdpa(q, k, v, False))
            row["ours_ms"] = median_ms(lambda: ours(q, k, v))
            rows.append(row)
            print(format_row(row), flush=True)


def forward_extra_memory(t: int, heads: int = 16, dim: int = 128) -> dict:
    """Peak memory the forward allocates beyond its inputs, at T tokens."""
    q, k, v = long_range_qkv(heads, t, t, dim)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = ours(q, k, v)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    output_bytes = out[0].numel() * out[0].element_size() + out[1].numel() * 4
    return {"kind": "memory", "heads": heads, "dim": dim, "T": t, "extra_bytes": extra,
            "output_bytes": output_bytes}


def peak_extra_bytes(fn) -> int:
    """Most memory allocated while fn runs, beyond what was allocated before (what fn keeps, as
    gradients, counts)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def bench_backward(lengths, rows, sweep_configs):
    fla = fla_forward()
    for heads, dim in SHAPES:
        for t in lengths:
            q, k, v = (x.requires_grad_(True) for x in long_range_qkv(heads, t, t, dim))
            do = torch.randn_like(q)
            leaves = (q, k, v)
            row = {"kind": "fwd+bwd", "heads": heads, "dim": dim, "T": t}

            def sdpa_step():
                sdpa(q, k, v, True).backward(do)

            def our_step():
                stickbreaking_attention(q, k, v, backend="triton")[0].backward(do)

            row["sdpa_ms"] = median_ms(sdpa_step, grad_to_none=leaves)
            row["ours_ms"] = median_ms(our_step, grad_to_none=leaves)
            if fla is not None:
                row["fla_ms"] = median_ms(
                    lambda: fla(q, k, v)[0].transpose(1, 2).backward(do), grad_to_none=leaves
                )

            # The backward alone, and with passes left out: pass 1 always runs.
            inputs = [x.detach() for x in leaves]
            drem = torch.zeros(1, heads, t, device="cuda")

            def backward(config=None, **passes):
                return stickbreaking_attention_triton_backward(
                    *inputs, do, drem, scale=dim**-0.5, config=config, **passes
                )

            row["ours_bwd_ms"] = median_ms(backward)
            row["pass1_ms"] = median_ms(lambda: backward(want_dq=False, want_dkv=False))
            row["pass1+2_ms"] = median_ms(lambda: backward(want_dkv=False))
            row["pass1+3_ms"] = median_ms(lambda: backward(want_dq=False))
            for variant in sweep_configs:
                cfg = dataclasses.replace(backward_config(dim, torch.bfloat16), **variant)
                name = "bwd " + ", ".join(f"{pass_}={c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
                                          for pass_, c in variant.items())
                try:
                    row[name] = median_ms(lambda: backward(config=cfg))
                except Exception as error:  # a config that does not fit in shared memory
                    row[name] = f"failed: {type(error).__name__}"

            for name, step in (("sdpa", sdpa_step), ("ours", our_step)):
                for x in leaves:
                    x.grad = None
                row[f"{name}_peak_bytes"] = peak_extra_bytes(step)
            rows.append(row)
            print(format_row(row), flush=True)
            del q, k, v, do, inputs, leaves


def backward_table(rows: list[dict]) -> str:
    """Markdown table of the fwd+bwd rows (peak memory: the step's allocations beyond its inputs,
    gradients included)."""
    lines = [
        "| T | heads x dim | SDPA fwd+bwd ms | ours fwd+bwd ms | ours / SDPA | ours bwd ms | "
        "pass 1 | pass 2 | pass 3 | SDPA peak MiB | ours peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["kind"] != "fwd+bwd":
            continue
        pass1 = row["pass1_ms"]
        lines.append(
            f"| {row['T'] // 1024}K | {row['heads']}x{row['dim']} | {row['sdpa_ms']:.2f} | "
            f"{row['ours_ms']:.2f} | **{row['ours_ms'] / row['sdpa_ms']:.2f}x** | "
            f"{row['ours_bwd_ms']:.2f} | {pass1:.2f} | {row['pass1+2_ms'] - pass1:.2f} | "
            f"{row['pass1+3_ms'] - pass1:.2f} | {row['sdpa_peak_bytes'] / 2**20:.0f} | "
            f"{row['ours_peak_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def format_row(row: dict) -> str:
    base = row["sdpa_ms"]
    parts = [f"{row['kind']:8s} {row['heads']}x{row['dim']:<4d} T={row['T']:<6d} sdpa {base:8.3f} ms"]
    for key, value in row.items():
        if key.endswith("_ms") and key != "sdpa_ms" or key.startswith(("cfg", "bwd ")):
            if isinstance(value, float):
                parts.append(f"{key.removesuffix('_ms')} {value:8.3f} ms ({value / base:5.2f}x)")
            else:
                parts.append(f"{key} {value}")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", help="default 4096,...,65536; 16384,65536 with --backward")
    parser.add_argument("--decode-lengths", default="4096,16384,65536", help="empty: no decode runs")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--sweep", action="store_true", help="time alternative block configs too")
    parser.add_argument("--shapes", help="heads x head_dim of the forward and decode runs, e.g. 24x64,36x64 (default 16x128,24x64)")
    parser.add_argument("--backward", action="store_true",
                        help="time forward + backward (a training step) instead of the forward")
    args = parser.parse_args()
    default_lengths = "16384,65536" if args.backward else "4096,8192,16384,32768,65536"
    lengths = [int(x) for x in (args.lengths or default_lengths).split(",")]

    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    header = {
        "card": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(header))
    rows: list[dict] = []
    if args.backward:
        bench_backward(lengths, rows, BACKWARD_SWEEP if args.sweep else [])
        print(backward_table(rows))
        print("default backward configs:", {d: backward_config(d, torch.bfloat16) for _, d in SHAPES})
    else:
        sweep = [KernelConfig(*c) for c in FORWARD_SWEEP] if args.sweep else []
        shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")] if args.shapes else SHAPES
        bench_forward(lengths, rows, sweep, shapes)
        if args.decode_lengths:
            bench_decode([int(x) for x in args.decode_lengths.split(",")], rows, shapes)
        memory = forward_extra_memory(max(lengths))
        rows.append(memory)
        print(f"forward extra memory at T={memory['T']}, 16x128: {memory['extra_bytes'] / 2**20:.1f} MiB "
              f"(outputs {memory['output_bytes'] / 2**20:.1f} MiB)")
        print("default forward configs:", {d: forward_config(d, torch.bfloat16) for _, d in SHAPES})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)

if __name__ == "__main__":
    main()
