"""The checkpoint that ships in the package: a loadable stick-breaking model with its tokenizer,
within the size budget, used by sb_hf when no pretrained is given, and one that retrieves."""

import json
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.checks import check_checkpoint_folder
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.ruler.generate import generate
from sb_eval.ruler.registry import TASKS

PACKAGE_BUDGET_BYTES = 60 * 1024 * 1024


def test_the_default_checkpoint_is_complete_and_within_the_package_budget():
    check_checkpoint_folder(DEFAULT_CHECKPOINT, StickBreakingForCausalLM)
    size = sum(path.stat().st_size for path in DEFAULT_CHECKPOINT.iterdir())
    assert size <= PACKAGE_BUDGET_BYTES, f"{size / 2**20:.1f} MiB"
    card = (DEFAULT_CHECKPOINT / "README.md").read_text()
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    assert config["model_type"] == "stickbreaking" and f"{config['n_layer']} layers" in card


def test_sb_hf_without_pretrained_evaluates_the_default_checkpoint_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        lm = StickBreakingLM(device="cpu", batch_size=1)
    assert "no pretrained=PATH given" in caplog.text and str(DEFAULT_CHECKPOINT) in caplog.text
    assert lm.model.config.n_layer == json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["n_layer"]
    assert lm.tokenizer.vocab_size <= lm.model.config.vocab_size


def test_the_default_checkpoint_finds_a_needle_on_the_cpu():
    """Greedy answers to a few RULER single-needle prompts at 1K tokens, through transformers'
    generate on the torch attention backend: the trained model gets most of them right (a random
    one gets none)."""
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_CHECKPOINT)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_CHECKPOINT, dtype=torch.float32).eval()
    model.set_attention_backend("torch")
    samples = generate(TASKS["niah_single_1"], 1024, tokenizer, 4, seed=42, use_cache=False)
    found = 0
    for sample in samples:
        ids = tokenizer(sample["input"], return_tensors="pt").input_ids
        with torch.no_grad():
            output = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(output[0, ids.shape[1]:])
        found += all(value in answer for value in sample["outputs"])
    assert found >= 3, f"{found} of {len(samples)} needles found"
