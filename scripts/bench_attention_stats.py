"""What collecting attention statistics costs: the stick-breaking model's forward pass with and
without them, on one GPU, the released 3B's shapes, random weights, bf16, batch 1.

    python scripts/bench_attention_stats.py [--lengths 16384] [--repeats 5] [--softmax] [--json out.json]

Times one decoder forward (no logits, no cache; what `sb-eval distance` runs per window) as the
median of --repeats runs, with statistics off and on (every query position, the costlier
choice), and the peak memory the CUDA allocator held beyond the inputs in each. Both weight
variants of scripts/bench_model.py run: random weights (the stick is used up within a few dozen
keys and early halting skips the rest) and "long-range" (every logit -10: nothing is skipped).
The target: statistics add at most 10% time and O(T) memory. --softmax adds the same-shaped
Llama with SDPA, whose statistics take a separate blocked pass over the keys (expected to cost a
multiple of SDPA's time: they are an analysis tool, not part of evaluation).
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_model import llama_model, median_ms_and_peak, run_header, stick_breaking_model

from sb_eval.analysis.attention_stats import collecting_attention_statistics


def measure(model, name: str, lengths: list[int], repeats: int) -> list[dict]:
    def decoder_forward(ids: torch.Tensor) -> None:
        model.base_model(input_ids=ids, use_cache=False)

    rows = []
    for t in lengths:
        ids = torch.randint(0, model.config.vocab_size, (1, t), device="cuda")
        plain_ms, plain_peak = median_ms_and_peak(decoder_forward, ids, repeats)
        with collecting_attention_statistics(model, "all") as collected:
            stats_ms, stats_peak = median_ms_and_peak(decoder_forward, ids, repeats)
        row = {
            "model": name, "T": t, "ms": plain_ms, "ms_with_stats": stats_ms,
            "time_ratio": stats_ms / plain_ms, "peak_extra_bytes": plain_peak,
            "peak_extra_bytes_with_stats": stats_peak, "model_mean": collected.to_dict()["model_mean"],
        }
        rows.append(row)
        print(
            f"{name:14s} T={t:<6d} {plain_ms:9.1f} ms  with statistics {stats_ms:9.1f} ms "
            f"({row['time_ratio']:5.3f}x)  peak extra {plain_peak / 2**30:6.2f} -> {stats_peak / 2**30:6.2f} GiB",
            flush=True,
        )
        del ids
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="16384")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--softmax", action="store_true", help="also the same-shaped Llama with SDPA")
    parser.add_argument("--json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    header = run_header()
    print(json.dumps(header))
    builds = {"sb-random": stick_breaking_model, "sb-long-range": lambda: stick_breaking_model(long_range=True)}
    if args.softmax:
        builds["llama-sdpa"] = llama_model
    rows = []
    for name, build in builds.items():
        model = build()
        rows += measure(model, name, lengths, args.repeats)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
