"""The report of `sb-eval distance`: heatmaps (layers x heads) and a Markdown summary of the
results sb_eval.harness.distance measured."""

from __future__ import annotations

import math

from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sb_eval.analysis.definitions import POSITIONS_MEANING, REMAINDER_CONVENTIONS, REMAINDER_MEANING

from .figures import png_bytes

SUMMARY_FILE = "summary.md"
COMPARISON_FILE = "comparison.png"


def head_means(result: dict, remainder: str) -> list[list[float]]:
    """[layer][head] mean tokens back under `remainder`, NaN for a head with no counted query."""
    means = result["statistics"]["tokens_back"][remainder]["mean"]
    return [[math.nan if value is None else value for value in row] for row in means]


def heatmap_png(results: list[dict], remainder: str) -> bytes:
    """One model: its tokens-back heatmap (layers x heads), and its attended mass beside it when
    it has a remainder. Several models: their tokens-back heatmaps side by side on one scale."""
    panels = [
        (f"{r['label']}: tokens back ({remainder}), mean {_number(r['model_mean']['tokens_back'])}", head_means(r, remainder), "tokens back")
        for r in results
    ]
    if len(results) == 1 and results[0]["model"] == "sb_hf":
        mass = [[math.nan if v is None else v for v in row] for row in results[0]["statistics"]["mass"]["mean"]]
        panels.append((f"{results[0]['label']}: attended mass", mass, "mass"))
    distance_max = max((v for _, values, kind in panels if kind == "tokens back" for row in values for v in row if not math.isnan(v)), default=1.0)
    layers = max(len(values) for _, values, _ in panels)
    heads = max(len(values[0]) for _, values, _ in panels)
    figure = Figure(figsize=(len(panels) * max(4.0, 0.2 * heads + 2.0), max(3.0, 0.18 * layers + 1.5)), layout="constrained")
    for axes, (title, values, kind) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        if kind == "mass":
            image = axes.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0)
        else:
            # distances span from ~1 to thousands of tokens: logarithmic above 1 token
            norm = SymLogNorm(linthresh=1.0, vmin=0.0, vmax=max(distance_max, 1.0))
            image = axes.imshow(values, aspect="auto", cmap="viridis", norm=norm)
        axes.set_title(title, fontsize=9)
        axes.set_xlabel("head")
        axes.set_ylabel("layer")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axes, label=kind)
    return png_bytes(figure)


def summary_markdown(results: list[dict], args, failures: dict[str, str] | None = None) -> str:
    """results: the measured models (at least one); failures: label -> error of the models that
    could not be measured."""
    first = results[0]
    lines = [
        "# Attention distance",
        "",
        f"Corpus `{args.corpus}`, windows of {args.length} tokens cut by each model's own tokenizer; "
        f"queries: {POSITIONS_MEANING[args.positions]}; remainder convention `{args.remainder}`: "
        f"{REMAINDER_MEANING[args.remainder]} (stick-breaking only; softmax has no remainder). "
        f"Tokens back = query position - key position, averaged with the attention weights; the paper "
        f"reports the signed distance key - query, the negative. Whole-model values pool every "
        f"(query, head, layer).",
        "",
        "| model | windows | tokens back | signed (key - query) | attended mass | ignore / renormalize / farthest |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        mean = result["model_mean"]
        by_convention = result["statistics"]["model_mean"]["tokens_back"]
        lines.append(
            f"| {result['label']} | {result['windows']} | {_number(mean['tokens_back'])} | "
            f"{_number(mean['signed_distance'])} | {_number(mean['mass'], 3)} | "
            + " / ".join(_number(by_convention[c]) for c in REMAINDER_CONVENTIONS)
            + " |"
        )
    if failures:
        lines += ["", "Not measured:", ""] + [f"- {label}: {' '.join(error.split())}" for label, error in failures.items()]
    if len(results) == 2:
        lines += ["", f"![tokens back per layer and head, side by side]({COMPARISON_FILE})"]
    for result in results:
        statistics = result["statistics"]
        lines += [
            "",
            f"## {result['label']}",
            "",
            f"`{result['model']}` with `{result['model_args']}`; {result['windows']} windows, "
            f"{result['dtype']} on {result['device']}.",
            "",
            "| layer | tokens back (mean of heads) | nearest head | farthest head | attended mass |",
            "|---|---|---|---|---|",
        ]
        for layer, row in enumerate(head_means(result, first["remainder"])):
            finite = [(value, head) for head, value in enumerate(row) if not math.isnan(value)]
            masses = [m for m in statistics["mass"]["mean"][layer] if m is not None]
            if not finite:
                lines.append(f"| {layer} | - | - | - | - |")
                continue
            nearest, farthest = min(finite), max(finite)
            lines.append(
                f"| {layer} | {_number(sum(v for v, _ in finite) / len(finite))} | "
                f"{_number(nearest[0])} (head {nearest[1]}) | {_number(farthest[0])} (head {farthest[1]}) | "
                f"{_number(sum(masses) / len(masses), 3)} |"
            )
        lines += ["", f"![tokens back per layer and head]({result['label']}.png)"]
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
