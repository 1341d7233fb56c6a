"""Prefill and decode of a stick-breaking model with the released 3B's shapes beside a same-shaped
Llama with SDPA attention, on one GPU, random weights, bf16, batch 1.

    python scripts/bench_model.py [--lengths 16384,65536] [--decode-cache 65536] [--profile 65536] [--profile-decode] [--json out.json]

Prefill: one forward over T tokens that fills the cache and returns the last position's logits.
Decode: median time per token of single-token steps against a cache of --decode-cache tokens,
for the stick-breaking models with transformers' DynamicCache (which concatenates the cache every
token), with sb-eval's PreallocatedCache (which writes in place), and with that cache and each
step replayed as a CUDA graph ("graph", as sb_hf generates), beside the floor: the time to
read the cache and the weights once at the copy bandwidth measured in the same run.
Peak memory: the most the CUDA allocator held during each prefill. --profile T prints, for each
model, where one prefill of T tokens spends its GPU time (torch.profiler, by kernel), so that the
time outside the attention kernel can be read off; --profile-decode does the same for a decode
step and sets its GPU time beside its wall time.

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
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from sb_eval.model.cache import PreallocatedCache
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


DECODE_STEPS = 12


def new_cache(kind: str, capacity: int):
    return DynamicCache() if kind == "dynamic" else PreallocatedCache(capacity)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache_kind: str = "dynamic"):
    cache = new_cache(cache_kind, ids.shape[1] + DECODE_STEPS)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
    return cache


def decode_step(model, ids: torch.Tensor, cache_kind: str):
    """Fills a cache from ids [1, T] and returns one decode step of its last token against it (the
    step holds the cache; at most DECODE_STEPS steps fit a preallocated one). The "graph" kind is
    the preallocated cache with each step replayed as a CUDA graph (captured at the first)."""
    if isinstance(model, StickBreakingForCausalLM):
        model.set_decode_graphs(cache_kind == "graph")
    cache = prefill(model, ids, cache_kind)
    token = ids[:, -1:]
    return lambda: model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache})


@torch.no_grad()
def measure(model, name: str, lengths: list[int], decode_cache: int, repeats: int, cache_kinds: tuple[str, ...]) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    for t in lengths:
        ids = torch.randint(0, vocab, (1, t), device="cuda")
        ms, peak = median_ms_and_peak(lambda x: prefill(model, x, cache_kinds[-1]), ids, repeats)
        rows.append({"model": name, "kind": "prefill", "T": t, "ms": ms, "peak_extra_bytes": peak})
        print(f"{name:14s} prefill T={t:<6d} {rows[-1]['ms']:9.1f} ms  peak extra {peak / 2**30:6.2f} GiB", flush=True)
        del ids
        torch.cuda.empty_cache()

    ids = torch.randint(0, vocab, (1, decode_cache), device="cuda")
    for cache_kind in cache_kinds:
        step = decode_step(model, ids, cache_kind)
        steps = [elapsed_ms(step) for _ in range(DECODE_STEPS)]
        per_token = statistics.median(steps[2:])
        rows.append({"model": name, "kind": "decode", "cache": cache_kind, "T": decode_cache, "ms": per_token})
        print(f"{name:14s} decode  cache={decode_cache:<6d} {cache_kind:12s} {per_token:9.2f} ms/token", flush=True)
        del step
        torch.cuda.empty_cache()
    del ids
    return rows


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy of 4 GiB moves, counting bytes read and written."""
    source = torch.empty(2**31, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    ms = statistics.median(elapsed_ms(lambda: target.copy_(source)) for _ in range(5))
    del source, target
    torch.cuda.empty_cache()
    return 2 * 2**32 / (ms / 1000)


def decode_floor_ms(model, cache_tokens: int, bandwidth: float) -> float:
    """Reading the cache [layers x 2 x kv_heads x T x head_dim] and every weight once at
    `bandwidth` bytes per second, in ms."""
    config = model.config
    cache_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * cache_tokens * config.head_dim * 2
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return (cache_bytes + weight_bytes) / bandwidth * 1000


def print_by_kernel(profiler, title: str, per: int = 1, top: int = 12) -> float:
    """Prints the profiled GPU time by CUDA kernel, the largest first, divided by `per` (the
    number of profiled repetitions); returns the total in ms."""
    events = [e for e in profiler.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events) / per / 1000
    print(f"{title}: {total:.1f} ms of GPU time by kernel", flush=True)
    for event in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        ms = event.device_time_total / per / 1000
        print(f"  {ms:9.2f} ms {100 * ms / total:5.1f}%  x{event.count // per:<5d} {event.key[:90]}")
    return total


@torch.no_grad()
def kernel_breakdown(model, name: str, t: int) -> None:
    """GPU time of one prefill of t tokens by CUDA kernel."""
    ids = torch.randint(0, model.config.vocab_size, (1, t), device="cuda")
    prefill(model, ids[:, :1024])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        prefill(model, ids)
        torch.cuda.synchronize()
    print_by_kernel(profiler, f"{name} prefill T={t}")


PROFILED_STEPS = 4


@torch.no_grad()
def decode_breakdown(model, name: str, cache_tokens: int, cache_kind: str) -> None:
    """GPU time of a decode step against a cache of cache_tokens by CUDA kernel, beside its wall
    time: a step whose wall time is well above its GPU time waits on the host (launches, Python)."""
    ids = torch.randint(0, model.config.vocab_size, (1, cache_tokens), device="cuda")
    step = decode_step(model, ids, cache_kind)
    step()
    wall = statistics.median(elapsed_ms(step) for _ in range(3))
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(PROFILED_STEPS):
            step()
        torch.cuda.synchronize()
    gpu = print_by_kernel(profiler, f"{name} decode step, {cache_kind} cache of {cache_tokens}", per=PROFILED_STEPS, top=8)
    print(f"{name} decode step, {cache_kind}: wall {wall:.2f} ms, GPU busy {gpu:.2f} ms ({100 * gpu / wall:.0f}%)", flush=True)
    del step, ids
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384,65536")
    parser.add_argument("--decode-cache", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", type=int, help="print a by-kernel breakdown of one prefill of this many tokens")
    parser.add_argument("--profile-decode", action="store_true", help="print a by-kernel breakdown of a decode step beside its wall time")
    parser.add_argument("--models", default="sb-random,sb-long-range,llama-sdpa", help="comma-separated; llama-sdpa is the baseline")
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
    bandwidth = copy_bandwidth()
    header["copy_bytes_per_s"] = bandwidth
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    floors = {}
    for name in args.models.split(","):
        model = builds[name]()
        cache_kinds = ("dynamic",) if name.startswith("llama") else ("dynamic", "preallocated", "graph")
        rows += measure(model, name, lengths, args.decode_cache, args.repeats, cache_kinds)
        # The copy's read + write rate is what the memory moves; a read-only stream gets about the
        # same (the decode kernel reads the cache at 2.9 TB/s on an H100), not half of it.
        floors[name] = decode_floor_ms(model, args.decode_cache, bandwidth)
        if args.profile:
            kernel_breakdown(model, name, args.profile)
        if args.profile_decode:
            for cache_kind in cache_kinds:
                decode_breakdown(model, name, args.decode_cache, cache_kind)
        del model
        torch.cuda.empty_cache()
    for row in rows:
        if row["kind"] == "decode":
            row["floor_ms"] = floors[row["model"]]
            print(f"{row['model']:14s} decode {row['cache']:12s} {row['ms']:7.2f} ms = {row['ms'] / row['floor_ms']:5.2f}x "
                  f"the floor of reading cache and weights once ({row['floor_ms']:.2f} ms)")
    for kind, t in sorted({(r["kind"], r["T"]) for r in rows}):
        llama = next((r for r in rows if (r["kind"], r["T"], r["model"]) == (kind, t, "llama-sdpa")), None)
        if llama is None:
            continue
        for name in [name for name in ("sb-random", "sb-long-range") if name in args.models.split(",")]:
            sb = [r for r in rows if (r["kind"], r["T"], r["model"]) == (kind, t, name)][-1]
            line = f"{name:14s} {kind:8s} T={t:<6d} time {sb['ms'] / llama['ms']:5.2f}x llama's"
            if "peak_extra_bytes" in sb:
                line += f", peak memory {sb['peak_extra_bytes'] / llama['peak_extra_bytes']:5.2f}x"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
