"""Writing checkpoint folders in the released format: any model with its tokenizer, atomically,
and small random stick-breaking checkpoints for tests and demos."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb_eval.tokenization import byte_level_tokenizer

from .configuration import StickBreakingConfig, tiny_config
from .modeling import StickBreakingForCausalLM


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
