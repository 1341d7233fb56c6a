"""Checks of a checkpoint folder before it is loaded.

The checks read only config.json and the safetensors headers (no weights), so a wrong folder
fails in milliseconds with one message that names the file and the field, instead of loading
gigabytes and then warning that weights were left random. The tensors a config needs come from
the model class itself (built on the meta device), which the caller passes in.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .configuration import StickBreakingConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Which config.json fields decide the shape of each kind of tensor, for error messages.
SHAPE_FIELDS = {
    "wte": "vocab_size, n_embd",
    "lm_head": "vocab_size, n_embd",
    "c_attn": "n_embd, n_head, num_key_value_heads, attention_head_type",
    "c_fc": "n_embd, n_inner, activation_function",
    "c_proj": "n_embd, n_inner",
    "remainder_bias": "n_head, n_embd",
}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as a stick-breaking model."""


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; expected a checkpoint folder saved by "
                              "save_pretrained (config.json, model.safetensors, tokenizer files)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def check_checkpoint_folder(
    folder: str | os.PathLike, model_class: type[PreTrainedModel], allow_pickle: bool = False
) -> None:
    """Raises CheckpointError unless `folder` holds a checkpoint that `model_class` (a stick-breaking
    model class, sb_eval.model.modeling) loads.

    Checks config.json's model_type and fields, that the weights are safetensors (pickle only
    with allow_pickle), and that the tensor names and shapes are exactly those that
    `model_class(config)` has.
    """
    folder = Path(folder)
    raw = read_config(folder)
    model_type = raw.get("model_type")
    if model_type != StickBreakingConfig.model_type:
        raise CheckpointError(
            f"{folder / 'config.json'}: model_type is {model_type!r}, but this loads "
            f"'{StickBreakingConfig.model_type}' checkpoints; evaluate other models with "
            "lm_eval's --model hf"
        )
    try:
        config = StickBreakingConfig.from_dict(raw)
    except ValueError as error:
        raise CheckpointError(f"{folder}: {error}") from error

    shards = safetensors_shards(folder)
    if not shards:
        pickles = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
        if not pickles:
            raise CheckpointError(f"{folder} has no weights: expected model.safetensors "
                                  "(or model.safetensors.index.json and its shards)")
        if allow_pickle:
            return
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded. Convert them to safetensors, or opt in if you trust the file: "
            "from_pretrained(..., use_safetensors=False), or allow_pickle=True in sb_hf's "
            "--model_args"
        )
    check_tensor_shapes(folder, config, shards, model_class)


def safetensors_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({folder / name for name in weight_map.values()})
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header, without reading the data."""
    if not path.is_file():
        raise CheckpointError(f"{path} is listed in the checkpoint's index but does not exist")
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def check_tensor_shapes(folder: Path, config: StickBreakingConfig, shards: list[Path], model_class: type[PreTrainedModel]) -> None:
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for shard in shards:
        for name, shape in read_safetensors_shapes(shard).items():
            found[name] = (shape, shard)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in model_class(config).state_dict().items()}
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some exporters save the tied copy too

    files = ", ".join(str(s) for s in shards)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{files} lacks {len(missing)} tensor(s) that config.json needs: "
            f"{_preview(missing)} (config.json: n_layer={config.n_layer}, "
            f"tie_word_embeddings={config.tie_word_embeddings}, add_bias={config.add_bias}, "
            f"sb_remainder_bias={config.sb_remainder_bias}, sb_group_norm={config.sb_group_norm})"
        )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{files} has {len(unexpected)} tensor(s) that config.json does not describe: "
            f"{_preview(unexpected)} (config.json: n_layer={config.n_layer})"
        )
    for name, want in expected.items():
        shape, shard = found[name]
        if shape != want:
            kind = next((k for k in SHAPE_FIELDS if k in name), None)
            fields = f"; set by config.json's {SHAPE_FIELDS[kind]}" if kind else ""
            raise CheckpointError(
                f"{shard}: tensor {name} has shape {list(shape)} but config.json implies "
                f"{list(want)}{fields}"
            )


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_tokenizer_folder(folder: str | os.PathLike) -> None:
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save one beside the "
            "weights or pass tokenizer=PATH in --model_args"
        )
