"""RULER's report (`sb-eval report`): lm-eval output folders and sweep folders in, Markdown, PNG and
RULER's summary.csv out.

Read: an lm-eval output folder (`--output_path`, any depth: every results_*.json under it, with
the samples_<task>_*.jsonl files `--log_samples` writes beside it) or a sweep folder
(results.jsonl of `sb-eval sweep`). A RULER task is one whose metrics are named by context
lengths ("4096"). Several folders of one model are merged; a later folder's cell replaces an
earlier one's.

Written into the output folder:

- report.md: per length (numeric order), one column per model, each task's score and the RULER
  average (the unweighted mean over tasks, as RULER averages its 13), with 95 % bootstrap
  intervals over samples, and with two models the paired bootstrap of their difference; the
  effective length per model (RULER's: the longest length up to which the average stays above
  the threshold, 85.6 by default: Llama-2-7B's score at 4K in RULER's paper); accuracy by depth
  decile.
- ruler-average.png: the average against length, intervals shaded, the threshold drawn.
- depth-<task>-<model>.png: score by needle depth (deciles) x length, for each task whose
  samples record where their answers sit (needle_depths).
- summary-<model>-<length>.csv: RULER's summary.csv layout (rows Tasks, Score, Nulls).

Intervals need per-sample scores (`--log_samples`); cells without them (sweep rows, lm-eval runs
without samples) get mean +- 1.96 standard errors from lm-eval's stderr instead, marked "(n)".
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from sb_eval.files import write_atomically

from .figures import png_bytes
from .sweep import latest_outcomes, length_label, model_labels

# RULER's threshold: Llama-2-7B's average at 4K tokens in RULER's paper.
DEFAULT_THRESHOLD = 85.6
DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
Z = 1.959963984540054  # the standard normal's 97.5 % quantile, for intervals from standard errors
# RULER's average is over its 13 tasks; with fewer, the report says which it averaged.
RULER_TASK_COUNT = 13
DECILES = 10
RESULTS_GLOB = "results_*.json"
SWEEP_RESULTS = "results.jsonl"
AVERAGE = "RULER average"


@dataclass
class Sample:
    """One logged sample: its score (0-100), where its answers sit (percent of the context), whether
    the reply was empty (RULER's "null"), and what identifies the prompt across models."""

    score: float
    depths: list[float]
    empty: bool
    key: str


@dataclass
class Cell:
    """One model's result for one task at one length: per-sample scores where logged, else the
    mean and lm-eval's standard error."""

    mean: float
    samples: list[Sample] | None = None
    stderr: float | None = None


@dataclass
class Results:
    """One model's cells, task -> length -> Cell, and the groups its runs named (group -> tasks)."""

    spec: str
    cells: dict[str, dict[int, Cell]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)


def read_results(paths: Sequence[Path]) -> dict[str, Results]:
    """Every RULER cell under `paths`, by model spec (NAME:ARGS)."""
    models: dict[str, Results] = {}
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder (an lm-eval --output_path folder or a sweep folder)")
        found = False
        sweep_file = path if path.name == SWEEP_RESULTS else path / SWEEP_RESULTS
        if sweep_file.is_file():
            _read_sweep(sweep_file, models)
            found = True
        for results_file in sorted(path.rglob(RESULTS_GLOB)) if path.is_dir() else []:
            _read_lm_eval(results_file, models)
            found = True
        if not found:
            raise ValueError(f"{path} holds neither {RESULTS_GLOB} (lm-eval --output_path) nor {SWEEP_RESULTS} (sb-eval sweep)")
    ruler = {spec: results for spec, results in models.items() if results.cells}
    if not ruler:
        raise ValueError(f"no RULER results (metrics named by context lengths) in {', '.join(map(str, paths))}")
    return ruler


def _read_lm_eval(path: Path, models: dict[str, Results]) -> None:
    document = json.loads(path.read_text(encoding="utf-8"))
    config = document.get("config", {})
    model_args = config.get("model_args") or ""
    if isinstance(model_args, dict):
        model_args = ",".join(f"{key}={value}" for key, value in model_args.items())
    spec = f"{config.get('model', 'model')}:{model_args}" if model_args else str(config.get("model", "model"))
    results = models.setdefault(spec, Results(spec))
    for group, members in document.get("group_subtasks", {}).items():
        if members:
            results.groups[group] = list(members)
    stamp = path.name.removeprefix("results_").removesuffix(".json")
    for task, entry in document.get("results", {}).items():
        if task in document.get("group_subtasks", {}) and document["group_subtasks"][task]:
            continue  # a group's own row: recomputed here from its tasks
        lengths = _length_metrics(entry)
        if not lengths:
            continue
        logged = _read_samples(path.parent / f"samples_{task}_{stamp}.jsonl")
        for length, (mean, stderr) in lengths.items():
            samples = logged.get(length)
            results.cells.setdefault(task, {})[length] = Cell(mean, samples, stderr)


def _length_metrics(entry: dict) -> dict[int, tuple[float, float | None]]:
    """lm-eval's {"4096,none": 87.5, "4096_stderr,none": 1.2} -> {4096: (87.5, 1.2)}."""
    lengths = {}
    for key, value in entry.items():
        name, _, filter_name = key.partition(",")
        if filter_name == "none" and name.isdigit() and isinstance(value, (int, float)) and math.isfinite(value):
            stderr = entry.get(f"{name}_stderr,none")
            lengths[int(name)] = (float(value), float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None)
    return lengths


def _read_samples(path: Path) -> dict[int, list[Sample]]:
    """A samples_<task>_<time>.jsonl file's samples by length (none if the file is not there)."""
    by_length: dict[int, list[Sample]] = {}
    if not path.is_file():
        return by_length
    with open(path, encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            doc = record.get("doc", {})
            length = doc.get("max_length")
            if length is None or str(length) not in record:
                continue
            reply = record.get("filtered_resps") or record.get("resps") or [""]
            while isinstance(reply, list):
                reply = reply[0] if reply else ""
            key = record.get("doc_hash") or doc.get("input", "")
            by_length.setdefault(int(length), []).append(
                Sample(float(record[str(length)]), list(doc.get("needle_depths") or []), not str(reply).strip(), key)
            )
    return by_length


def _read_sweep(path: Path, models: dict[str, Results]) -> None:
    rows = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a sweep that died while writing it
    for (spec, task, length), row in latest_outcomes(row for row in rows if "model_spec" in row).items():
        if "error" in row or str(length) not in row.get("metrics", {}):
            continue
        results = models.setdefault(spec, Results(spec))
        if row.get("subtasks"):
            results.groups[task] = list(row["subtasks"])
            for member, metrics in row["subtasks"].items():
                if metrics.get(str(length)) is not None:
                    results.cells.setdefault(member, {}).setdefault(length, Cell(float(metrics[str(length)])))
            continue
        value, stderr = row["metrics"][str(length)], row.get("stderr", {}).get(str(length))
        if value is not None:
            results.cells.setdefault(task, {})[length] = Cell(float(value), None, stderr)


# Statistics ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A score (0-100) and its 95 % interval; `normal` where the interval is mean +- 1.96 standard
    errors (no per-sample scores), None bounds where there is no interval at all."""

    value: float
    low: float | None
    high: float | None
    normal: bool = False


def cell_estimate(cell: Cell, resamples: int, rng: random.Random) -> Estimate:
    if cell.samples:
        scores = [sample.score for sample in cell.samples]
        draws = [_mean(_resample(scores, rng)) for _ in range(resamples)]
        return Estimate(_mean(scores), *_percentiles(draws))
    return _normal(cell.mean, cell.stderr)


def average_estimate(cells: list[Cell], resamples: int, rng: random.Random) -> Estimate:
    """The unweighted mean over tasks; resampled within each task."""
    value = _mean([cell.mean for cell in cells])
    if all(cell.samples for cell in cells):
        scores = [[sample.score for sample in cell.samples] for cell in cells]
        draws = [_mean([_mean(_resample(task, rng)) for task in scores]) for _ in range(resamples)]
        return Estimate(value, *_percentiles(draws))
    if all(cell.samples or cell.stderr is not None for cell in cells):
        variance = sum((_sample_stderr(cell) ** 2) for cell in cells) / len(cells) ** 2
        return _normal(value, math.sqrt(variance))
    return Estimate(value, None, None)


def difference_estimate(first: list[Cell], second: list[Cell], resamples: int, rng: random.Random) -> tuple[Estimate, str]:
    """second - first, averaged over tasks (cells pairwise), and how it was resampled: "paired"
    where both models answered the same prompts (resampled together), "unpaired" otherwise, or
    "normal" (from standard errors)."""
    value = _mean([b.mean for b in second]) - _mean([a.mean for a in first])
    if all(a.samples and b.samples for a, b in zip(first, second)):
        paired = all(_keys(a) == _keys(b) for a, b in zip(first, second))
        pairs = [([s.score for s in a.samples], [s.score for s in b.samples]) for a, b in zip(first, second)]
        value = _mean([_mean(b) - _mean(a) for a, b in pairs])
        draws = []
        for _ in range(resamples):
            total = 0.0
            for a, b in pairs:
                if paired:
                    chosen = [rng.randrange(len(a)) for _ in a]
                    total += _mean([b[i] for i in chosen]) - _mean([a[i] for i in chosen])
                else:
                    total += _mean(_resample(b, rng)) - _mean(_resample(a, rng))
            draws.append(total / len(pairs))
        return Estimate(value, *_percentiles(draws)), "paired" if paired else "unpaired"
    if all((a.samples or a.stderr is not None) and (b.samples or b.stderr is not None) for a, b in zip(first, second)):
        variance = sum(_sample_stderr(a) ** 2 + _sample_stderr(b) ** 2 for a, b in zip(first, second)) / len(first) ** 2
        return _normal(value, math.sqrt(variance), clip=False), "normal"
    return Estimate(value, None, None), "none"


def effective_length(averages: dict[int, float], threshold: float) -> int | None:
    """RULER's effective length: the longest length up to which every average exceeds
    `threshold`; None when the shortest does not."""
    effective = None
    for length in sorted(averages):
        if not averages[length] > threshold:
            break
        effective = length
    return effective


def depth_table(cells: dict[int, Cell]) -> dict[int, list[float | None]]:
    """Mean score by needle depth decile, per length: each sample's score counts at the depth of
    each context element that holds one of its answers."""
    table = {}
    for length, cell in cells.items():
        bins: list[list[float]] = [[] for _ in range(DECILES)]
        for sample in cell.samples or []:
            for depth in sample.depths:
                bins[min(DECILES - 1, max(0, int(depth // (100 / DECILES))))].append(sample.score)
        table[length] = [_mean(scores) if scores else None for scores in bins]
    return table


def _resample(values: list[float], rng: random.Random) -> list[float]:
    return rng.choices(values, k=len(values))


def _percentiles(draws: list[float]) -> tuple[float, float]:
    ordered = sorted(draws)
    tail = (1 - CONFIDENCE) / 2
    return ordered[int(tail * (len(ordered) - 1))], ordered[math.ceil((1 - tail) * (len(ordered) - 1))]


def _normal(value: float, stderr: float | None, clip: bool = True) -> Estimate:
    if stderr is None:
        return Estimate(value, None, None)
    low, high = value - Z * stderr, value + Z * stderr
    return Estimate(value, max(0.0, low) if clip else low, min(100.0, high) if clip else high, normal=True)


def _sample_stderr(cell: Cell) -> float:
    if cell.samples:
        scores = [s.score for s in cell.samples]
        mean = _mean(scores)
        return math.sqrt(sum((x - mean) ** 2 for x in scores) / max(1, len(scores) - 1) / len(scores))
    return cell.stderr or 0.0


def _keys(cell: Cell) -> list[str]:
    return [sample.key for sample in cell.samples or []]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


# The report ---------------------------------------------------------------------------------------


def ruler_name(task: str) -> str:
    """RULER's own name of an sb-eval task: sb_niah_single_1 -> niah_single_1, sb_ruler_vt -> vt."""
    return task.removeprefix("sb_ruler_").removeprefix("sb_")


def write_report(
    paths: Sequence[Path], output: Path, threshold: float = DEFAULT_THRESHOLD, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> list[Path]:
    """Reads `paths`, writes the report into `output` (each file atomically); returns the files."""
    models = read_results(paths)
    if len(models) > 2:
        raise ValueError(f"{len(models)} models in these folders ({', '.join(sorted(models))}); a report compares one or two")
    labels = model_labels(models)
    specs = sorted(models, key=lambda spec: labels[spec])
    report = _Report([models[spec] for spec in specs], [labels[spec] for spec in specs], threshold, resamples, seed)
    written = []
    for name, content in report.files().items():
        write_atomically(output / name, content)
        written.append(output / name)
    return written


class _Report:
    def __init__(self, models: list[Results], labels: list[str], threshold: float, resamples: int, seed: int):
        self.models, self.labels, self.threshold, self.resamples = models, labels, threshold, resamples
        self.rng = random.Random(seed)
        self.tasks = self._task_order()
        self.lengths = sorted({length for model in models for cells in model.cells.values() for length in cells})
        # Drawn once, so that the table and the plot show the same intervals.
        self.averages = [
            {length: average_estimate([model.cells[task][length] for task in tasks], resamples, self.rng)
             for length in self.lengths if (tasks := self._average_tasks(length))}
            for model in models
        ]

    def _task_order(self) -> list[str]:
        """Tasks in the order of the groups that named them, then the rest sorted."""
        order: list[str] = []
        for model in self.models:
            for members in model.groups.values():
                order += [task for task in members if task not in order and any(task in m.cells for m in self.models)]
        return order + sorted({task for m in self.models for task in m.cells} - set(order))

    def files(self) -> dict[str, bytes]:
        files = {"report.md": self.markdown().encode("utf-8"), "ruler-average.png": self.average_png()}
        for task in self.tasks:
            for model, label in zip(self.models, self.labels):
                cells = model.cells.get(task, {})
                if any(sample.depths for cell in cells.values() for sample in cell.samples or []):
                    files[f"depth-{ruler_name(task)}-{_file_label(label)}.png"] = self.depth_png(task, label, depth_table(cells))
        for model, label in zip(self.models, self.labels):
            for length in self.lengths:
                if any(length in model.cells.get(task, {}) for task in self.tasks):
                    files[f"summary-{_file_label(label)}-{length}.csv"] = self.summary_csv(model, length)
        return files

    # Cells shared by every model at a length: the average is over the same tasks for all.
    def _average_tasks(self, length: int) -> list[str]:
        return [task for task in self.tasks if all(length in model.cells.get(task, {}) for model in self.models)]

    def markdown(self) -> str:
        averages = self.averages
        full = all(len(self._average_tasks(length)) == RULER_TASK_COUNT for length in self.lengths)
        average_name = AVERAGE if full else f"average of the tasks present ({', '.join(ruler_name(t) for t in self.tasks)})"
        lines = ["# RULER report", "", "Models:", ""]
        lines += [f"- {label}: `{model.spec}`" for model, label in zip(self.models, self.labels)]
        lines += [
            "",
            f"Scores are RULER's (0-100) per context length in tokens, with {CONFIDENCE:.0%} bootstrap intervals "
            f"({self.resamples} resamples of the samples) in brackets; \"(n)\" marks an interval from lm-eval's "
            f"standard error where no per-sample scores were logged (mean +- 1.96 stderr).",
            "",
            f"## {AVERAGE if full else 'Average'}",
            "",
        ]
        if not full:
            lines += [f"Not all 13 RULER tasks are present: this is the unweighted {average_name}.", ""]
        lines += self._table({length: [model_averages.get(length) for model_averages in averages] for length in self.lengths},
                             self._average_difference)
        lines += ["", f"Effective length (RULER's: the longest length up to which the average stays above {self.threshold:g}):", ""]
        for label, model_averages in zip(self.labels, averages):
            effective = effective_length({length: estimate.value for length, estimate in model_averages.items()}, self.threshold)
            shown = f"{effective} tokens ({length_label(effective)})" if effective else f"none: below {self.threshold:g} from the shortest length on"
            lines.append(f"- {label}: {shown}")
        lines += ["", "![RULER average against context length](ruler-average.png)", "", "## Tasks", ""]
        for task in self.tasks:
            lines += [f"### {task} ({ruler_name(task)})", ""]
            rows = {length: [self._cell(model, task, length) for model in self.models] for length in self.lengths}
            lines += self._table(rows, lambda length, task=task: self._task_difference(task, length)) + [""]
        depth_tasks = [task for task in self.tasks if any(sample.depths for m in self.models for c in m.cells.get(task, {}).values() for sample in c.samples or [])]
        if depth_tasks:
            lines += self._depth_section(depth_tasks)
        return "\n".join(lines) + "\n"

    def _cell(self, model: Results, task: str, length: int) -> Estimate | None:
        cell = model.cells.get(task, {}).get(length)
        return cell_estimate(cell, self.resamples, self.rng) if cell else None

    def _table(self, rows: dict[int, list[Estimate | None]], difference: Callable[[int], tuple[Estimate, str] | None]) -> list[str]:
        header = "| length | " + " | ".join(self.labels) + (f" | {self.labels[1]} - {self.labels[0]} |" if len(self.models) == 2 else " |")
        lines = [header, "|---:|" + "---:|" * (len(self.models) + (len(self.models) == 2))]
        for length, estimates in rows.items():
            if all(estimate is None for estimate in estimates):
                continue
            cells = [_format(estimate) for estimate in estimates]
            if len(self.models) == 2:
                found = difference(length) if None not in estimates else None
                cells.append(_format(found[0], signed=True) + f" {found[1]}" if found else "")
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
        return lines

    def _task_difference(self, task: str, length: int) -> tuple[Estimate, str]:
        first, second = (model.cells[task][length] for model in self.models)
        return difference_estimate([first], [second], self.resamples, self.rng)

    def _average_difference(self, length: int) -> tuple[Estimate, str] | None:
        tasks = self._average_tasks(length)
        if not tasks:
            return None
        return difference_estimate(*([model.cells[task][length] for task in tasks] for model in self.models), self.resamples, self.rng)

    def _depth_section(self, tasks: list[str]) -> list[str]:
        lines = [
            "## Accuracy by depth",
            "",
            "Mean score by where the answer sits, in deciles of the context's tokens (0-10 % is its start), all "
            "lengths pooled. A sample's score counts at the depth of each context element holding one of its "
            "answers (several for multi-value, multi-query, variable tracking and HotpotQA).",
            "",
        ]
        for model, label in zip(self.models, self.labels):
            lines += [f"{label}:", "", "| task | " + " | ".join(f"{10 * d}-{10 * d + 10} %" for d in range(DECILES)) + " |",
                      "|---|" + "---:|" * DECILES]
            for task in tasks:
                pooled = Cell(0.0, [s for cell in model.cells.get(task, {}).values() for s in cell.samples or []])
                row = depth_table({0: pooled})[0]
                lines.append(f"| {ruler_name(task)} | " + " | ".join("" if value is None else f"{value:.1f}" for value in row) + " |")
            lines += [""]
            lines += [f"![{ruler_name(task)}, {label}](depth-{ruler_name(task)}-{_file_label(label)}.png)" for task in tasks
                      if any(s.depths for c in model.cells.get(task, {}).values() for s in c.samples or [])]
            lines += [""]
        return lines

    def average_png(self) -> bytes:
        figure = Figure(figsize=(7, 4.2))
        axes = figure.add_subplot()
        for label, model_averages in zip(self.labels, self.averages):
            lengths = sorted(model_averages)
            values = [model_averages[length].value for length in lengths]
            line = axes.plot(lengths, values, marker="o", label=label)[0]
            bounded = [length for length in lengths if model_averages[length].low is not None]
            if bounded:
                axes.fill_between(bounded, [model_averages[length].low for length in bounded],
                                  [model_averages[length].high for length in bounded], color=line.get_color(), alpha=0.2)
        axes.axhline(self.threshold, color="grey", linestyle="--", linewidth=1, label=f"threshold {self.threshold:g}")
        _length_axis(axes, self.lengths)
        axes.set_ylim(0, 100)
        axes.set_ylabel("RULER average (0-100)")
        axes.set_title("RULER average by context length (95 % intervals shaded)")
        axes.grid(alpha=0.3)
        axes.legend()
        return png_bytes(figure)

    def depth_png(self, task: str, label: str, table: dict[int, list[float | None]]) -> bytes:
        lengths = sorted(table)
        figure = Figure(figsize=(1.2 * len(lengths) + 3, 5))
        axes = figure.add_subplot()
        grid = [[table[length][decile] for length in lengths] for decile in range(DECILES)]
        image = axes.imshow([[math.nan if v is None else v for v in row] for row in grid], vmin=0, vmax=100,
                            cmap="RdYlGn", aspect="auto", origin="upper")
        for decile, row in enumerate(grid):
            for column, value in enumerate(row):
                if value is not None:
                    axes.text(column, decile, f"{value:.0f}", ha="center", va="center", fontsize=8)
        axes.set_xticks(range(len(lengths)), [length_label(length) for length in lengths])
        axes.set_yticks(range(DECILES), [f"{10 * d}-{10 * d + 10} %" for d in range(DECILES)])
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel("answer depth (share of the context's tokens before it)")
        axes.set_title(f"{ruler_name(task)}, {label}: score by depth")
        figure.colorbar(image, ax=axes, label="score (0-100)")
        figure.tight_layout()
        return png_bytes(figure)

    def summary_csv(self, model: Results, length: int) -> bytes:
        """RULER's summary.csv: a header of column numbers, then Tasks, Score (2 decimals), Nulls."""
        tasks = [task for task in self.tasks if length in model.cells.get(task, {})]
        cells = [model.cells[task][length] for task in tasks]
        nulls = [f"{sum(s.empty for s in cell.samples)}/{len(cell.samples)}" if cell.samples else "n/a" for cell in cells]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(range(len(tasks) + 1))
        writer.writerow(["Tasks"] + [ruler_name(task) for task in tasks])
        writer.writerow(["Score"] + [round(cell.mean, 2) for cell in cells])
        writer.writerow(["Nulls"] + nulls)
        return buffer.getvalue().encode("utf-8")


def _format(estimate: Estimate | None, signed: bool = False) -> str:
    if estimate is None:
        return ""
    value = f"{estimate.value:+.1f}" if signed else f"{estimate.value:.1f}"
    if estimate.low is None:
        return value
    return f"{value} [{estimate.low:.1f}, {estimate.high:.1f}]" + (" (n)" if estimate.normal else "")


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def _length_axis(axes, lengths: list[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [length_label(length) for length in lengths])
    axes.minorticks_off()
    axes.set_xlabel("context length (tokens)")


