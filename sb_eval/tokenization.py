"""Tokenizers that need no download, for the small checkpoints the package writes and trains.

A byte-level one (one token per UTF-8 byte plus end-of-text) and a byte-level BPE learnt from
offline text, for text; a word-level one over a fixed list of symbols for synthetic tasks. Real
checkpoints ship their own tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (GPT-2's byte-to-character alphabet) and <|endoftext|> = 256 as bos, eos and
    pad; no merges, so every text round-trips exactly and token count = UTF-8 byte count."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=_byte_of_char)
    vocab = {char: index for index, char in enumerate(byte_chars)}
    vocab[END_OF_TEXT] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _with_end_of_text(tokenizer)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme: every byte is a token, merges learnt from `texts`) of
    `vocab_size` ids (fewer when the texts run out of pairs to merge), then <|endoftext|> as bos,
    eos and pad (the last id). Any text round-trips exactly. Deterministic for the same texts."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet):
        raise ValueError(f"vocab_size must be at least the {len(alphabet)} byte tokens, got {vocab_size}")
    if not texts:
        raise ValueError("train_bpe_tokenizer needs at least one text to learn merges from")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return _with_end_of_text(tokenizer)


def _with_end_of_text(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around `tokenizer`, whose last id must be <|endoftext|>: it is
    bos, eos and pad, and lengths are unlimited (no position embedding bounds them)."""
    tokenizer.add_special_tokens([END_OF_TEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1 << 20,
    )


def _byte_of_char(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256+."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def word_level_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """One token per word, id = the word's index in `words`, then <|endoftext|> as bos, eos and pad
    (id len(words)). Text is split on whitespace and decodes with single spaces, so a sequence
    written as space-separated words round-trips to the same ids. A word not in the list encodes
    as <|endoftext|> (WordLevel needs an unknown token)."""
    if len(set(words)) != len(words):
        raise ValueError("word_level_tokenizer: `words` has duplicates")
    bad = [word for word in words if not word or any(char.isspace() for char in word) or word == END_OF_TEXT]
    if bad:
        raise ValueError(f"word_level_tokenizer: words must be non-empty, without whitespace and not {END_OF_TEXT}; got {bad[:3]}")
    vocab = {word: index for index, word in enumerate(words)}
    vocab[END_OF_TEXT] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=END_OF_TEXT))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="\u0000", cleanup=False)  # joins words with spaces
    return _with_end_of_text(tokenizer)
