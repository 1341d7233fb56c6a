"""Token counting with the model's tokenizer, one distinct text piece at a time.

Generating a 64K-token sample by re-tokenizing the whole prompt for every candidate haystack size
costs seconds per sample. Instead each piece of a prompt (template part, haystack sentence, needle)
is tokenized once, memoised, and lengths are fitted by summing piece counts. A piece is counted as
it appears inside a prompt: after an anchor text, minus the anchor's own count, so that a
tokenizer which adds a BOS token or a leading-space marker to a text's start does not count it
once per piece. Only the first piece of a prompt is counted on its own, special tokens included.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from operator import mul
from typing import Any

# Precedes every piece when it is counted; pieces follow a sentence end in a prompt.
ANCHOR = "."

# Covers the kinds of text the generators produce, so that two tokenizers that count these
# differently get different fingerprints.
_FINGERPRINT_PROBE = (
    "Some special magic numbers are hidden within the following text. One of the special magic "
    "uuids for 0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0 is: 9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a.\n"
    "The grass is green. The sky is blue.\nVAR QWERT = 12345 VAR ASDFG = VAR QWERT \n\n"
    "1. apple 2. anxious-armadillo 3. 1234567 \t Ünïcödé — “quotes” … 0123456789 "
    + "".join(chr(c) for c in range(32, 127))
)


class TokenCounter:
    """Counts tokens of texts for one tokenizer, memoising every piece it has counted.

    `tokenizer` is either a Hugging Face tokenizer (anything with `encode`, called batched as
    `tokenizer(texts)`), or a callable mapping one string to a sequence of token ids. Counts
    include whatever special tokens the tokenizer adds by default (a BOS token, say), since the
    model may see them too.
    """

    def __init__(self, tokenizer: Any):
        self._encode_batch = _batch_encoder(tokenizer)
        self._piece_counts: dict[str, int] = {}
        self._first_counts: dict[str, int] = {}
        self._anchor_count = len(self._encode_batch([ANCHOR])[0])
        # What the tokenizer adds to every text (a BOS token, say): RULER counts without it.
        self.special_tokens = len(self._encode_batch([""])[0])

    def count(self, texts: Sequence[str]) -> list[int]:
        """Exact token counts of whole texts (each as the first and only piece of a prompt)."""
        return [len(ids) for ids in self._encode_batch(list(texts))]

    def pieces(self, pieces: Iterable[str]) -> list[int]:
        """Token counts of pieces as they count in the middle of a prompt, memoised."""
        pieces = list(pieces)
        new = list(set(pieces).difference(self._piece_counts))
        if new:
            encoded = self._encode_batch([ANCHOR + p for p in new])
            for piece, ids in zip(new, encoded):
                self._piece_counts[piece] = len(ids) - self._anchor_count
        return list(map(self._piece_counts.__getitem__, pieces))

    def prompt(self, first: str, rest: Iterable[str]) -> int:
        """Estimated token count of `first + "".join(rest)`: the sum of its pieces' counts."""
        if first not in self._first_counts:
            self._first_counts[first] = self.count([first])[0]
        # Long contexts repeat few distinct pieces (noise lines, coded words): count each once.
        repeats = Counter(rest)
        return self._first_counts[first] + sum(map(mul, self.pieces(repeats), repeats.values()))

    def fingerprint(self) -> str:
        """A short hash of how this tokenizer encodes a probe text; part of cache keys."""
        ids = self._encode_batch([_FINGERPRINT_PROBE])[0]
        return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def _batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[Sequence[int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if callable(tokenizer) and hasattr(backend, "encode_batch_fast"):
        # A fast tokenizer's Rust tokenizer itself: the ids `tokenizer(texts)` gives, without
        # transformers' conversion of every text's encoding.
        return lambda texts: [encoding.ids for encoding in backend.encode_batch_fast(texts)] if texts else []
    if hasattr(tokenizer, "encode") and callable(tokenizer):
        return lambda texts: tokenizer(texts)["input_ids"] if texts else []
    if callable(tokenizer):
        return lambda texts: [tokenizer(text) for text in texts]
    raise TypeError(
        f"tokenizer must be a Hugging Face tokenizer or a callable from str to token ids, "
        f"got {type(tokenizer).__name__}"
    )
