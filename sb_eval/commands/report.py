"""`sb-eval report`: RULER's report of lm-eval runs and sweeps.

    sb-eval report runs/model-a runs/model-b --output report/

Reads lm-eval output folders (run with --log_samples for per-sample intervals and depths) and
sweep folders (results.jsonl); writes report.md (tables per task and the RULER average with 95 %
bootstrap intervals, lengths in numeric order, one column per model, the paired difference of
two models, the effective length), ruler-average.png, depth-<task>-<model>.png and RULER's
summary.csv per model and length. The reading, statistics and drawing are
sb_eval.reports.ruler's.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import usage_error

# sb_eval.reports.ruler's defaults, repeated so that --help loads nothing heavy (a test checks that
# they agree).
DEFAULT_THRESHOLD = 85.6
DEFAULT_RESAMPLES = 1000


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb-eval report",
        description="RULER's report of lm-eval output folders (--output_path; with --log_samples for intervals "
        "and depths) and sweep folders (results.jsonl): OUTPUT/report.md, OUTPUT/ruler-average.png, "
        "OUTPUT/depth-<task>-<model>.png, OUTPUT/summary-<model>-<length>.csv (RULER's summary.csv layout).",
        epilog="One or two models (two are compared: their difference, paired where they answered the same "
        "prompts). Exit status: 0 on success, 2 for arguments or folders that hold no RULER results.",
    )
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="lm-eval output folders and sweep folders")
    parser.add_argument("--output", required=True, type=Path, help="folder for the report (created)")
    parser.add_argument("--threshold", type=_score, default=DEFAULT_THRESHOLD,
                        help=f"the score the effective length is measured against (default {DEFAULT_THRESHOLD}, RULER's)")
    parser.add_argument("--bootstrap", type=_positive, default=DEFAULT_RESAMPLES, metavar="N",
                        help=f"bootstrap resamples per interval (default {DEFAULT_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    return parser


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a score from 0 to 100")
    return value


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of resamples")
    return int(text)


def main(argv: list[str]) -> int:
    """Runs `sb-eval report ARGS`; returns 0, or 2 for arguments or folders it cannot use."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from sb_eval.reports.ruler import write_report  # matplotlib: only once the arguments are parsed

    try:
        written = write_report(args.paths, args.output, args.threshold, args.bootstrap, args.seed)
    except (FileNotFoundError, ValueError) as error:
        return usage_error(parser, error)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0
