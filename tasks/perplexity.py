"""The functions the perplexity YAMLs name.

`sb_ppl` (long-document perplexity): for every length L in `max_seq_lengths`, windows of L tokens
of the same documents, ending at the same places and scored on the same last K tokens, so that
every L is measured on identical targets and only the context grows. A window is one
loglikelihood request: context = its first L - K tokens (special tokens the tokenizer adds, a
BOS say, included), continuation = its last K. Metrics per L: `nll_L` (mean negative
log-likelihood of the target tokens, nats per token), `bits_per_byte_L` (of the target text,
UTF-8) and `windows_L` (how many windows were scored).

lm-eval scores text: it re-encodes each request, the context alone and context + continuation,
and takes the continuation's tokens as those after the context's. So windows are cut where that
re-encoding gives back exactly the document's own tokens: the request's texts are substrings of
the document whose encodings are the document's token slices, checked for every window and
length. A cut is searched within `END_SEARCH` tokens of where it was wanted.

Metadata (`--metadata` merged over `--model_args`): max_seq_lengths (default 2048..65536),
target_tokens K (default 512, below the smallest L), max_context (default 65536: every window
leaves room for this many tokens, and documents shorter are not used; whatever lengths are asked
for, the same windows), windows_per_document (default 4), corpus
(default the fetched long documents, "aa-lcr"; anything `sb_eval.data.documents` accepts), and
the tokenizer as for the RULER tasks (`tokenizer`, else `pretrained` or `model`, else the default
checkpoint's). From the YAML's dataset_kwargs: metric_lengths, the lengths its metric_list declares: a length must be declared,
since lm-eval would average an undeclared metric's (log-likelihood, bytes) pairs as numbers.

`sb_wikitext`: lm-eval's own Wikitext scoring (its detokenizer, process_results and metrics,
named by reference in the YAML) on the document-level Wikitext-2 test split loaded through
`datasets`, or on another `corpus`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
from tqdm import tqdm

from sb_eval.data.documents import DocumentSourceError, documents
from sb_eval.ruler import cache as sample_cache
from sb_eval.ruler.corpora import LONG_DOCUMENTS, MissingCorpusError, data_dir, fetch_command
from sb_eval.ruler.tokens import TokenCounter

from .ruler_tasks import load_tokenizer, positive_int, tokenizer_name

logger = logging.getLogger(__name__)

DEFAULT_MAX_SEQ_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_MAX_CONTEXT = 65536
DEFAULT_TARGET_TOKENS = 512
DEFAULT_WINDOWS_PER_DOCUMENT = 4
# How far (in tokens, either way) a window's end may move to find cuts that re-encode exactly.
END_SEARCH = 64
# Tokens on each side of a cut that a quick check re-encodes before the whole window is checked.
LOCAL_CHECK_TOKENS = 16
WINDOWS_VERSION = 1  # bump when the windows chosen for the same inputs change; part of cache keys

Encode = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True)
class Window:
    """Where one window lies in its document, in characters: starts[L] is where its L-token
    version starts; all versions share target_start and end. The context is text[start:
    target_start] (never ending in whitespace, which lm-eval would move into the continuation)
    and the continuation text[target_start:end]."""

    document: int
    target_start: int
    end: int
    starts: dict[int, int]


def sb_ppl_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The test split: each window at every requested length (window 0 at each L, then window 1,
    ...), so that `--limit N` keeps identical targets across lengths.

    The windows do not depend on which lengths are requested: they are cut for every declared
    length up to max_context, so that runs of one length each (a sweep) score the same targets.
    """
    declared = kwargs.get("metric_lengths")
    lengths = _lengths(kwargs.get("max_seq_lengths", DEFAULT_MAX_SEQ_LENGTHS), declared)
    target_tokens = positive_int(kwargs.get("target_tokens", DEFAULT_TARGET_TOKENS), "metadata target_tokens")
    if target_tokens >= min(lengths):
        raise ValueError(f"metadata target_tokens={target_tokens} must be below the smallest of max_seq_lengths={lengths}")
    max_context = positive_int(kwargs.get("max_context", DEFAULT_MAX_CONTEXT), "metadata max_context")
    if max(lengths) > max_context:
        raise ValueError(
            f"metadata max_seq_lengths={lengths} exceeds max_context={max_context}, the window every "
            "window leaves room for; raise max_context (the windows then change, and fewer documents are long enough)"
        )
    cut_lengths = sorted(set(lengths) | {length for length in declared or [] if target_tokens < length <= max_context})
    per_document = positive_int(kwargs.get("windows_per_document", DEFAULT_WINDOWS_PER_DOCUMENT), "metadata windows_per_document")
    tokenizer_source = tokenizer_name(kwargs)
    corpus = kwargs.get("corpus", LONG_DOCUMENTS)
    texts = documents(corpus)
    tokenizer = load_tokenizer(tokenizer_source)
    special_tokens = {} if kwargs.get("add_bos_token") is None else {"add_special_tokens": bool(kwargs["add_bos_token"])}
    windows = long_document_windows(texts, tokenizer, cut_lengths, target_tokens, per_document, max_context, special_tokens)
    if not windows:
        raise ValueError(
            f"no document of corpus {corpus!r} holds a window of max_context={max_context} tokens with this "
            f"tokenizer ({len(texts)} documents); use a smaller max_context or longer documents"
        )
    logger.info("sb_ppl: %d windows in %d documents of %s", len(windows), len({w.document for w in windows}), corpus)
    rows = []
    for index, window in enumerate(windows):
        text = texts[window.document]
        continuation = text[window.target_start : window.end]
        for length in lengths:
            rows.append(
                {
                    "context": text[window.starts[length] : window.target_start],
                    "continuation": continuation,
                    "max_length": length,
                    "target_tokens": target_tokens,
                    "target_bytes": len(continuation.encode("utf-8")),
                    "document": window.document,
                    "window": index,
                }
            )
    return {"test": datasets.Dataset.from_list(rows)}


def process_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, Any]:
    """Per window: nll_L (nats per target token), bits_per_byte_L as lm-eval's (log-likelihood,
    bytes) pair, which its bits_per_byte aggregation pools over windows, and windows_L."""
    (loglikelihood, _) = results[0]
    length = doc["max_length"]
    return {
        f"nll_{length}": -loglikelihood / doc["target_tokens"],
        f"bits_per_byte_{length}": (loglikelihood, doc["target_bytes"]),
        f"windows_{length}": 1,
    }


def count(items: Sequence[Any]) -> int:
    """Aggregation for windows_L: how many windows were scored."""
    return len(items)


def long_document_windows(
    texts: Sequence[str],
    tokenizer: Any,
    lengths: Sequence[int],
    target_tokens: int,
    windows_per_document: int,
    max_context: int,
    special_tokens: dict[str, bool] | None = None,
    *,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> list[Window]:
    """Windows of every length in `lengths` tokens over `texts`, as lm-eval's HFLM will encode
    them (the tokenizer's default special tokens, or `special_tokens` = {"add_special_tokens":
    bool} as the model's add_bos_token sets them). Up to `windows_per_document` per document of
    at least `max_context` tokens, their ends spread evenly over the part of the document where
    a window of max_context tokens fits, targets not overlapping. Cached on disk (default:
    <data dir>/perplexity-cache) by texts, tokenizer, settings and WINDOWS_VERSION."""
    special_tokens = special_tokens or {}

    def encode(batch: list[str]) -> list[list[int]]:
        return tokenizer(batch, verbose=False, **special_tokens)["input_ids"] if batch else []

    key = {
        "windows": "sb_ppl",
        "version": WINDOWS_VERSION,
        "documents": _fingerprint(texts),
        "tokenizer": TokenCounter(tokenizer).fingerprint(),
        "special_tokens": special_tokens,
        "lengths": sorted(lengths),
        "target_tokens": target_tokens,
        "windows_per_document": windows_per_document,
        "max_context": max_context,
    }
    path = sample_cache.path_for(key, cache_dir if cache_dir is not None else data_dir() / "perplexity-cache")
    if use_cache and (stored := sample_cache.load(path, key)) is not None:
        return [Window(w["document"], w["target_start"], w["end"], {int(k): v for k, v in w["starts"].items()}) for w in stored]
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("sb_ppl needs a fast (Rust) Hugging Face tokenizer: it locates tokens in the text by their offsets")
    prefix = encode([""])[0]  # what the tokenizer puts before every text (a BOS token, say)
    windows = []
    for index, text in enumerate(tqdm(texts, desc="sb_ppl windows", leave=False)):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        finder = _WindowFinder(text, encoding["input_ids"], encoding["offset_mapping"], tokenizer, encode, prefix)
        windows += [Window(index, *found) for found in finder.windows(sorted(lengths), target_tokens, windows_per_document, max_context)]
    if use_cache:
        sample_cache.store(path, key, [asdict(window) for window in windows])
    return windows


class _WindowFinder:
    """Cuts in one document: token indices whose texts re-encode to the document's own tokens."""

    def __init__(self, text: str, ids: list[int], offsets: list[tuple[int, int]], tokenizer: Any, encode: Encode, prefix: list[int]):
        self.text, self.ids, self.tokenizer, self.encode, self.prefix = text, ids, tokenizer, encode, prefix
        # Where the text splits before token i: the end of token i-1, or the start of token i if
        # that comes first (two tokens of one character; their cut is rejected by the checks).
        # Whitespace a tokenizer leaves out of its offsets thus goes with the token after it.
        self.cut = [0] + [min(end, start) for (_, end), (start, _) in zip(offsets, offsets[1:])] + [len(text)]
        self.clean: dict[int, bool] = {}

    def windows(self, lengths: list[int], target_tokens: int, count: int, max_context: int) -> list[tuple[int, int, dict[int, int]]]:
        first_end = max_context - len(self.prefix)  # the earliest end with room for max_context tokens
        span = len(self.ids) - first_end
        if span < 0:
            return []
        found: list[tuple[int, int, dict[int, int]]] = []
        last_end = None
        for wanted in sorted({first_end + round(span * (k + 1) / count) for k in range(count)}):
            for end in self._near(wanted, first_end):
                if last_end is not None and end - target_tokens < last_end:
                    continue  # targets must not overlap the previous window's
                window = self._window(end, lengths, target_tokens)
                if window is not None:
                    found.append(window)
                    last_end = end
                    break
        return found

    def _near(self, wanted: int, first_end: int) -> list[int]:
        candidates = [wanted + step * sign for step in range(END_SEARCH + 1) for sign in ((1,) if step == 0 else (-1, 1))]
        return [end for end in candidates if first_end <= end <= len(self.ids)]

    def _window(self, end: int, lengths: list[int], target_tokens: int) -> tuple[int, int, dict[int, int]] | None:
        target_start = end - target_tokens
        starts = {length: end - length + len(self.prefix) for length in lengths}
        if not all(self._is_clean(i) for i in [end, target_start, *starts.values()]):
            return None
        # lm-eval moves a context's trailing whitespace into its continuation; do it here, so that
        # the texts below are exactly the ones it encodes
        target_char = len(self.text[: self.cut[target_start]].rstrip())
        end_char = self.cut[end]
        contexts = [self.text[self.cut[start] : target_char] for start in starts.values()]
        encoded = self.encode(contexts + [context + self.text[target_char:end_char] for context in contexts])
        for i, start in enumerate(starts.values()):
            context_ids, whole_ids = encoded[i], encoded[len(contexts) + i]
            if context_ids != self.prefix + self.ids[start:target_start] or whole_ids[len(context_ids) :] != self.ids[target_start:end]:
                return None
        return target_char, end_char, {length: self.cut[start] for length, start in starts.items()}

    def _is_clean(self, i: int) -> bool:
        """A quick test of a cut before token i: the texts on either side and across it encode to
        the document's tokens, LOCAL_CHECK_TOKENS each way."""
        if i not in self.clean:
            before, after = max(0, i - LOCAL_CHECK_TOKENS), min(len(self.ids), i + LOCAL_CHECK_TOKENS)
            pieces = [(before, i), (i, after), (before, after)]
            texts = [self.text[self.cut[a] : self.cut[b]] for a, b in pieces]
            encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
            self.clean[i] = all(ids == self.ids[a:b] for ids, (a, b) in zip(encoded, pieces))
        return self.clean[i]


WIKITEXT = "hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1:test"


def wikitext_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The test split for sb_wikitext: documents as {"page": text}, the field lm-eval's Wikitext
    functions read. From metadata `corpus` (default: document-level Wikitext-2's test split
    through `datasets`). lm-eval scores them with rolling windows of the model's max_length; a
    length sweep's max_seq_lengths=[L] must therefore come with --model_args max_length=L."""
    if "max_seq_lengths" in kwargs:
        lengths = kwargs["max_seq_lengths"]
        lengths = [lengths] if isinstance(lengths, int) else lengths
        if lengths != [kwargs.get("max_length")]:
            raise ValueError(
                f"metadata max_seq_lengths={kwargs['max_seq_lengths']!r}: sb_wikitext scores with rolling "
                f"windows of the model's max_length (here {kwargs.get('max_length')!r}); for one length L "
                "pass --model_args max_length=L with max_seq_lengths=[L]"
            )
    source = kwargs.get("corpus", WIKITEXT)
    try:
        pages = documents(source)
    except (DocumentSourceError, MissingCorpusError) as error:
        raise DocumentSourceError(
            f"sb_wikitext could not read its documents: {error}\nWikitext comes through `datasets`, "
            "from its cache or the network. Offline, measure long-document perplexity with sb_ppl "
            f"on the fetched corpus instead: {fetch_command(LONG_DOCUMENTS)}, then --tasks sb_ppl"
        ) from error
    return {"test": datasets.Dataset.from_list([{"page": page} for page in pages])}


def _fingerprint(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()[:24]


def _lengths(value: Any, declared: list[int] | None) -> list[int]:
    lengths = [value] if isinstance(value, int) else value
    if not isinstance(lengths, list) or not lengths:
        raise ValueError(f"metadata max_seq_lengths={value!r} must be a list of token counts, e.g. [4096, 8192]")
    for length in lengths:
        positive_int(length, "metadata max_seq_lengths")
        if declared is not None and length not in declared:
            raise ValueError(
                f"metadata max_seq_lengths: this task declares metrics for the lengths {declared}, not "
                f"{length}; for another length, copy its YAML and add the length to metric_lengths and "
                "its nll_L, bits_per_byte_L and windows_L to metric_list"
            )
    return sorted(set(lengths))
