"""The paper's MQRAR experiment (Figure 3): stick-breaking vs softmax+RoPE as the number of
key-value pairs grows, best learning rate per point.

    python scripts/mqrar_grid.py --output runs/mqrar --steps 2000

Both models: 2 layers, hidden 256, 1 head, sequences of 768 tokens; pairs 32..192 in steps of 32;
learning rates {1e-4, 10^(-10/3), 10^(-8/3), 1e-2}. Each run is `scripts/train.py` in its own
process (several at once; on an H100 they shared the GPU without adding up to more throughput);
runs go to OUTPUT/steps{S}-batch{B}-pool{P}-warmup{W}-seed{N}/, and a finished run there is not
redone, so an interrupted grid resumes and other settings never reuse its models.
The best model of each point is then evaluated through lm-eval's `mqrar` task (`sb_hf` or `hf`)
on fresh sequences. The settings folder gets grid.json (every run's final held-out accuracy),
mqrar.md (best accuracy per pair count, and lm-eval's) and mqrar.png.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from sb_eval.files import write_atomically

PAIRS = (32, 64, 96, 128, 160, 192)
LEARNING_RATES = (1e-4, 10 ** (-10 / 3), 10 ** (-8 / 3), 1e-2)
ATTENTIONS = ("softmax", "stickbreaking")
LABELS = {"softmax": "softmax + RoPE", "stickbreaking": "stick-breaking"}
TRAIN_SCRIPT = Path(__file__).with_name("train.py")


def run_name(attention: str, pairs: int, lr: float) -> str:
    return f"{attention}-kv{pairs}-lr{lr:.2e}"


def train_one(output: Path, attention: str, pairs: int, lr: float, args: argparse.Namespace) -> dict:
    """One training run in a subprocess; returns its row for grid.json (with its error, if any)."""
    folder = output / run_name(attention, pairs, lr)
    command = [
        sys.executable, str(TRAIN_SCRIPT), "--attention", attention, "--data", "mqrar",
        "--num-pairs", str(pairs), "--seq-length", "768", "--layers", "2", "--hidden", "256", "--heads", "1",
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", repr(lr),
        "--warmup-steps", str(args.warmup_steps), "--eval-every", str(args.steps), "--save-every", str(args.steps),
        "--pool-size", str(args.pool_size), "--seed", str(args.seed), "--output", str(folder),
        "--attention-backend", args.attention_backend, *(["--device", args.device] if args.device else []),
    ]
    started = time.perf_counter()
    if not (folder / "model").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "train.out").open("w") as out:
            finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
        if finished.returncode != 0:
            tail = (folder / "train.out").read_text().strip().splitlines()[-3:]
            return {"attention": attention, "pairs": pairs, "lr": lr, "error": " | ".join(tail)}
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    final = [row for row in log if "eval_accuracy" in row][-1]
    speeds = [row["tokens_per_s"] for row in log if "tokens_per_s" in row]
    return {
        "attention": attention, "pairs": pairs, "lr": lr, "steps": final["step"],
        "accuracy": final["eval_accuracy"], "eval_loss": final["eval_loss"],
        "tokens_per_s": speeds[-1] if speeds else None, "wall_s": time.perf_counter() - started,
    }


def harness_accuracy(output: Path, row: dict, samples: int) -> float | str:
    """The trained model's accuracy through lm-eval's `mqrar` task (sb_hf or hf, as a user would
    run it) on `samples` fresh sequences of its pair count; an error message if the run failed."""
    folder = output / run_name(row["attention"], row["pairs"], row["lr"])
    results_folder = folder / "harness"
    model = "sb_hf" if row["attention"] == "stickbreaking" else "hf"
    metadata = {"num_pairs": [row["pairs"]], "seq_length": 768, "num_samples": samples}
    command = [
        sys.executable, "-m", "sb_eval.cli", "run", "--model", model,
        "--model_args", f"pretrained={folder / 'model'}", "--tasks", "mqrar",
        "--metadata", json.dumps(metadata), "--batch_size", "16", "--output_path", str(results_folder),
    ]
    with (folder / "harness.out").open("w") as out:
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        return "failed: " + " | ".join((folder / "harness.out").read_text().strip().splitlines()[-2:])
    try:
        results = json.loads(max(results_folder.rglob("results_*.json"), key=os.path.getmtime).read_text())
        return results["results"]["mqrar"]["acc,none"]
    except (ValueError, KeyError, OSError) as error:  # no results file, or not the expected metric
        return f"failed: lm-eval's results in {results_folder} are unreadable ({type(error).__name__}: {error})"


def best_per_point(rows: list[dict]) -> dict[tuple[str, int], dict]:
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["attention"], row["pairs"])
        if "accuracy" in row and (key not in best or row["accuracy"] > best[key]["accuracy"]):
            best[key] = row
    return best


def write_report(rows: list[dict], output: Path, steps: int, pairs: list[int], learning_rates: list[float]) -> None:
    best = best_per_point(rows)
    lines = [
        f"| pairs | {' | '.join(LABELS[a] for a in ATTENTIONS)} |",
        f"|---|{'---|' * len(ATTENTIONS)}",
    ]
    for count in pairs:
        cells = []
        for attention in ATTENTIONS:
            row = best.get((attention, count))
            if row is None:
                cells.append("failed")
                continue
            harness = row.get("harness_accuracy")
            through_harness = (
                "" if harness is None else f", lm-eval {harness:.3f}" if isinstance(harness, float) else ", lm-eval failed"
            )
            cells.append(f"{row['accuracy']:.3f} (lr {row['lr']:.1e}{through_harness})")
        lines.append(f"| {count} | {' | '.join(cells)} |")
    errors = [row for row in rows if "error" in row]
    text = (
        f"Best held-out accuracy over the learning rates {', '.join(f'{lr:.2e}' for lr in learning_rates)}, {steps} steps each.\n\n"
        + "\n".join(lines) + "\n"
        + ("".join(f"\n- failed: {run_name(r['attention'], r['pairs'], r['lr'])}: {r['error']}" for r in errors))
    )
    write_atomically(output / "mqrar.md", text.encode())

    figure = Figure(figsize=(5, 3.5))
    axis = figure.subplots()
    for attention in ATTENTIONS:
        points = [(count, best[(attention, count)]["accuracy"]) for count in pairs if (attention, count) in best]
        if points:
            axis.plot(*zip(*points), marker="o", label=LABELS[attention])
    axis.set_xlabel("key-value pairs")
    axis.set_ylabel("accuracy (best learning rate)")
    axis.set_xticks(pairs)
    axis.set_ylim(0, 1.02)
    axis.set_title(f"MQRAR, 2 layers x 256, 768 tokens, {steps} steps")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=150)
    write_atomically(output / "mqrar.png", png.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=20000)
    parser.add_argument("--parallel", type=int, default=2, help="training processes at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, nargs="+", default=PAIRS, help="a subset of the pair counts")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=LEARNING_RATES)
    parser.add_argument("--device", default=None, help="passed to train.py (default: cuda if there is one)")
    parser.add_argument("--attention-backend", default="auto", help="stick-breaking kernels backend, passed to train.py")
    parser.add_argument("--harness-samples", type=int, default=50,
                        help="sequences per best model for lm-eval's mqrar task (0: skip)")
    args = parser.parse_args(argv)
    # Runs of other settings (a longer --steps, ...) go to their own folder: a finished run is
    # never reused for settings it was not trained with.
    runs = args.output / f"steps{args.steps}-batch{args.batch_size}-pool{args.pool_size}-warmup{args.warmup_steps}-seed{args.seed}"
    runs.mkdir(parents=True, exist_ok=True)
    grid = [(a, p, lr) for p in args.pairs for a in ATTENTIONS for lr in args.learning_rates]
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(train_one, runs, *point, args) for point in grid]
        rows = [future.result() for future in tqdm(as_completed(futures), total=len(futures), desc="MQRAR grid", unit="run")]
    rows.sort(key=lambda row: (row["attention"], row["pairs"], row["lr"]))
    write_atomically(runs / "grid.json", json.dumps(rows, indent=1).encode())  # kept if what follows fails
    if args.harness_samples:
        best = list(best_per_point(rows).values())
        with ThreadPoolExecutor(args.parallel) as pool:
            accuracies = list(tqdm(pool.map(lambda row: harness_accuracy(runs, row, args.harness_samples), best),
                                   total=len(best), desc="lm-eval mqrar", unit="model"))
        for row, accuracy in zip(best, accuracies):
            row["harness_accuracy"] = accuracy
    write_atomically(runs / "grid.json", json.dumps(rows, indent=1).encode())
    write_report(rows, runs, args.steps, args.pairs, args.learning_rates)
    print((runs / "mqrar.md").read_text())


if __name__ == "__main__":
    main()
