"""Checkpoint folders: checks before loading, and small random checkpoints in the released format.

The checks read only config.json and the safetensors headers (no weights), so a wrong folder
fails in milliseconds with one message that names the file and the field, instead of loading
gigabytes and then warning that weights were left random.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration import StickBreakingConfig
from .modeling import StickBreakingForCausalLM

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


def check_checkpoint_folder(folder: str | os.PathLike, allow_pickle: bool = False) -> None:
    """Raises CheckpointError unless `folder` holds a loadable stick-breaking checkpoint.

    Checks config.json's model_type and fields, that the weights are safetensors (pickle only
    with allow_pickle), and that the tensor names and shapes are exactly those the config needs.
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
    check_tensor_shapes(folder, config, shards)


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


def check_tensor_shapes(folder: Path, config: StickBreakingConfig, shards: list[Path]) -> None:
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for shard in shards:
        for name, shape in read_safetensors_shapes(shard).items():
            found[name] = (shape, shard)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in StickBreakingForCausalLM(config).state_dict().items()}
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


def tiny_config(**overrides) -> StickBreakingConfig:
    """A small stick-breaking config in the released format, sized for CPU tests and demos:
    the 3B's choices (swiglu, rmsnorm, muP multipliers, attention_multiplier 1/head_dim, no
    remainder, tied embeddings) at 4 layers x 128 wide, for the byte-level tokenizer's 257 ids."""
    fields = dict(
        vocab_size=257, n_positions=2048, n_embd=128, n_layer=4, n_head=4, n_inner=256,
        activation_function="swiglu", normalization_function="rmsnorm", layer_norm_epsilon=1e-5,
        attention_multiplier=1 / 32, m_emb=12.0, m_residual=0.22, m_width=2.0,
        sb_remainder=False, tie_word_embeddings=True,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )
    fields.update(overrides)
    return StickBreakingConfig(**fields)


def released_3b_config(**overrides) -> StickBreakingConfig:
    """The released 3B checkpoint's config (DESIGN.md section 6), for benchmarks at its shapes."""
    fields = dict(
        vocab_size=50304, n_positions=4096, n_embd=2304, n_layer=40, n_head=36, n_inner=9216,
        activation_function="swiglu", normalization_function="rmsnorm", layer_norm_epsilon=1e-5,
        attention_multiplier=1 / 64, m_emb=12, m_residual=0.22, m_width=9, sb_remainder=False,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=50256,
    )
    fields.update(overrides)
    return StickBreakingConfig(**fields)


def write_random_checkpoint(
    folder: str | os.PathLike,
    config: StickBreakingConfig | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> Path:
    """Writes a randomly initialised stick-breaking checkpoint and the byte-level tokenizer.

    `device` is where the weights are initialised (a GPU makes billions of them fast). The folder
    is built beside the target and renamed into place, so a crash leaves nothing half-written.
    Returns the folder.
    """
    from .tokenizer import byte_level_tokenizer

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
    config = config or tiny_config()
    torch.manual_seed(seed)
    with torch.device(device):
        model = StickBreakingForCausalLM(config).to(dtype)
    return save_checkpoint(model, byte_level_tokenizer(), folder)


def save_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> Path:
    """The model (safetensors) and its tokenizer, written beside `folder` and renamed into place
    (replacing what was there), so a crash leaves nothing half-written. Returns the folder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
