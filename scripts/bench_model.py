"""Prefill and decode of a stick-breaking model with the released 3B's shapes beside a same-shaped
Llama with SDPA attention, on one GPU, random weights, bf16, batch 1.

    python scripts/bench_model.py [--lengths 16384,65536] [--decode-cache 65536] [--json out.json]

Prefill: one forward over T tokens that fills the cache and returns the last position's logits.
Decode: median time per token of single-token steps against a cache of --decode-cache tokens.
Peak memory: the most the CUDA allocator held during each prefill. Both models use transformers'
DynamicCache, so the cache handling they share costs the same on both sides.

With random weights every logit is near 0, each key takes half the remaining stick and early
halting skips all but the nearest few dozen keys, which flatters stick-breaking. The
"long-range" variant fixes every head's logits at -10 (constant q and k through the projection
bias), so the stick survives the whole context and nothing can be skipped: the worst case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch
import transformers
import triton
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sb_eval.model.configuration import released_3b_config
from sb_eval.model.modeling import CACHE_FIELD, StickBreakingForCausalLM


def stick_breaking_model(long_range: bool = False) -> torch.nn.Module:
    config = released_3b_config(add_qkv_bias=long_range)
    with torch.device("cuda"):
        model = StickBreakingForCausalLM(config)
    if long_range:
        heads, dim = config.n_head, config.head_dim
        size = (10.0 / config.attention_scale) ** 0.5  # scale * q . k = -10 for every pair
        with torch.no_grad():
            for block in model.transformer.h:
                u = torch.randn(heads, dim, device="cuda")
                u = u / u.norm(dim=-1, keepdim=True)
                weight = block.attn.c_attn.weight.view(heads, 3, dim, -1)
                bias = block.attn.c_attn.bias.view(heads, 3, dim)
                weight[:, :2].zero_()  # per head [q | k | v]: constant q and k, random v
                bias.zero_()
                bias[:, 0], bias[:, 1] = size * u, -size * u
    return model.to(torch.bfloat16).eval()


def llama_model() -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=50304, hidden_size=2304, num_hidden_layers=40, num_attention_heads=36,
        num_key_value_heads=36, intermediate_size=9216, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=131072,
    )
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16).eval()


def elapsed_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


@torch.no_grad()
def median_ms_and_peak(forward, ids: torch.Tensor, repeats: int) -> tuple[float, int]:
    """forward(ids) timed: the median of `repeats` runs in ms, and the most the CUDA allocator
    held beyond what was allocated before them, in bytes. A warm-up on the first 1024 tokens
    compiles the kernels and primes the allocator first."""
    forward(ids[:, :1024])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = [elapsed_ms(lambda: forward(ids)) for _ in range(repeats)]
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def run_header() -> dict:
    """The card, library versions and date a result was measured with."""
    return {
        "card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
    }


@torch.no_grad()
def prefill(model, ids: torch.Tensor):
    cache = DynamicCache()
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
    return cache


@torch.no_grad()
def measure(model, name: str, lengths: list[int], decode_cache: int, repeats: int) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    for t in lengths:
        ids = torch.randint(0, vocab, (1, t), device="cuda")
        ms, peak = median_ms_and_peak(lambda x: prefill(model, x), ids, repeats)
        rows.append({"model": name, "kind": "prefill", "T": t, "ms": ms, "peak_extra_bytes": peak})
        print(f"{name:14s} prefill T={t:<6d} {rows[-1]['ms']:9.1f} ms  peak extra {peak / 2**30:6.2f} GiB", flush=True)
        del ids
        torch.cuda.empty_cache()

    ids = torch.randint(0, vocab, (1, decode_cache), device="cuda")
    cache = prefill(model, ids)
    token = ids[:, -1:]
    steps = []
    for _ in range(12):
        steps.append(elapsed_ms(lambda: model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache})))
    per_token = statistics.median(steps[2:])
    rows.append({"model": name, "kind": "decode", "T": decode_cache, "ms": per_token})
    print(f"{name:14s} decode  cache={decode_cache:<6d} {per_token:9.2f} ms/token", flush=True)
    del cache, ids
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--decode-cache", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    header = run_header()
    print(json.dumps(header))
    rows = []
    builds = {
        "sb-random": stick_breaking_model,
        "sb-long-range": lambda: stick_breaking_model(long_range=True),
        "llama-sdpa": llama_model,
    }
    for name, build in builds.items():
        model = build()
        rows += measure(model, name, lengths, args.decode_cache, args.repeats)
        del model
        torch.cuda.empty_cache()
    for kind, t in sorted({(r["kind"], r["T"]) for r in rows}):
        llama = next(r for r in rows if (r["kind"], r["T"], r["model"]) == (kind, t, "llama-sdpa"))
        for name in ("sb-random", "sb-long-range"):
            sb = next(r for r in rows if (r["kind"], r["T"], r["model"]) == (kind, t, name))
            line = f"{name:14s} {kind:8s} T={t:<6d} time {sb['ms'] / llama['ms']:5.2f}x llama's"
            if "peak_extra_bytes" in sb:
                line += f", peak memory {sb['peak_extra_bytes'] / llama['peak_extra_bytes']:5.2f}x"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
