"""The report of `sb-eval attribution`: a Markdown summary and plots of the documents that
sb_eval.harness.attribution measured, one panel per model side by side.

- needle_mass_by_depth.png: each needle's top mass against its depth, mean per tenth of the
  prompt, a line per length;
- retrieving_heads.png: the mean needle mass of every head (layers x heads);
- found_vs_missed.png: per layer, the mean over needles of the layer's best head, for needles
  whose answer the model gave and for those it missed.
"""

from __future__ import annotations

import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sb_eval.analysis.attribution import needle_findings

from .figures import png_bytes
from .sweep import length_label

SUMMARY_FILE = "summary.md"
DEPTH_FILE = "needle_mass_by_depth.png"
HEADS_FILE = "retrieving_heads.png"
FOUND_FILE = "found_vs_missed.png"
DEPTH_BINS = 10


def _panels(documents: list[dict], height: float = 3.6):
    figure = Figure(figsize=(5.0 * len(documents), height), layout="constrained")
    return figure, figure.subplots(1, len(documents), squeeze=False)[0]


def depth_png(documents: list[dict]) -> bytes:
    """Top needle mass against needle depth, one line per length, one panel per model."""
    figure, axes_row = _panels(documents)
    for axes, document in zip(axes_row, documents):
        by_length: dict[int, list[list[float]]] = {}
        for sample in document["samples"]:
            bins = by_length.setdefault(sample["length"], [[] for _ in range(DEPTH_BINS)])
            for finding in needle_findings(sample):
                bins[min(DEPTH_BINS - 1, int(finding["depth"] * DEPTH_BINS))].append(finding["top_needle_mass"])
        for length, bins in sorted(by_length.items()):
            points = [((b + 0.5) / DEPTH_BINS, sum(v) / len(v)) for b, v in enumerate(bins) if v]
            axes.plot(*zip(*points), marker="o", label=length_label(length))
        axes.axhline(document["summary"]["threshold"], color="grey", linestyle=":", linewidth=1, label="threshold")
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("needle depth (share of the prompt's tokens before it)")
        axes.set_ylabel("top needle mass (best head)")
        axes.set_title(f"{document['label']} ({document['attention']})", fontsize=9)
        axes.legend(fontsize=7)
    return png_bytes(figure)


def heads_png(documents: list[dict]) -> bytes:
    """Mean needle mass per layer and head, one heatmap per model, on one colour scale."""
    maps = [document["summary"]["heads"] for document in documents]
    top = max((value for head_map in maps for row in head_map for value in row), default=1.0) or 1.0
    figure, axes_row = _panels(documents)
    for axes, document, head_map in zip(axes_row, documents, maps):
        if not head_map:
            axes.set_axis_off()
            continue
        image = axes.imshow(head_map, aspect="auto", cmap="magma", vmin=0.0, vmax=top)
        axes.set_title(f"{document['label']}: mean needle mass per head", fontsize=9)
        axes.set_xlabel("head")
        axes.set_ylabel("layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axes, label="needle mass")
    return png_bytes(figure)


def found_png(documents: list[dict]) -> bytes:
    """Per layer, the best head's needle mass averaged over found and over missed needles."""
    figure, axes_row = _panels(documents)
    for axes, document in zip(axes_row, documents):
        layers = document["summary"]["layers"]
        for key, label, style in (("found_mean", "answer given", "-"), ("missed_mean", "answer missed", "--")):
            points = [(entry["layer"], entry[key]) for entry in layers if entry[key] is not None]
            if points:
                axes.plot(*zip(*points), style, marker="o", label=label)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("layer")
        axes.set_ylabel("needle mass of the layer's best head")
        axes.set_title(f"{document['label']}: needles found and missed", fontsize=9)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend(fontsize=7)
    return png_bytes(figure)


def summary_markdown(documents: list[dict], failures: dict[str, str] | None = None) -> str:
    """documents: the measured models (at least one); failures: label -> error of the others."""
    first = documents[0]
    settings = first["settings"]
    threshold = first["summary"]["threshold"]
    answer_tokens = "every answer token" if settings["answer_tokens"] is None else (
        "the first answer token" if settings["answer_tokens"] == 1 else f"the first {settings['answer_tokens']} answer tokens")
    # from the samples: a resumed folder holds those of earlier runs too
    tasks = sorted({sample["task"] for document in documents for sample in document["samples"]})
    lengths = sorted({sample["length"] for document in documents for sample in document["samples"]})
    lines = [
        "# Needle attention attribution",
        "",
        f"Tasks {', '.join(tasks)}; lengths {', '.join(length_label(n) for n in lengths)} (MQRAR: symbols); "
        f"seed {settings['seed']}; greedy answers; attention of the query that produced {answer_tokens}.",
        "",
        "A needle's top mass is the largest share of one head's attention (any layer, any recorded answer "
        f"step) on the needle's tokens. A needle counts as attended when its top mass is at least {threshold}; "
        "a needle is missed when the answer it holds is not in the model's answer.",
        "",
        "## Missed needles: attended or not",
        "",
        "| model | length | samples | correct | needles | missed | missed, attended | missed, not attended | mean top needle mass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for document in documents:
        for row in document["summary"]["by_length"]:
            lines.append(
                f"| {document['label']} | {length_label(row['length'])} | {row['samples']} | {row['correct']} | {row['needles']} | "
                f"{row['missed']} | {_share(row['missed_attended'], row['missed'])} | "
                f"{_share(row['missed_unattended'], row['missed'])} | {_number(row['mean_top_needle_mass'])} |"
            )
    if failures:
        lines += ["", "Not measured:", ""] + [f"- {label}: {' '.join(error.split())}" for label, error in failures.items()]
    thresholds = list(first["summary"]["by_length"][0]["missed_attended_at"]) if first["summary"]["by_length"] else []
    lines += [
        "",
        "Missed needles counted as attended at other thresholds, and the share of the prompt a needle takes "
        "(the mass uniform attention would give it):",
        "",
        "| model | length | missed | " + " | ".join(f"attended at {t}" for t in thresholds) + " | needle share of the prompt |",
        "|---|---|---:|" + "---:|" * len(thresholds) + "---:|",
    ]
    for document in documents:
        for row in document["summary"]["by_length"]:
            lines.append(
                f"| {document['label']} | {length_label(row['length'])} | {row['missed']} | "
                + " | ".join(_share(row["missed_attended_at"][t], row["missed"]) for t in thresholds)
                + f" | {_number(row['mean_needle_share'], 4)} |"
            )
    lines += [
        "",
        f"![top needle mass against depth]({DEPTH_FILE})",
        "",
        "## Per task and length",
        "",
        "| model | task | length | score | needles missed | missed, attended | mean top needle mass |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for document in documents:
        for row in document["summary"]["by_point"]:
            lines.append(
                f"| {document['label']} | {row['task']} | {length_label(row['length'])} | {_number(row['mean_score'], 1)} | "
                f"{row['missed']} of {row['needles']} | {row['missed_attended']} | {_number(row['mean_top_needle_mass'])} |"
            )
    lines += ["", "## The heads that retrieve", "", f"![mean needle mass per head]({HEADS_FILE})", f"![found and missed needles per layer]({FOUND_FILE})"]
    for document in documents:
        summary = document["summary"]
        lines += [
            "",
            f"### {document['label']}",
            "",
            f"`{document['model']}` with `{document['model_args'] or '(defaults)'}`, {document['attention']} attention, "
            f"{document['layers']} layers x {document['heads']} heads, {document['dtype']} on {document['device']}.",
            "",
            "Heads with the highest mean needle mass: "
            + ", ".join(f"layer {h['layer']} head {h['head']} ({_number(h['mean_needle_mass'])})" for h in summary["top_heads"])
            + ".",
            "",
            f"Per layer, its best head on each needle (mean over needles), and the missed needles that the layer's "
            f"best head attended (at least {summary['threshold']}):",
            "",
            "| layer | best head overall | its mean needle mass | needles found | needles missed | missed needles it attended |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        missed = sum(row["missed"] for row in summary["by_length"])
        for entry in summary["layers"]:
            lines.append(
                f"| {entry['layer']} | {entry['top_head']} | {_number(entry['top_head_mean_needle_mass'])} | "
                f"{_number(entry['found_mean'])} | {_number(entry['missed_mean'])} | {_share(entry['missed_attended'], missed)} |"
            )
    return "\n".join(lines) + "\n"


def _share(part: int, whole: int) -> str:
    return "-" if whole == 0 else f"{part} ({100 * part / whole:.0f}%)"


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
