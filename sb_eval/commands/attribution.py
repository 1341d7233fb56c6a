"""`sb-eval attribution`: where each head looked when the model answered RULER and MQRAR samples.

    sb-eval attribution --model sb_hf --compare hf:pretrained=SOFTMAX_FOLDER \\
        --tasks ruler_niah,sb_ruler_vt,mqrar --lengths 1K,4K,16K --num_samples 10 --output runs/attribution

For every sample the model answers greedily; per layer and head, the attention of the query that
produced each attributed answer token is split over the needles (the statements that hold the
answers), distractors, the question, the answer so far, the rest of the context and
stick-breaking's remainder (sb_eval.analysis.attribution has the definitions; docs/attribution.md
the JSON schema). Writes OUTPUT/<label>.json per model (rewritten after every batch; a rerun
resumes it), OUTPUT/summary.md and the plots it shows. A model that cannot be measured is
reported and skipped; the exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import usage_error

DEFAULT_THRESHOLD = 0.1
PAPER_MQRAR_PAIRS = "32,64,96,128,160,192"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb-eval attribution",
        description="Needle attention attribution: per layer and head, how much of the answering query's attention "
        "fell on each needle, the distractors, the question, the answer so far, the rest of the context and the "
        "remainder; for each sample its depth, length and whether it was answered correctly. Writes "
        "OUTPUT/<label>.json per model, OUTPUT/summary.md and plots.",
        epilog="Resuming: run the same command again; samples a model's JSON already holds are kept. Exit status: 0, "
        "or 2 for arguments that cannot work or a model that could not be measured.",
    )
    parser.add_argument("--model", default="sb_hf", choices=("sb_hf", "hf"), help="sb_hf (stick-breaking) or hf (softmax)")
    parser.add_argument("--model_args", default="",
                        help="as lm_eval's: pretrained=PATH[,key=value...]; sb_hf without pretrained takes the packaged checkpoint")
    parser.add_argument("--compare", metavar="NAME:ARGS", help="a second model, e.g. hf:pretrained=/path/to/softmax-twin,max_length=65536")
    parser.add_argument("--tasks", required=True, help="comma-separated: ruler_niah, sb_niah_*, sb_ruler_vt, mqrar")
    parser.add_argument("--lengths", required=True, help="comma-separated context lengths in tokens (MQRAR: symbols), e.g. 1K,4K,16K")
    parser.add_argument("--num_samples", type=int, default=10, help="samples per task and length (default 10)")
    parser.add_argument("--seed", type=int, default=42, help="the tasks' sample seed (default 42, as the tasks)")
    parser.add_argument(
        "--answer_tokens", default="1",
        help="answer tokens to attribute per sample: a number, or all (default 1: the query that produced the first)",
    )
    parser.add_argument("--max_new_tokens", type=int, help="cap on generated tokens (default: each task's RULER budget; MQRAR: its answer)")
    parser.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD,
        help=f"a needle counts as attended when one head puts at least this share of its attention on it (default {DEFAULT_THRESHOLD})",
    )
    parser.add_argument("--mqrar_pairs", default=PAPER_MQRAR_PAIRS, help=f"MQRAR key-value pair counts, taken in turn (default {PAPER_MQRAR_PAIRS})")
    parser.add_argument("--device", help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", help="as lm-eval's dtype model arg: float32, bfloat16, float16 or auto")
    parser.add_argument("--batch_size", type=int, default=1, help="samples per generate call (default 1)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results (created; reused to resume)")
    return parser


def main(argv: list[str]) -> int:
    """Runs `sb-eval attribution ARGS`; returns 0, or 2 for arguments or a model that cannot work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch, lm-eval and matplotlib: only once the arguments are parsed (--help stays fast)
    from sb_eval.analysis.attention_stats import UnsupportedArchitectureError
    from sb_eval.files import write_atomically
    from sb_eval.harness import attribution
    from sb_eval.model.checks import CheckpointError
    from sb_eval.reports.attribution import (
        DEPTH_FILE,
        FOUND_FILE,
        HEADS_FILE,
        SUMMARY_FILE,
        depth_png,
        found_png,
        heads_png,
        summary_markdown,
    )
    from sb_eval.ruler.corpora import MissingCorpusError

    try:
        models, arguments, labels, settings = attribution.prepare(args)
    except attribution.AttributionArgumentError as error:
        return usage_error(parser, error)

    documents, failures = [], {}
    try:
        for model, model_args, label in zip(models, arguments, labels):
            try:
                document = attribution.attribute_model(model, model_args, label, settings, args.output)
            except (attribution.AttributionArgumentError, attribution.AttributionError, UnsupportedArchitectureError,
                    CheckpointError, MissingCorpusError) as error:
                failures[label] = str(error)
                print(f"sb-eval attribution: error: {model.name} with {model.args or '(defaults)'}: {error}", file=sys.stderr)
                continue
            except BaseException as error:  # reported in the summary, then raised as it is
                failures[label] = f"{type(error).__name__}: {error}"
                raise
            print(f"wrote {args.output / (label + '.json')}", file=sys.stderr)
            documents.append(document)
    finally:
        # what was measured is kept even when a later model fails
        if documents:
            write_atomically(args.output / DEPTH_FILE, depth_png(documents))
            write_atomically(args.output / HEADS_FILE, heads_png(documents))
            write_atomically(args.output / FOUND_FILE, found_png(documents))
            write_atomically(args.output / SUMMARY_FILE, summary_markdown(documents, failures).encode())
            print(f"wrote {args.output / SUMMARY_FILE}", file=sys.stderr)
    return 2 if failures else 0
