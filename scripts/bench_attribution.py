"""What needle attention attribution costs: greedy generation with and without it, in one run.

    python scripts/bench_attribution.py [--model default|3b|3b-long-range] [--length 16384]
        [--new-tokens 32] [--repeats 5] [--device cuda] [--json out.json]

One RULER niah_single_1 prompt (the noise haystack: no corpus needed) fitted to --length tokens
of the default checkpoint's tokenizer, its needle located as `sb-eval attribution` locates it,
then model.generate (prefill + --new-tokens greedy steps, never stopping early) three ways,
alternated within each repeat: plain; attributing the first answer token (the default: one extra
last-row attention call per layer in the prefill); attributing every answer token (the span mass
fused into each decode step's attention). Each time is the median of --repeats; on CUDA the peak
memory the allocator held beyond the model and prompt is given too. The target: at most 10% over
plain generation at 16K, memory O(T).

Models: the packaged 17M stick-breaking checkpoint (default), or the released 3B's shapes with
random weights ("3b": early halting skips most keys; "3b-long-range": every logit -10, nothing
skipped; scripts/bench_model.py builds both). CUDA runs bf16 with the triton backend; the CPU
(for a quick check at short lengths) float32 with the torch backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoTokenizer

from sb_eval.analysis.attribution import collecting_span_mass
from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.harness.attributed_answers import batch_span_indices, prompt_layout
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import TASKS

TASK = "niah_single_1"


def load_model(name: str, device: str) -> torch.nn.Module:
    if name == "default":
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = StickBreakingForCausalLM.from_pretrained(str(DEFAULT_CHECKPOINT), dtype=dtype).to(device)
    else:
        from bench_model import stick_breaking_model  # the released 3B's shapes, on CUDA

        model = stick_breaking_model(long_range=name == "3b-long-range")
    model.set_attention_backend("triton" if device == "cuda" else "torch")
    return model.eval()


def timed(run, device: str) -> tuple[float, int]:
    """(seconds, peak bytes the allocator held beyond what it held before; 0 on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    return time.perf_counter() - start, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("default", "3b", "3b-long-range"), default="default")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    sample = generate(TASKS[TASK], args.length, tokenizer, 1, use_cache=False)[0]
    encoding = tokenizer([sample["input"]], return_tensors="pt")
    ids, mask = encoding["input_ids"], encoding["attention_mask"]
    layout = prompt_layout(tokenizer, TASKS[TASK].generator, sample["input"], sample["outputs"], ids[0].tolist())
    span_indices, num_spans = batch_span_indices([layout], mask)
    model = load_model(args.model, args.device)
    ids, mask, span_indices = ids.to(args.device), mask.to(args.device), span_indices.to(args.device)

    def generation():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def attributed(steps: int):
        def run():
            recorder.start(span_indices, num_spans, steps)
            generation()
            recorder.finish()
        return run

    variants = {"plain": generation}
    with collecting_span_mass(model) as recorder:
        variants["first answer token"] = attributed(1)
        variants["every answer token"] = attributed(args.new_tokens)
        for run in variants.values():  # warm-up: kernels compiled, allocator primed
            run()
        times = {name: [] for name in variants}
        peaks = {name: 0 for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                seconds, peak = timed(run, args.device)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"{args.model} model, {ids.shape[1]} prompt tokens + {args.new_tokens} generated, {device}, median of {args.repeats}")
    plain = statistics.median(times["plain"])
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        rows.append({"variant": name, "seconds": median, "ratio": median / plain, "peak_extra_bytes": peaks[name]})
        print(f"  {name:20s} {median * 1000:10.1f} ms  {median / plain:6.3f}x  peak extra {peaks[name] / 2**20:9.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens,
                       "device": device, "repeats": args.repeats, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
