"""The measuring behind `sb-eval distance` (sb_eval.commands.distance): each model's tokenizer cuts
the corpus into windows, one forward pass per batch of windows collects the attention statistics
(sb_eval.analysis.attention_stats), and each model's result is a JSON-ready dict."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from sb_eval.analysis.attention_stats import AttentionStatistics, collecting_attention_statistics
from sb_eval.analysis.definitions import SIGN_NOTE
from sb_eval.data.documents import documents
from sb_eval.files import check_output_folder

from .compared_models import load_model, local_model_arguments, parse_compare
from .sweep import ModelSpec, free_memory


class DistanceArgumentError(ValueError):
    """An argument of `sb-eval distance` that cannot work; the message says what is valid."""



def prepare(args: argparse.Namespace) -> tuple[list[ModelSpec], list[dict], list[str]]:
    """The models, their constructor arguments and the corpus's documents, from the parsed
    arguments of `sb-eval distance`; raises DistanceArgumentError (or the corpus's error) for
    any that cannot work, before a model is loaded."""
    check_arguments(args)
    models = [ModelSpec(args.model, args.model_args)]
    if args.compare:
        models.append(parse_compare(args.compare, DistanceArgumentError))
    arguments = [
        {**local_model_arguments(model, args.device, args.dtype, DistanceArgumentError), "batch_size": args.batch_size}
        for model in models
    ]
    return models, arguments, documents(args.corpus)


def check_arguments(args: argparse.Namespace) -> None:
    if args.length < 2:
        raise DistanceArgumentError(f"--length must be at least 2 tokens, got {args.length}")
    if args.windows < 1:
        raise DistanceArgumentError(f"--windows must be at least 1, got {args.windows}")
    if args.batch_size < 1:
        raise DistanceArgumentError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_output_folder(args.output, "--output", DistanceArgumentError)





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
    with collecting_attention_statistics(model, positions) as statistics, tqdm(total=len(windows), desc=desc, unit="window") as progress:
        for start in range(0, len(windows), batch_size):
            batch = torch.tensor(windows[start : start + batch_size], device=device)
            with torch.no_grad():
                model.base_model(input_ids=batch, use_cache=False)
            progress.update(len(batch))
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
        free_memory()
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
