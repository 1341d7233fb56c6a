"""The whole `lm_eval` path on one GPU: RULER NIAH through lm-eval with a stick-breaking model of the
released 3B's shapes (`sb_hf`) beside a same-shaped Llama with SDPA (`hf`), random weights, bf16.

    python scripts/bench_eval.py [--lengths 4096,16384,65536] [--samples 1] [--max-gen-toks 16] \\
        [--batch-sizes 1,8 --batched-lengths 4096] [--decode-graphs] [--json out.json]

For each model, length and batch size: one `simple_evaluate` of `ruler_niah` (8 tasks x --samples
prompts), timed end to end, with the wall time spent inside the model's forward passes summed (a
forward hook synchronizes the GPU at both ends of every call) and the time inside lm-eval's
`evaluate` (building, running and scoring the requests) apart from simple_evaluate's fixed cost
around it (loading the tasks, collecting the environment for the results). Reported: prompts per
second and the share of the time outside the forward passes (the harness: requests,
tokenization, generate's loop, scoring), of the whole run and of `evaluate` alone: the fixed cost
is paid once per run, however many prompts it has. The RULER samples are generated and cached
before, and that time is reported apart.
With several batch sizes (run at --batched-lengths only; the others take the first), the answers of
each are compared with the first's.

"sb-long-range" fixes every head's logits at -10, so that no key can be skipped (bench_model.py);
with random weights ("sb-random") early halting skips nearly everything. The tokenizer is the
packaged checkpoint's (8192 ids, within the 3B's 50304). Needs the essays (sb-eval data fetch
essays) and lm-eval.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from lm_eval import evaluator, simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import sb_eval_hook  # noqa: E402
from bench_model import llama_model, run_header, stick_breaking_model  # noqa: E402  (scripts/bench_model.py)

from sb_eval.data import DEFAULT_CHECKPOINT  # noqa: E402
from sb_eval.harness.stick_breaking_lm import StickBreakingLM  # noqa: E402
from sb_eval.ruler.generate import generate  # noqa: E402
from sb_eval.ruler.registry import TASKS  # noqa: E402
from sb_eval.tasks.task_files import RULER_GROUPS, RULER_TASKS  # noqa: E402

NIAH_TASKS = RULER_GROUPS["ruler_niah"][1]


class ForwardTimer:
    """Sums the wall time spent inside a module's forward calls, the GPU synchronized at both ends."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._before), module.register_forward_hook(self._after)]

    def _before(self, module, args) -> None:
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _after(self, module, args, output) -> None:
        torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def prepare_samples(tokenizer, lengths: list[int], samples: int) -> float:
    """Generates and caches every NIAH set the runs will read; returns the seconds it took."""
    start = time.perf_counter()
    for task in NIAH_TASKS:
        for length in lengths:
            generate(TASKS[RULER_TASKS[task]], length, tokenizer, samples)
    return time.perf_counter() - start


def evaluate(lm, length: int, samples: int, max_gen_toks: int) -> tuple[dict, float, float, list]:
    """One lm-eval run of ruler_niah at `length`: (its results, seconds in all, seconds inside
    lm-eval's evaluate, the answers in order)."""
    metadata = {"max_seq_lengths": [length], "num_samples": samples, "tokenizer": str(DEFAULT_CHECKPOINT)}
    manager = TaskManager(include_path=str(sb_eval_hook.task_folder()), include_defaults=False, metadata=metadata)
    evaluate_durations = []
    run_requests = evaluator.evaluate

    def timed_evaluate(*args, **kwargs):
        began = time.perf_counter()
        try:
            return run_requests(*args, **kwargs)
        finally:
            evaluate_durations.append(time.perf_counter() - began)

    evaluator.evaluate = timed_evaluate  # simple_evaluate looks it up in its module at each call
    try:
        start = time.perf_counter()
        results = simple_evaluate(
            model=lm, tasks=["ruler_niah"], task_manager=manager, gen_kwargs=f"max_gen_toks={max_gen_toks}", log_samples=True,
        )
        seconds = time.perf_counter() - start
    finally:
        evaluator.evaluate = run_requests
    if not evaluate_durations:
        raise RuntimeError("simple_evaluate did not call lm_eval.evaluator.evaluate: this lm-eval runs its requests elsewhere")
    answers = [sample["resps"] for task in NIAH_TASKS for sample in results["samples"][task]]
    return results, seconds, sum(evaluate_durations), answers


def harness_model(name: str, model, tokenizer, max_length: int, batch_size: int, decode_graphs: bool):
    if name.startswith("sb"):
        return StickBreakingLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                               decode_graphs=decode_graphs)
    return HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--samples", type=int, default=1, help="prompts per NIAH task and length")
    parser.add_argument("--max-gen-toks", type=int, default=16, help="generation budget (RULER's is 128)")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated; the first is the reference for answers")
    parser.add_argument("--batched-lengths", default="4096", help="lengths at which the batch sizes after the first run too")
    parser.add_argument("--models", default="sb-random,sb-long-range,llama-sdpa")
    parser.add_argument("--decode-graphs", action="store_true", help="sb_hf with decode_graphs=true")
    parser.add_argument("--json")
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lengths = [int(x) for x in args.lengths.split(",")]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    batched_lengths = {int(x) for x in args.batched_lengths.split(",") if x}
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    header = run_header()
    header["sample_generation_seconds"] = prepare_samples(tokenizer, lengths, args.samples)
    print(json.dumps(header), flush=True)
    builds = {
        "sb-random": stick_breaking_model,
        "sb-long-range": lambda: stick_breaking_model(long_range=True),
        "llama-sdpa": llama_model,
    }
    rows = []
    for name in args.models.split(","):
        model = builds[name]()
        timer = ForwardTimer(model)
        for length in lengths:
            reference = None
            for batch_size in batch_sizes if length in batched_lengths else batch_sizes[:1]:
                lm = harness_model(name, model, tokenizer, max(length, 4096), batch_size, args.decode_graphs)
                timer.seconds, timer.calls = 0.0, 0
                results, seconds, evaluate_seconds, answers = evaluate(lm, length, args.samples, args.max_gen_toks)
                prompts = len(answers)
                row = {
                    "model": name, "decode_graphs": args.decode_graphs and name.startswith("sb"), "T": length,
                    "batch_size": batch_size, "prompts": prompts, "seconds": seconds,
                    "prompts_per_s": prompts / seconds, "forward_seconds": timer.seconds, "forward_calls": timer.calls,
                    "outside_forward_share": 1 - timer.seconds / seconds,
                    "evaluate_seconds": evaluate_seconds, "evaluate_outside_forward_share": 1 - timer.seconds / evaluate_seconds,
                    "score": results["results"]["ruler_niah"].get(f"{length},none"),
                }
                if reference is None:
                    reference = answers
                else:
                    row["same_answers_as_first_batch_size"] = answers == reference
                rows.append(row)
                print(f"{name:14s} T={length:<6d} batch {batch_size:<3d} {prompts} prompts in {seconds:7.1f} s = "
                      f"{row['prompts_per_s']:6.2f}/s, outside forward passes {100 * row['outside_forward_share']:5.1f}% "
                      f"({100 * row['evaluate_outside_forward_share']:.1f}% of lm-eval's evaluate, {evaluate_seconds:.1f} s; "
                      f"fixed cost around it {seconds - evaluate_seconds:.1f} s)"
                      + (f", same answers: {row['same_answers_as_first_batch_size']}" if "same_answers_as_first_batch_size" in row else ""),
                      flush=True)
                if args.json:  # after every row: a later out-of-memory loses nothing measured
                    Path(args.json).write_text(json.dumps({"header": header, "rows": rows}, indent=1))
                del lm
                torch.cuda.empty_cache()
        timer.remove()
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
