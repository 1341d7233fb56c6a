"""What sb-eval adds to the start-up of Python processes: the lm-eval hook in every one, and the
`sb-eval` command's help.

    python scripts/bench_startup.py [--runs 30]

Runs `python -X importtime -c pass` repeatedly and reports the median import time of the
`sb_eval_hook` module (imported by sb_eval_hook.pth at start-up) beside the median total of
the modules imported at start-up; then the median wall time of `sb-eval --help` and of each
subcommand's `--help` (python -m sb_eval.cli).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def import_times(code: str) -> tuple[dict[str, int], int]:
    """(module -> cumulative import time, total of the top-level imports), in microseconds, from
    one `-X importtime` run."""
    stderr = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True
    ).stderr
    times, total = {}, 0
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line.removeprefix("import time:").split("|")
            times[name.strip()] = int(cumulative)
            if not name[1:].startswith(" "):  # nested imports are inside their parent's time
                total += int(cumulative)
    return times, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    runs = [import_times("pass") for _ in range(args.runs)]
    if "sb_eval_hook" not in runs[0][0]:
        sys.exit("sb_eval_hook is not imported at start-up: is sb-eval installed (not editable)?")
    hook = statistics.median(times["sb_eval_hook"] for times, _ in runs)
    total = statistics.median(total for _, total in runs)
    print(f"python {sys.version.split()[0]}: start-up imports {total / 1000:.2f} ms in all, "
          f"of which sb_eval_hook {hook / 1000:.3f} ms (median of {args.runs} runs)")
    for command in ([], ["sweep"], ["distance"], ["data"], ["run"]):
        seconds = statistics.median(help_seconds(command) for _ in range(max(3, args.runs // 10)))
        print(f"sb-eval {' '.join(command + ['--help'])}: {seconds:.2f} s")


def help_seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sb_eval.cli", *command, "--help"], capture_output=True, check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
