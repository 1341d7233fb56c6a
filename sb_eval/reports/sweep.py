"""The report of a sweep, made from every row of its results.jsonl (sb_eval.commands.sweep): summary.md,
a table of the headline metric (rows task x model, columns context lengths), and one PNG per task
with the headline metric against length, one line per model.

The headline metric of a task at length L is, by contract with the task authors (HEADLINE_RULE,
also written into summary.md): the metric named str(L) (RULER tasks score each length under its
own name, "4096"), else "nll_{L}" (sb_ppl), else "word_perplexity_{L}" (sb_wikitext), else "acc"
(mqrar, which also reports "acc_<pairs>"), else "word_perplexity" (lm-eval's wikitext), else the
first metric whose name starts with "acc". Groups are read from the group's own row.

A task over documents may also say what each length covers (sb_wikitext does): how many of its
documents are longer than L ("documents_longer_{L}"), their share of its tokens
("tokens_in_longer_{L}") and its longest document in tokens ("longest_document"). Where a task
reports them, summary.md tabulates them, marks the cells of lengths no document is longer than
(every document is scored whole there, so longer lengths measure no more context), and the plot
marks the longest document.

Of several rows for one point (an error, retried later), a result wins over errors, and the latest
row wins otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from matplotlib.figure import Figure

from sb_eval.files import write_atomically

from .figures import png_bytes

SUMMARY_FILE = "summary.md"
# The y-axis title for a metric named by the length itself.
LENGTH_METRIC_TITLE = "score (the metric named by each length)"
PLOTS_FOLDER = "plots"
# Characters of an error message shown in summary.md (the row in results.jsonl keeps it all).
ERROR_MESSAGE_CHARS = 160
# headline_metric's order, as summary.md states it.
HEADLINE_RULE = (
    "the metric named by the length (RULER), else nll_<length> (sb_ppl), else word_perplexity_<length> "
    "(sb_wikitext), else acc (mqrar), else word_perplexity (lm-eval's wikitext), else the first metric "
    "whose name starts with acc"
)
# What a row says of the documents at its length (see the module's docstring).
DOCUMENTS_LONGER = "documents_longer_{}"
TOKENS_IN_LONGER = "tokens_in_longer_{}"
LONGEST_DOCUMENT = "longest_document"
# Marks a cell of a length that no document is longer than.
WHOLE_DOCUMENTS_MARK = "*"


def headline_metric(metrics: dict[str, float | None], length: int) -> tuple[str, float | None] | None:
    """(name, value) of the metric that stands for a task's result at `length`, or None; the
    first of HEADLINE_RULE that the metrics have."""
    for name in (str(length), f"nll_{length}", f"word_perplexity_{length}", "acc", "word_perplexity"):
        if name in metrics:
            return name, metrics[name]
    for name, value in metrics.items():
        if name.startswith("acc"):
            return name, value
    return None


def metric_label(name: str, length: int) -> str:
    """The headline metric's name with the length as a placeholder: "<length>", "nll_<length>"."""
    return name.replace(str(length), "<length>") if str(length) in name else name


def latest_outcomes(rows: Iterable[dict]) -> dict[tuple[str, str, int], dict]:
    """One row per (model_spec, task, length): the latest result, else the latest error."""
    outcomes: dict[tuple[str, str, int], dict] = {}
    for row in rows:
        key = (row["model_spec"], row["task"], row["length"])
        if "error" in row and key in outcomes and "error" not in outcomes[key]:
            continue
        outcomes[key] = row
    return outcomes


def model_labels(model_specs: Iterable[str]) -> dict[str, str]:
    """Short names for the models: NAME:<pretrained folder's name> where those are unique,
    else the whole NAME:ARGS."""
    specs = sorted(set(model_specs))
    short = {spec: _short_label(spec) for spec in specs}
    if len(set(short.values())) < len(short):
        return {spec: spec for spec in specs}
    return short


def _short_label(spec: str) -> str:
    name, _, args = spec.partition(":")
    values = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    pretrained = values.get("pretrained")
    return f"{name}:{Path(pretrained).name}" if pretrained else spec


def length_label(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def write_report(rows: list[dict], folder: Path, train_length: int | None = None) -> list[Path]:
    """Writes folder/summary.md and folder/plots/<task>.png (each atomically); returns their paths."""
    outcomes = latest_outcomes(rows)
    summary = folder / SUMMARY_FILE
    write_atomically(summary, summary_markdown(outcomes, len(rows)).encode("utf-8"))
    return [summary] + write_plots(outcomes, folder / PLOTS_FOLDER, train_length)


def summary_markdown(outcomes: dict[tuple[str, str, int], dict], row_count: int) -> str:
    lengths = sorted({length for _, _, length in outcomes})
    tasks = sorted({task for _, task, _ in outcomes})
    models = sorted({model for model, _, _ in outcomes})
    labels = model_labels(models)
    errors = [row for row in outcomes.values() if "error" in row]
    lines = [
        "# Sweep results",
        "",
        f"{len(outcomes) - len(errors)} points with results and {len(errors)} with errors, from {row_count} rows "
        f"of results.jsonl. Each cell is the task's headline metric at that context length (tokens): {HEADLINE_RULE}.",
        "",
        "| task | model | metric | " + " | ".join(str(length) for length in lengths) + " |",
        "|---|---|---|" + "---:|" * len(lengths),
    ]
    for task in tasks:
        for model in models:
            cells, names = [], set()
            for length in lengths:
                row = outcomes.get((model, task, length))
                cell, name = _cell(row, length)
                cells.append(cell)
                if name:
                    names.add(name)
            if any(cells):
                lines.append(f"| {task} | {labels[model]} | {', '.join(sorted(names))} | " + " | ".join(cells) + " |")
    lines += _coverage_markdown(outcomes, tasks, models, lengths, labels)
    lines += ["", "Models:", ""] + [f"- {labels[model]}: `{model}`" for model in models]
    if errors:
        lines += ["", "Errors (the latest per point; running the sweep again retries them):", ""]
        for row in sorted(errors, key=lambda row: (row["task"], row["model_spec"], row["length"])):
            message = " ".join(str(row["error"].get("message", "")).split())
            if len(message) > ERROR_MESSAGE_CHARS:
                message = message[:ERROR_MESSAGE_CHARS] + "..."
            lines.append(f"- {row['task']}, {labels[row['model_spec']]}, {row['length']}: "
                         f"{row['error'].get('type')}: {message}")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None, length: int) -> tuple[str, str | None]:
    """A table cell and the label of the metric it shows."""
    if row is None:
        return "", None
    if "error" in row:
        return f"error ({row['error'].get('type')})", None
    headline = headline_metric(row.get("metrics", {}), length)
    if headline is None:
        return "no headline metric", None
    name, value = headline
    mark = f" {WHOLE_DOCUMENTS_MARK}" if documents_longer(row, length) == 0 else ""
    return ("nan" if value is None else f"{value:.4g}") + mark, metric_label(name, length)


def documents_longer(row: dict | None, length: int) -> float | None:
    """How many documents of the row's task are longer than `length`, where it says."""
    return None if row is None or "error" in row else row.get("metrics", {}).get(DOCUMENTS_LONGER.format(length))


def _coverage_markdown(outcomes: dict[tuple[str, str, int], dict], tasks: list[str], models: list[str],
                       lengths: list[int], labels: dict[str, str]) -> list[str]:
    """The section on what each length covers, for the tasks that say (none: no lines)."""
    lines = []
    for task in tasks:
        for model in models:
            rows = {length: outcomes.get((model, task, length)) for length in lengths}
            if all(documents_longer(row, length) is None for length, row in rows.items()):
                continue
            longest = next((row["metrics"][LONGEST_DOCUMENT] for row in rows.values()
                            if row is not None and LONGEST_DOCUMENT in row.get("metrics", {})), None)
            cells = []
            for length, row in rows.items():
                count = documents_longer(row, length)
                share = row["metrics"].get(TOKENS_IN_LONGER.format(length)) if count is not None else None
                cells.append("" if count is None else f"{count:g}" + ("" if share is None else f" ({share:.0%})")
                             + (f" {WHOLE_DOCUMENTS_MARK}" if count == 0 else ""))
            longest_cell = "" if longest is None else f"{longest:,.0f}"
            lines.append(f"| {task} | {labels[model]} | {longest_cell} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "",
        (
            "What the lengths cover: documents longer than each length (in the model's tokens) and, in brackets, their "
            f"share of all tokens. {WHOLE_DOCUMENTS_MARK}, here and in the table above, marks a length no document is "
            "longer than: there every document is scored whole, so that length and any longer one give the same values "
            "and measure no more context."
        ),
        "",
        "| task | model | longest document | " + " | ".join(str(length) for length in lengths) + " |",
        "|---|---|---:|" + "---:|" * len(lengths),
    ] + lines


def write_plots(outcomes: dict[tuple[str, str, int], dict], folder: Path, train_length: int | None) -> list[Path]:
    """One PNG per task: headline metric against length (log2 axis), a line per model, errors as
    crosses along the bottom, the training length as a dashed line, and, for a task that gives its
    longest document, that length as a dotted line (in the model's colour where models' tokenizers
    count it differently) within the lengths swept, past which the lines can only be flat."""
    labels = model_labels(model for model, _, _ in outcomes)
    written = []
    for task in sorted({task for _, task, _ in outcomes}):
        figure = Figure(figsize=(6.4, 4.2), layout="constrained")
        axes = figure.subplots()
        lengths = sorted({length for _, row_task, length in outcomes if row_task == task})
        names, colours = set(), {}
        for number, model in enumerate(sorted(labels)):
            rows = sorted((row for (row_model, row_task, _), row in outcomes.items()
                           if row_model == model and row_task == task), key=lambda row: row["length"])
            points = []
            for row in rows:
                headline = None if "error" in row else headline_metric(row.get("metrics", {}), row["length"])
                if headline is not None and headline[1] is not None:
                    points.append((row["length"], headline[1]))
                    names.add(metric_label(headline[0], row["length"]))
            line = axes.plot(*zip(*points), marker="o", label=labels[model]) if points else axes.plot([], [], label=labels[model])
            colours[model] = line[0].get_color()
            failed = [row["length"] for row in rows if "error" in row]
            if failed:
                # in axes units along the bottom, one height per model so that crosses do not hide each other
                axes.plot(failed, [0.03 + 0.04 * number] * len(failed), linestyle="none", marker="x", markersize=9, label=f"{labels[model]}: error",
                          color=line[0].get_color(), transform=axes.get_xaxis_transform(), clip_on=False)
        if train_length is not None:
            axes.axvline(train_length, color="0.4", linestyle="--", linewidth=1,
                         label=f"training length ({length_label(train_length)})")
        _mark_longest_documents(axes, outcomes, task, labels, colours, max(lengths))
        axes.set_xscale("log", base=2)
        ticks = sorted(set(lengths) | ({train_length} if train_length else set()))
        axes.set_xticks(ticks, [length_label(length) for length in ticks])
        axes.minorticks_off()
        axes.set_xlabel("context length (tokens)")
        axes.set_ylabel(", ".join(LENGTH_METRIC_TITLE if name == "<length>" else name for name in sorted(names))
                        or "headline metric")
        axes.set_title(task)
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task)}.png"
        write_atomically(path, png_bytes(figure, dpi=120))
        written.append(path)
    return written


def _mark_longest_documents(axes, outcomes: dict[tuple[str, str, int], dict], task: str, labels: dict[str, str],
                            colours: dict[str, str], longest_length: int) -> None:
    """The dotted lines of write_plots: each model's longest document, where the task gives it and
    it is no longer than the longest length swept; one grey line where all models agree."""
    longest = {}
    for (model, row_task, _), row in sorted(outcomes.items()):
        if row_task == task and "error" not in row and LONGEST_DOCUMENT in row.get("metrics", {}):
            longest[model] = row["metrics"][LONGEST_DOCUMENT]
    if len(set(longest.values())) == 1:
        marks = [(tokens, "0.3", "") for tokens in set(longest.values())]
    else:
        marks = [(tokens, colours[model], f"{labels[model]}: ") for model, tokens in longest.items()]
    for tokens, colour, whose in marks:
        if tokens <= longest_length:
            axes.axvline(tokens, linestyle=":", linewidth=1.5, color=colour, label=f"{whose}longest document ({tokens:,.0f} tokens)")
