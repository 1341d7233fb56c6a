"""The `sb-eval` subcommands (sb_eval.cli dispatches to them): each module builds its parser with
the standard library alone, so that `--help` is fast, and imports the work it drives once its
arguments are parsed."""

import argparse
import sys


def usage_error(parser: argparse.ArgumentParser, error: Exception) -> int:
    """An argument that cannot work, reported as argparse reports its own (usage, then
    "PROG: error: ..."), but returned as exit status 2 rather than raised as SystemExit."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {error}", file=sys.stderr)
    return 2
