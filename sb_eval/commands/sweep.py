"""`sb-eval sweep`: models x tasks x context lengths through lm-eval, one JSON line per point.

    sb-eval sweep --model sb_hf --model_args pretrained=A --compare hf:pretrained=B \\
        --tasks ruler_niah,sb_ruler_vt --lengths 2048,4096,8192 --output runs/a-vs-b

The arguments and their checks are here; sb_eval.harness.sweep runs the points, resumably.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import usage_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb-eval sweep",
        description="Evaluate models on tasks at several context lengths with lm-eval: one JSON line per "
        "(model, task, length) in OUTPUT/results.jsonl as each finishes, then OUTPUT/summary.md and "
        "OUTPUT/plots/<task>.png.",
        epilog="Resuming: run the same command again. Points with a result in results.jsonl are skipped; "
        "points whose row is an error (out of memory, a failed sample, ...) are retried; the file is only "
        "appended to. A folder's results must all come from the same --metadata, --limit and --gen_kwargs. "
        "Exit status: 0 when every point has a result, 1 when some ended in an error row, 2 for bad "
        "arguments, 130 when interrupted (Ctrl-C stops cleanly, without a row for the point it was running).",
    )
    parser.add_argument("--model", default="sb_hf", help="lm-eval model name (default sb_hf)")
    parser.add_argument("--model_args", default="",
                        help="its arguments, as lm_eval's: pretrained=PATH[,key=value...] (sb_hf without pretrained "
                             "evaluates the checkpoint that ships in the package)")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME:ARGS",
        help="another model to run the same points, e.g. hf:pretrained=PATH (repeatable)",
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups, e.g. ruler_niah,sb_ruler_vt")
    parser.add_argument("--lengths", required=True, help="comma-separated context lengths in tokens, e.g. 2048,4096 or 2K,4K")
    parser.add_argument("--output", required=True, type=Path, help="results folder (created; reused to resume)")
    parser.add_argument(
        "--metadata", default="{}",
        help='JSON object passed to every task, e.g. \'{"num_samples": 100}\'; the sweep sets max_seq_lengths itself',
    )
    parser.add_argument("--train_length", type=int, help="the models' training context length, marked in the plots")
    parser.add_argument("--device", help="as lm_eval's --device (default: cuda when there is one)")
    parser.add_argument("--batch_size", default="1", help="as lm_eval's --batch_size: a number, auto or auto:N")
    parser.add_argument("--max_batch_size", type=int, help="as lm_eval's --max_batch_size")
    parser.add_argument("--limit", help="as lm_eval's --limit: samples per point (below 1: a fraction)")
    parser.add_argument("--gen_kwargs", default="", help="as lm_eval's --gen_kwargs, e.g. max_gen_toks=32")
    parser.add_argument(
        "--include_path", action="append", default=[], type=Path,
        help="a folder of your own task YAMLs (repeatable), as lm_eval's --include_path",
    )
    return parser


def main(argv: list[str]) -> int:
    """Runs `sb-eval sweep ARGS`; returns 0 when every point has a result, 1 when some ended in an
    error row, 2 for bad arguments, 130 when interrupted."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sb_eval.harness import sweep  # lm-eval and torch: only once the arguments are parsed (--help stays fast)

    try:
        points, rows, loader, settings = sweep.prepare(args)
    except sweep.SweepArgumentError as error:
        return usage_error(parser, error)
    return sweep.run_sweep(points, rows, loader, settings)
