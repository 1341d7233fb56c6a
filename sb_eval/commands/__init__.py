"""The `sb-eval` subcommands (sb_eval.cli dispatches to them): each module builds its parser with
the standard library alone, so that `--help` is fast, and imports the work it drives once its
arguments are parsed."""
