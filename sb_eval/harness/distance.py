"""The measuring behind `sb-eval distance` (sb_eval.commands.distance): each model's tokenizer cuts
the corpus into windows, one forward pass per batch of windows collects the attention statistics
(sb_eval.analysis.attention_stats), and each model's result is a JSON-ready dict."""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

import torch
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from sb_eval.analysis.attention_stats import AttentionStatistics, collecting_attention_statistics
from sb_eval.analysis.definitions import SIGN_NOTE
from sb_eval.data.documents import documents
from sb_eval.files import OutputFolderError, check_output_folder

from .sweep import ModelSpec, model_class, split_model_spec

MODELS = ("sb_hf", "hf")


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


def prepare(args: argparse.Namespace) -> tuple[list[ModelSpec], list[dict], list[str]]:
    """The models, their constructor arguments and the corpus's documents, from the parsed
    arguments of `sb-eval distance`; raises DistanceArgumentError (or the corpus's error) for
    any that cannot work, before a model is loaded."""
    check_arguments(args)
    models = [ModelSpec(args.model, args.model_args)]
    if args.compare:
        models.append(parse_model_spec(args.compare))
    arguments = [model_arguments(model, args) for model in models]
    return models, arguments, documents(args.corpus)


def check_arguments(args: argparse.Namespace) -> None:
    if args.length < 2:
        raise DistanceArgumentError(f"--length must be at least 2 tokens, got {args.length}")
    if args.windows < 1:
        raise DistanceArgumentError(f"--windows must be at least 1, got {args.windows}")
    if args.batch_size < 1:
        raise DistanceArgumentError(f"--batch_size must be at least 1, got {args.batch_size}")
    try:
        check_output_folder(args.output, "--output")
    except OutputFolderError as error:
        raise DistanceArgumentError(str(error)) from None


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
    if arguments["device"].startswith("cuda") and not torch.cuda.is_available():
        raise DistanceArgumentError(f"--device {args.device}: this machine has no CUDA device; use --device cpu (the default here)")
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
