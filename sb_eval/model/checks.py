"""Checks of a checkpoint folder before it is loaded.

The checks read only config.json and the safetensors headers (no weights), so a wrong folder
fails in milliseconds with one message that names the file and the field, instead of loading
gigabytes and then warning that weights were left random. The tensors a config needs come from
the model class itself (built on the meta device), which the caller passes in.
"""

from __future__ import annotations

import json
import math
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
    """The weight files: model.safetensors.index.json's shards (each checked to exist), or
    model.safetensors; [] when there are neither."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes()).get("weight_map")
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} is not a safetensors index: expected a JSON object whose \"weight_map\" maps "
                                  "tensor names to shard file names")
        shards = sorted({folder / name for name in weight_map.values()})
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{shard} is listed in {index.name} but does not exist")
        return shards
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# A header longer than this is not a checkpoint's (the released 3B's is ~40 KB).
MAX_HEADER_BYTES = 100 * 2**20


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, without reading the data; the header
    checked first: its length, its JSON, every tensor's dtype, shape and byte range inside the
    file, and the file ending where the last tensor does. Raises CheckpointError naming the file
    and what is wrong."""
    size = path.stat().st_size
    problem = f"{path} is not a safetensors file"
    if size < 8:
        raise CheckpointError(f"{problem}: it has {size} bytes, fewer than the 8 of a header length (cut off?)")
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        if header_size > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{problem}: its first 8 bytes give a header of {header_size} bytes, but the file "
                                  f"has {size} bytes (cut off, or not safetensors)")
        raw = file.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{problem}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{problem}: its header is not a JSON object")
    data_size = size - 8 - header_size
    shapes, end_of_data = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        element = SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if element is None or not _integers(shape) or not _integers(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{path}: tensor {name!r} has no valid dtype, shape and data_offsets in the header")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size or end - begin != element * math.prod(shape):
            raise CheckpointError(
                f"{path}: tensor {name!r} ({entry['dtype']} {shape}) claims bytes {begin}..{end} of a data section of "
                f"{data_size} bytes, which {'cannot hold them' if end > data_size else 'is not its size'} (cut off or damaged)"
            )
        shapes[name] = tuple(shape)
        end_of_data = max(end_of_data, end)
    if end_of_data != data_size:
        raise CheckpointError(f"{path}: its tensors end at byte {end_of_data} of a data section of {data_size} bytes "
                              "(a file that was cut off or appended to)")
    return shapes


def _integers(value) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


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
