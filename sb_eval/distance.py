"""`sb-eval distance`: how far back each attention head looks on natural text, per layer and head.

    sb-eval distance --model sb_hf --model_args pretrained=SB_CHECKPOINT \\
        --compare hf:pretrained=LLAMA_FOLDER --corpus aa-lcr --length 2048 --windows 64 \\
        --output runs/distance

Each model's tokenizer cuts the corpus's documents into non-overlapping windows of --length
tokens (a window never spans two documents unless --join_documents; the first --windows of them,
in corpus order). One
forward pass per batch of windows collects, for every layer and head, the attention-weighted
distance in tokens back and the attended mass, averaged over the chosen query positions
(sb_eval.attention_stats has the definitions). Writes OUTPUT/<label>.json and OUTPUT/<label>.png
(layers x heads) per model, OUTPUT/summary.md, and with two models OUTPUT/comparison.png.
A model that cannot be measured (an architecture the statistics do not cover, a checkpoint that
is not what --model expects) is reported and skipped: the other model's files and the summary of
what was measured are still written, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import re
import sys
from pathlib import Path

import torch
from lm_eval.utils import simple_parse_args_string
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from sb_eval.ruler.cache import write_atomically
from sb_eval.ruler.corpora import MissingCorpusError

from .attention_stats import (
    POSITIONS,
    REMAINDER_CONVENTIONS,
    SIGN_NOTE,
    AttentionStatistics,
    UnsupportedArchitectureError,
    collect_attention_statistics,
    stop_collecting,
)
from .checkpoint import CheckpointError
from .data import DocumentSourceError, documents
from .sweep import ModelSpec, model_class, split_model_spec

MODELS = ("sb_hf", "hf")
SUMMARY_FILE = "summary.md"
COMPARISON_FILE = "comparison.png"
REMAINDER_MEANING = {
    "ignore": "the stick's remainder sits at distance 0",
    "renormalize": "the weights are rescaled to sum to 1 (queries with an empty stick left out)",
    "farthest": "the remainder is placed on the farthest key the query sees",
}
POSITIONS_MEANING = {
    "last": "the last position of each window",
    "all": "every position of each window that sees at least one key",
}


class DistanceArgumentError(ValueError):
    """An argument of `sb-eval distance` that cannot work; the message says what is valid."""


def parsed_model_args(model: ModelSpec) -> dict:
    """The model's model_args as a dict, which must name a pretrained folder."""
    try:
        parsed = simple_parse_args_string(model.args)
    except ValueError as error:
        raise DistanceArgumentError(f"model arguments {model.args!r} of {model.name}: {error}") from None
    if "pretrained" not in parsed:
        raise DistanceArgumentError(f"model arguments {model.args!r} of {model.name} need pretrained=PATH")
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sb-eval distance",
        description="Attention-weighted distance (tokens back) and attended mass per layer and head, "
        "averaged over windows of a corpus. Writes OUTPUT/<label>.json, OUTPUT/<label>.png per model, "
        "OUTPUT/summary.md and, with --compare, OUTPUT/comparison.png.",
        epilog=f"Sign: {SIGN_NOTE}.",
    )
    parser.add_argument("--model", default="sb_hf", choices=MODELS, help="sb_hf (stick-breaking) or hf (softmax, e.g. Llama)")
    parser.add_argument("--model_args", required=True, help="as lm_eval's: pretrained=PATH[,key=value...]; PATH a local folder")
    parser.add_argument("--compare", metavar="NAME:ARGS", help="a second model, e.g. hf:pretrained=/path/to/llama")
    parser.add_argument(
        "--corpus", required=True,
        help="a fetched corpus name (sb-eval data list), a .txt/.jsonl file or folder, or hf:NAME[:CONFIG[:SPLIT]]",
    )
    parser.add_argument("--length", required=True, type=int, help="window length in tokens")
    parser.add_argument(
        "--join_documents", action="store_true",
        help="cut windows from the documents run together (corpora of short rows, e.g. Wikitext); "
        "by default a window never spans two documents",
    )
    parser.add_argument("--windows", type=int, default=32, help="how many windows per model (default 32)")
    parser.add_argument("--positions", choices=POSITIONS, default="last", help="query positions averaged over (default last)")
    parser.add_argument(
        "--remainder", choices=REMAINDER_CONVENTIONS, default="ignore",
        help="where stick-breaking's remainder goes in the reported distance (default ignore); the JSON has all three",
    )
    parser.add_argument("--device", help="default: cuda when there is one, else cpu")
    parser.add_argument("--dtype", help="as lm-eval's dtype model arg: float32, bfloat16, float16 or auto")
    parser.add_argument("--batch_size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the results (created)")
    return parser


def main(argv: list[str]) -> int:
    """Runs `sb-eval distance ARGS`; returns 0, or 2 for arguments, a corpus or a model that
    cannot work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        models = [ModelSpec(args.model, args.model_args)]
        if args.compare:
            models.append(parse_model_spec(args.compare))
        arguments = [model_arguments(model, args) for model in models]
        texts = documents(args.corpus)
    except (DistanceArgumentError, DocumentSourceError, MissingCorpusError) as error:
        parser.print_usage(sys.stderr)
        print(f"sb-eval distance: error: {error}", file=sys.stderr)
        return 2

    results, failures = [], {}
    try:
        for model, model_args, label in zip(models, arguments, labels(models)):
            try:
                result = measure_model(model, model_args, label, texts, args)
            except (DistanceArgumentError, UnsupportedArchitectureError, CheckpointError) as error:
                failures[label] = str(error)
                print(f"sb-eval distance: error: {model.name} with {model.args}: {error}", file=sys.stderr)
                continue
            except BaseException as error:  # reported in the summary, then raised as it is
                failures[label] = f"{type(error).__name__}: {error}"
                raise
            path = args.output / f"{label}.json"
            write_atomically(path, (json.dumps(result, indent=1) + "\n").encode())
            write_atomically(args.output / f"{label}.png", heatmap_png([result], args.remainder))
            print(f"wrote {path}", file=sys.stderr)
            results.append(result)
    finally:
        # what was measured is kept even when a later model fails
        if results:
            if len(results) == 2:
                write_atomically(args.output / COMPARISON_FILE, heatmap_png(results, args.remainder))
            write_atomically(args.output / SUMMARY_FILE, summary_markdown(results, args, failures).encode())
            print(f"wrote {args.output / SUMMARY_FILE}", file=sys.stderr)
    return 2 if failures else 0


def check_arguments(args: argparse.Namespace) -> None:
    if args.length < 2:
        raise DistanceArgumentError(f"--length must be at least 2 tokens, got {args.length}")
    if args.windows < 1:
        raise DistanceArgumentError(f"--windows must be at least 1, got {args.windows}")
    if args.batch_size < 1:
        raise DistanceArgumentError(f"--batch_size must be at least 1, got {args.batch_size}")


def parse_model_spec(spec: str) -> ModelSpec:
    model = split_model_spec(spec)
    if model is None or model.name not in MODELS:
        raise DistanceArgumentError(
            f"--compare {spec!r} must be NAME:ARGS with NAME one of {', '.join(MODELS)}, e.g. "
            "hf:pretrained=/path/to/llama or sb_hf:pretrained=/path/to/checkpoint"
        )
    return model


def model_arguments(model: ModelSpec, args: argparse.Namespace) -> dict:
    """The model's constructor arguments: its model_args, with --device and --dtype applied."""
    arguments = parsed_model_args(model)
    folder = Path(str(arguments["pretrained"])).expanduser()
    if not folder.is_dir():
        raise DistanceArgumentError(
            f"pretrained={arguments['pretrained']} of {model.name} is not a local folder; sb-eval downloads "
            "nothing: save the model to a folder first and pass that folder"
        )
    arguments["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype:
        arguments["dtype"] = args.dtype
    arguments["batch_size"] = args.batch_size
    return arguments


def labels(models: list[ModelSpec]) -> list[str]:
    """File-name labels NAME-FOLDER, numbered where two models would share one."""
    names = []
    for model in models:
        folder = Path(str(parsed_model_args(model)["pretrained"])).expanduser().resolve().name
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name}-{folder}").strip("-")
        names.append(label if label not in names else f"{label}-{len(names) + 1}")
    return names


def load_model(model: ModelSpec, arguments: dict):
    """An lm-eval model object, built as `lm_eval --model NAME --model_args ...` would build it."""
    return model_class(model.name)(**arguments)


def token_windows(texts: list[str], tokenizer, length: int, count: int, join: bool = False) -> list[list[int]]:
    """The first `count` non-overlapping windows of `length` tokens, each document tokenized on
    its own with no special tokens. Without `join` a window never spans two documents and a
    document's tail shorter than `length` is dropped; with `join` the documents' tokens run on as
    one stream (for corpora of short rows, such as Wikitext's lines, which end in newlines)."""
    windows: list[list[int]] = []
    stream: list[int] = []  # tokens not yet cut into a window
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        stream = stream + ids if join else ids
        whole = len(stream) - len(stream) % length
        for start in range(0, whole, length):
            windows.append(stream[start : start + length])
            if len(windows) == count:
                return windows
        stream = stream[whole:]
    if not windows:
        longest = "the whole corpus" if join else "no document of the corpus"
        raise DistanceArgumentError(
            f"{longest} has {length} tokens with this tokenizer ({len(texts)} documents); use a smaller "
            "--length" + ("" if join else ", --join_documents for a corpus of short rows,") + " or a corpus of longer documents"
        )
    return windows


def collect(model, windows: list[list[int]], positions: str, batch_size: int, device, desc: str) -> AttentionStatistics:
    """One forward pass of the decoder (no logits, no cache) per batch of windows."""
    statistics = collect_attention_statistics(model, positions)
    progress = tqdm(total=len(windows), desc=desc, unit="window")
    try:
        for start in range(0, len(windows), batch_size):
            batch = torch.tensor(windows[start : start + batch_size], device=device)
            with torch.no_grad():
                model.base_model(input_ids=batch, use_cache=False)
            progress.update(len(batch))
    finally:
        progress.close()
        stop_collecting(model)
    return statistics


def measure_model(model: ModelSpec, arguments: dict, label: str, texts: list[str], args) -> dict:
    lm = load_model(model, arguments)
    try:
        windows = token_windows(texts, lm.tokenizer, args.length, args.windows, args.join_documents)
        if len(windows) < args.windows:
            print(
                f"sb-eval distance: {label}: the corpus holds {len(windows)} windows of {args.length} tokens, "
                f"not {args.windows}; using those",
                file=sys.stderr,
            )
        statistics = collect(lm.model, windows, args.positions, args.batch_size, lm.device, label).to_dict()
        dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
        device = str(lm.device)
    finally:
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tokens_back = statistics["model_mean"]["tokens_back"][args.remainder]
    return {
        "label": label,
        "model": model.name,
        "model_args": model.args,
        "corpus": args.corpus,
        "join_documents": args.join_documents,
        "length": args.length,
        "windows": len(windows),
        "positions": args.positions,
        "remainder": args.remainder,
        "device": device,
        "dtype": dtype,
        "sign": SIGN_NOTE,
        "model_mean": {
            "tokens_back": tokens_back,
            "signed_distance": None if tokens_back is None else -tokens_back,
            "mass": statistics["model_mean"]["mass"],
        },
        "statistics": statistics,
    }


# ---------------------------------------------------------------------------------------------
# Report: heatmaps and summary.


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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


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
