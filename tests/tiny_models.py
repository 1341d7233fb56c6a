"""Tiny softmax checkpoints for tests: a random Llama with the byte-level tokenizer, saved like any
local checkpoint that lm-eval's `hf` loads (stick-breaking ones: sb_eval.checkpoint)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sb_eval.tokenization import byte_level_tokenizer


def write_tiny_llama(folder: Path, seed: int = 0, tokenizer=None, **config) -> Path:
    """A random LlamaForCausalLM (weights from torch's generator seeded with `seed`) and its
    tokenizer (default: the byte-level one) in `folder`; `config` sets LlamaConfig fields beyond
    the vocabulary and the special ids, which come from the tokenizer."""
    tokenizer = tokenizer or byte_level_tokenizer()
    end = tokenizer.eos_token_id
    llama_config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=end, eos_token_id=end, pad_token_id=end, **config)
    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
