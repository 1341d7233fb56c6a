"""`sb-eval distance`: how far back each attention head looks on natural text, per layer and head.

    sb-eval distance --model sb_hf --model_args pretrained=SB_CHECKPOINT \\
        --compare hf:pretrained=LLAMA_FOLDER --corpus aa-lcr --length 2048 --windows 64 \\
        --output runs/distance

Each model's tokenizer cuts the corpus's documents into non-overlapping windows of --length
tokens (a window never spans two documents unless --join_documents; the first --windows of them,
in corpus order). One
forward pass per batch of windows collects, for every layer and head, the attention-weighted
distance in tokens back and the attended mass, averaged over the chosen query positions
(sb_eval.analysis.attention_stats has the definitions; sb_eval.harness.distance measures,
sb_eval.reports.distance draws). Writes OUTPUT/<label>.json and OUTPUT/<label>.png
(layers x heads) per model, OUTPUT/summary.md, and with two models OUTPUT/comparison.png.
A model that cannot be measured (an architecture the statistics do not cover, a checkpoint that
is not what --model expects) is reported and skipped: the other model's files and the summary of
what was measured are still written, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sb_eval.analysis.definitions import POSITIONS, REMAINDER_CONVENTIONS, SIGN_NOTE

from . import usage_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb-eval distance",
        description="Attention-weighted distance (tokens back) and attended mass per layer and head, "
        "averaged over windows of a corpus. Writes OUTPUT/<label>.json, OUTPUT/<label>.png per model, "
        "OUTPUT/summary.md and, with --compare, OUTPUT/comparison.png.",
        epilog=f"Sign: {SIGN_NOTE}.",
    )
    parser.add_argument("--model", default="sb_hf", choices=("sb_hf", "hf"), help="sb_hf (stick-breaking) or hf (softmax, e.g. Llama)")
    parser.add_argument("--model_args", required=True, help="as lm_eval's: pretrained=PATH[,key=value...]; PATH a local folder")
    parser.add_argument("--compare", metavar="NAME:ARGS", help="a second model, e.g. hf:pretrained=/path/to/llama")
    parser.add_argument(
        "--corpus", required=True,
        help="a fetched corpus name (sb-eval data list), a .txt/.jsonl file or folder, or hf:NAME[:CONFIG[:SPLIT]]",
    )
    parser.add_argument("--length", required=True, type=int, help="window length in tokens")
    parser.add_argument(
        "--join_documents", action="store_true",
        help="cut windows from the documents run together (corpora of short rows, e.g. Wikitext); "
        "by default a window never spans two documents",
    )
    parser.add_argument("--windows", type=int, default=32, help="how many windows per model (default 32)")
    parser.add_argument("--positions", choices=POSITIONS, default="last", help="query positions averaged over (default last)")
    parser.add_argument(
        "--remainder", choices=REMAINDER_CONVENTIONS, default="ignore",
        help="where stick-breaking's remainder goes in the reported distance (default ignore); the JSON has all three",
    )
    parser.add_argument("--device", help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", help="as lm-eval's dtype model arg: float32, bfloat16, float16 or auto")
    parser.add_argument("--batch_size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results (created)")
    return parser


def main(argv: list[str]) -> int:
    """Runs `sb-eval distance ARGS`; returns 0, or 2 for arguments, a corpus or a model that
    cannot work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch, lm-eval and matplotlib: only once the arguments are parsed (--help stays fast)
    from sb_eval.analysis.attention_stats import UnsupportedArchitectureError
    from sb_eval.data.documents import DocumentSourceError
    from sb_eval.files import write_atomically
    from sb_eval.harness import distance
    from sb_eval.harness.compared_models import file_labels
    from sb_eval.model.checks import CheckpointError
    from sb_eval.reports.distance import COMPARISON_FILE, SUMMARY_FILE, heatmap_png, summary_markdown
    from sb_eval.ruler.corpora import MissingCorpusError

    try:
        models, arguments, texts = distance.prepare(args)
    except (distance.DistanceArgumentError, DocumentSourceError, MissingCorpusError) as error:
        return usage_error(parser, error)

    results, failures = [], {}
    try:
        for model, model_args, label in zip(models, arguments, file_labels(models)):
            try:
                result = distance.measure_model(model, model_args, label, texts, args)
            except (distance.DistanceArgumentError, UnsupportedArchitectureError, CheckpointError) as error:
                failures[label] = str(error)
                print(f"sb-eval distance: error: {model.name} with {model.args}: {error}", file=sys.stderr)
                continue
            except BaseException as error:  # reported in the summary, then raised as it is
                failures[label] = f"{type(error).__name__}: {error}"
                raise
            path = args.output / f"{label}.json"
            write_atomically(path, (json.dumps(result, indent=1) + "\n").encode())
            write_atomically(args.output / f"{label}.png", heatmap_png([result], args.remainder))
            print(f"wrote {path}", file=sys.stderr)
            results.append(result)
    finally:
        # what was measured is kept even when a later model fails
        if results:
            if len(results) == 2:
                write_atomically(args.output / COMPARISON_FILE, heatmap_png(results, args.remainder))
            write_atomically(args.output / SUMMARY_FILE, summary_markdown(results, args, failures).encode())
            print(f"wrote {args.output / SUMMARY_FILE}", file=sys.stderr)
    return 2 if failures else 0
