"""Local stand-ins shared by the RULER, data and task tests (no tests here): tokenizers that need
no download, and a small essay corpus written into a temporary data directory."""

from __future__ import annotations

import json
import random
from functools import cache
from importlib.resources import files
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sb_eval.ruler.corpora import ESSAY_SENTENCES_FILE
from sb_eval.tokenization import END_OF_TEXT


@cache
def _words() -> list[str]:
    text = (files("wonderwords") / "assets" / "nounlist.txt").read_text(encoding="utf-8")
    return text.split()


def standin_sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of 4-20 random English words, some ending in '?' or '!' like essay sentences."""
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(_words()) for _ in range(rng.randint(4, 20))).capitalize() + rng.choice("...?!")
        for _ in range(count)
    ]


def write_standin_essays(data_dir: Path, count: int = 4000) -> list[str]:
    """An essay corpus in the layout `sb-eval data fetch essays` writes."""
    sentences = standin_sentences(count)
    path = data_dir / ESSAY_SENTENCES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"source": "test stand-in", "sentences": sentences}), encoding="utf-8")
    return sentences


@cache
def merging_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE (2000 tokens) trained on stand-in sentences and RULER's
    prompt words, so that its merges span whole words, numbers and parts of uuids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    corpus = standin_sentences(3000, seed=1) + [
        f"One of the special magic numbers for {rng.choice(_words())} is: {rng.randint(10**6, 10**7)}. "
        f"VAR {rng.choice(_words()).upper()} = {rng.randint(10000, 99999)} {rng.getrandbits(128):x}"
        for _ in range(2000)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[END_OF_TEXT]
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, model_max_length=1 << 20)
