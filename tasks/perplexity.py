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

`sb_wikitext`: lm-eval's Wikitext perplexity at every length L in `max_seq_lengths` in one run.
lm-eval's own `wikitext` scores each document with loglikelihood_rolling in windows of the
model's max_length, so one run gives one length. Here each document's windows of every L are
cut as lm-eval's rolling scheme cuts them (its own get_rolling_token_windows) and sent as plain
loglikelihood requests, whose texts HFLM re-encodes to the windows' tokens (checked for each
window, as for sb_ppl); the document's log-likelihood at L is the sum over its windows. Metrics
per L: lm-eval's `word_perplexity_L`, `byte_perplexity_L` and `bits_per_byte_L` (its
process_results: words and bytes of the page as read, before its detokenizer), `windows_L` and
`approximate_windows_L`, and what L means for the corpus: `documents_longer_L` and
`tokens_in_longer_L`; and `longest_document` in tokens.

Metadata: max_seq_lengths (default 2048..65536, each declared in the YAML), corpus (default
document-level Wikitext-2's test split through `datasets`), detokenize (lm-eval's Wikitext
detokenizer; default true for a `datasets` source named wikitext, false for others), the
tokenizer as above, and from --model_args as HFLM uses them: max_length (lengths above it are
refused), add_bos_token and prefix_token_id.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import datasets
from lm_eval.api.instance import Instance
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results as wikitext_process_results
from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from sb_eval.data.documents import HF_PREFIX, DocumentSourceError, documents
from sb_eval.options import parse_bool
from sb_eval.ruler import cache as sample_cache
from sb_eval.ruler.corpora import LONG_DOCUMENTS, MissingCorpusError, data_dir, fetch_command
from sb_eval.ruler.tokens import TokenCounter

from .ruler_tasks import TOKENIZER_KEYS, check_metadata, load_tokenizer, positive_int, tokenizer_name

# The --metadata settings (and YAML dataset_kwargs) of sb_ppl and sb_wikitext.
SB_PPL_SETTINGS = ("max_seq_lengths", "target_tokens", "max_context", "windows_per_document", "corpus", *TOKENIZER_KEYS)
SB_WIKITEXT_SETTINGS = ("max_seq_lengths", "corpus", "detokenize", *TOKENIZER_KEYS)

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
    check_metadata(kwargs, SB_PPL_SETTINGS, "sb_ppl", ("metric_lengths",))
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
    special_tokens = {} if kwargs.get("add_bos_token") is None else {"add_special_tokens": parse_bool(kwargs["add_bos_token"], "add_bos_token")}
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
        self.cut = token_cuts(text, offsets)
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


def token_cuts(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Where `text` splits before each token, from the tokens' character offsets: n + 1 positions
    for n tokens, the first 0 and the last len(text). Before token i: the end of token i-1, or the
    start of token i if that comes first (two tokens of one character; a request cut there does
    not re-encode to them, which the callers check). Whitespace a tokenizer leaves out of its
    offsets thus goes with the token after it."""
    return [0] + [min(end, start) for (_, end), (start, _) in zip(offsets, offsets[1:])] + [len(text)]


WIKITEXT = "hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1:test"
# Sources whose `datasets` name holds this are Wikitext: lm-eval's detokenizer undoes their
# tokenization (" @-@ ", " , ") by default, and leaves other corpora alone.
WIKITEXT_NAME = "wikitext"


@dataclass(frozen=True)
class ScoredWindow:
    """One of lm-eval's rolling windows of one length, as the requests that score it: its
    log-likelihood is the sum of those of the requests `plus`, minus that of request `minus`
    where there is one (the whitespace HFLM moves out of a context, scored alone). `exact`: the
    model sees exactly the tokens lm-eval's loglikelihood_rolling gives it and scores the same
    ones (rolling_windows says what is scored otherwise)."""

    length: int
    plus: tuple[int, ...]
    minus: int | None
    exact: bool


class LmEvalEncoding:
    """Text to tokens as lm-eval's HFLM does it, for one tokenizer and the model's arguments:
    `encode` is its tok_encode (the tokenizer's special tokens, or add_bos_token's choice; none
    for a text that starts with the prefix token's text), `request` what its loglikelihood makes
    of a (context, continuation) request, and `prefix` its prefix_token_id (prefix_token_id, else
    the tokenizer's bos, else its eos)."""

    def __init__(self, tokenizer: Any, add_bos_token: Any = None, prefix_token_id: Any = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("sb_wikitext needs a fast (Rust) Hugging Face tokenizer: it cuts documents at tokens by their offsets")
        if add_bos_token is not None and not isinstance(add_bos_token, bool):
            raise ValueError(f"model argument add_bos_token={add_bos_token!r} must be true or false")
        self.tokenizer = tokenizer
        self.special_tokens = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
        if prefix_token_id is None:
            prefix_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if not isinstance(prefix_token_id, int) or isinstance(prefix_token_id, bool) or prefix_token_id < 0:
            raise ValueError(
                f"prefix token {prefix_token_id!r}: lm-eval conditions a document's first tokens on the tokenizer's bos "
                "or eos token, and this tokenizer has neither; pass prefix_token_id=ID in --model_args"
            )
        self.prefix: int = prefix_token_id
        self.prefix_text = tokenizer.decode(self.prefix)

    def _special_tokens(self, text: str) -> dict[str, bool]:
        return {"add_special_tokens": False} if text.startswith(self.prefix_text) else self.special_tokens

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, verbose=False, **self._special_tokens(text))["input_ids"]

    def tokens_and_cuts(self, text: str) -> tuple[list[int], list[int]]:
        """The document's tokens as `encode` gives them, and token_cuts: where the text splits
        before each (special tokens, such as a BOS, take no characters)."""
        encoding = self.tokenizer(text, verbose=False, return_offsets_mapping=True, return_special_tokens_mask=True,
                                  **self._special_tokens(text))
        offsets, position = [], 0
        for (start, end), special in zip(encoding["offset_mapping"], encoding["special_tokens_mask"]):
            offsets.append((position, position) if special else (start, end))
            position = position if special else end
        return encoding["input_ids"], token_cuts(text, offsets)

    def request(self, context: str, continuation: str) -> tuple[list[int], list[int]] | None:
        """(context tokens, continuation tokens) of a loglikelihood request as HFLM encodes it:
        an empty context is the prefix token (or, when the continuation starts with it, the
        continuation's first token); a context's trailing whitespace moves into the
        continuation. None where HFLM would be left with an empty context or continuation."""
        if not context:
            tokens = self.tokenizer(continuation, verbose=False, add_special_tokens=False)["input_ids"]
            if not tokens:
                return None
            return ([self.prefix], tokens) if tokens[0] != self.prefix else (tokens[:1], tokens[1:])
        stripped = context.rstrip()
        if not stripped:
            return None
        context_tokens = self.encode(stripped)
        return context_tokens, self.encode(context + continuation)[len(context_tokens) :]


def wikitext_dataset(**kwargs: Any) -> dict[str, datasets.Dataset]:
    """The test split of sb_wikitext: one row per document, holding the loglikelihood requests
    that score it in lm-eval's rolling windows of every length in max_seq_lengths (each distinct
    request once) and which of them make up each window (ScoredWindow).

    Rows: page (the document as read: lm-eval counts its words and bytes), text (what is scored:
    page through lm-eval's Wikitext detokenizer where `detokenize`), tokens (the text's token
    count as the model encodes it), lengths, requests ({start, split, end}: the request's context
    is text[start:split], its continuation text[split:end]) and windows (ScoredWindow's fields,
    minus = -1 for none).
    """
    check_metadata(kwargs, SB_WIKITEXT_SETTINGS, "sb_wikitext", ("metric_lengths",))
    declared = kwargs.get("metric_lengths")
    lengths = _lengths(kwargs.get("max_seq_lengths", DEFAULT_MAX_SEQ_LENGTHS), declared)
    if kwargs.get("max_length") is not None:
        max_length = positive_int(kwargs["max_length"], "model argument max_length")
        if max(lengths) > max_length:
            raise ValueError(
                f"metadata max_seq_lengths={lengths} goes beyond the model's max_length={max_length}: lm-eval would "
                f"cut the longer windows; pass max_length={max(lengths)} (or more) in --model_args"
            )
    source = kwargs.get("corpus", WIKITEXT)
    detokenize = _detokenize_setting(kwargs.get("detokenize"), source)
    pages = _read_pages(source)
    encoding = LmEvalEncoding(load_tokenizer(tokenizer_name(kwargs)), kwargs.get("add_bos_token"), kwargs.get("prefix_token_id"))
    rows = []
    for page in tqdm(pages, desc="sb_wikitext windows", leave=False):
        text = wikitext_detokenizer({"page": page}) if detokenize else page
        tokens, requests, windows = rolling_windows(text, encoding, lengths)
        rows.append({
            "page": page,
            "text": text,
            "tokens": tokens,
            "lengths": lengths,
            "requests": [{"start": start, "split": split, "end": end} for start, split, end in requests],
            "windows": [asdict(window) | {"plus": list(window.plus), "minus": -1 if window.minus is None else window.minus}
                        for window in windows],
        })
    approximate = sum(not w["exact"] for row in rows for w in row["windows"])
    logger.info("sb_wikitext: %d documents of %s, %d requests; %d of %d windows not exactly lm-eval's", len(rows), source,
                sum(len(row["requests"]) for row in rows), approximate, sum(len(row["windows"]) for row in rows))
    return {"test": datasets.Dataset.from_list(rows)}


def rolling_windows(text: str, encoding: LmEvalEncoding, lengths: Sequence[int]) -> tuple[int, list[tuple[int, int, int]], list[ScoredWindow]]:
    """lm-eval's rolling windows of `text` at each length (lm_eval.utils.get_rolling_token_windows
    and make_disjoint_window over the tokens HFLM encodes: the first window predicts its tokens
    after the prefix token, each later one after one token, the last after as many tokens as fit)
    as loglikelihood requests whose texts HFLM re-encodes to those very tokens.

    Returns the text's token count, the requests as character offsets (start, split, end), each
    distinct one once, and the windows. A window's request is the texts of its context and its
    targets (the first window's context is empty: HFLM puts its prefix token there). Where HFLM
    would encode those otherwise:
    - a context ending in whitespace, which HFLM moves into the continuation, is scored as HFLM
      sends it minus that whitespace scored alone: the model sees the window's very tokens, and
      the difference is the window's log-likelihood (exact);
    - else, when HFLM keeps the context's tokens, the request is scored as it is: the same text
      after the same context, its continuation tokenized otherwise (a tokenizer can split a
      whitespace run at the end of a text differently from the same run inside it; approximate);
    - else (a context of whitespace alone, which HFLM cannot send) the targets' text is scored
      after the prefix token alone (approximate).
    Either way every character of the text is scored once per length, and no request makes the
    model see or score more than the length's tokens: where a text re-encodes to more tokens
    (a boundary inside a character, whose bytes are tokens of their own, moves the character into
    the next window), its first characters are scored by a request of their own. An empty text
    has no windows.
    """
    if not text:
        return 0, [], []
    ids, cut = encoding.tokens_and_cuts(text)
    requests: dict[tuple[int, int, int], int] = {}

    def index(chars: tuple[int, int, int]) -> int:
        return requests.setdefault(chars, len(requests))

    @functools.cache  # a document shorter than several lengths is one same request at each
    def encoded_at(start: int, split: int, end: int) -> tuple[list[int], list[int]] | None:
        """HFLM's encoding of the request text[start:split], text[split:end] (characters)."""
        return encoding.request(text[start:split], text[split:end])

    def fits(encoded: tuple[list[int], list[int]] | None, length: int) -> bool:
        """HFLM's model input (context + continuation less its last token) within the length."""
        return encoded is not None and len(encoded[0]) + len(encoded[1]) - 1 <= length

    def alone(split: int, end: int, length: int) -> tuple[int, ...]:
        """Requests scoring text[split:end] after the prefix token, as few as fit the length."""
        head = split
        while head < end - 1 and not fits(encoded_at(head, head, end), length):
            head += 1
        return tuple(index((first, first, last)) for first, last in ((split, head), (head, end)) if first < last)

    windows = []
    for length in lengths:
        # positions rather than tokens, so that each window says where in the text it lies; -1 is the prefix token
        for context, targets in map(make_disjoint_window, get_rolling_token_windows(list(range(len(ids))), -1, length, 1)):
            start, split, end = context[0], targets[0], targets[-1] + 1
            if start < 0:
                exact = encoded_at(cut[split], cut[split], cut[end]) == ([encoding.prefix], ids[split:end])
                windows.append(ScoredWindow(length, alone(cut[split], cut[end], length), None, exact))
                continue
            whole = (cut[start], cut[split], cut[end])
            encoded = encoded_at(cut[start], cut[split], cut[end])
            if encoded == (ids[start:split], ids[split:end]):
                windows.append(ScoredWindow(length, (index(whole),), None, True))
            elif (whitespace := _whitespace_request(text, ids, cut, encoding, encoded, (start, split, end))) is not None:
                windows.append(ScoredWindow(length, (index(whole),), index(whitespace), True))
            elif fits(encoded, length) and encoded[0] == ids[start:split]:
                windows.append(ScoredWindow(length, (index(whole),), None, False))  # its context, its text tokenized otherwise
            else:
                windows.append(ScoredWindow(length, alone(cut[split], cut[end], length), None, False))
    return len(ids), list(requests), windows


def _whitespace_request(text: str, ids: list[int], cut: list[int], encoding: LmEvalEncoding,
                        encoded: tuple[list[int], list[int]] | None, window: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """A window (tokens start..split its context, split..end its targets) whose context ends in
    whitespace, which HFLM moved into the continuation when it encoded the window's request as
    `encoded`: the request that scores that whitespace alone after the rest of the context, when
    both encode to the window's tokens (the model then sees exactly lm-eval's window, and the
    difference of the two is its log-likelihood); else None."""
    start, split, end = window
    context = text[cut[start] : cut[split]]
    stripped = context.rstrip()
    if encoded is None or stripped == context:
        return None
    kept = start + len(encoded[0])
    if not start < kept < split or encoded != (ids[start:kept], ids[kept:end]):
        return None
    if encoding.request(stripped, context[len(stripped) :]) != (ids[start:kept], ids[kept:split]):
        return None
    return cut[start], cut[start] + len(stripped), cut[split]


class RollingWindowsTask(ConfigurableTask):
    """sb_wikitext: a sample is a document, scored by the loglikelihood requests its row lists
    (wikitext_dataset), so that one run scores every length and --limit counts documents."""

    def __init__(self, config: dict | None = None, **kwargs: Any) -> None:
        # lm-eval hands a task class its whole YAML, `class` key included, which TaskConfig refuses
        super().__init__(config={key: value for key, value in (config or {}).items() if key != "class"}, **kwargs)

    def construct_requests(self, doc: dict, ctx: str, **kwargs: Any) -> list[Instance]:
        kwargs.pop("apply_chat_template", None)
        kwargs.pop("chat_template", None)
        text = doc["text"]
        return [
            Instance(request_type="loglikelihood", doc=doc, arguments=(text[r["start"] : r["split"]], text[r["split"] : r["end"]]), idx=index, **kwargs)
            for index, r in enumerate(doc["requests"])
        ]


def wikitext_results(doc: dict, results: list[tuple[float, bool]]) -> dict[str, Any]:
    """Per length L: lm-eval's Wikitext metrics of the document's log-likelihood at L (its
    process_results: words and bytes of the page as read) as word_perplexity_L, byte_perplexity_L
    and bits_per_byte_L; windows_L and approximate_windows_L (windows scored, and those not
    exactly lm-eval's); documents_longer_L (1 when the document has more than L tokens) and
    tokens_in_longer_L (its tokens, counted when it is longer than L, over its tokens). And
    longest_document: its token count."""
    loglikelihoods = {length: 0.0 for length in doc["lengths"]}
    windows = {length: [0, 0] for length in doc["lengths"]}
    for window in doc["windows"]:
        length = window["length"]
        loglikelihoods[length] += sum(results[plus][0] for plus in window["plus"])
        loglikelihoods[length] -= results[window["minus"]][0] if window["minus"] >= 0 else 0.0
        windows[length][0] += 1
        windows[length][1] += not window["exact"]
    tokens = doc["tokens"]
    metrics: dict[str, Any] = {"longest_document": tokens}
    for length in doc["lengths"]:
        for name, value in wikitext_process_results(doc, [loglikelihoods[length]]).items():
            metrics[f"{name}_{length}"] = value
        metrics[f"windows_{length}"], metrics[f"approximate_windows_{length}"] = windows[length]
        metrics[f"documents_longer_{length}"] = int(tokens > length)
        metrics[f"tokens_in_longer_{length}"] = (tokens if tokens > length else 0, tokens)
    return metrics


def total(items: Sequence[float]) -> float:
    """Aggregation: the sum."""
    return sum(items)


def largest(items: Sequence[float]) -> float:
    """Aggregation: the largest."""
    return max(items)


def share(items: Sequence[tuple[float, float]]) -> float:
    """Aggregation of (part, whole) pairs: the sum of the parts over the sum of the wholes (0 for
    no whole)."""
    whole = sum(b for _, b in items)
    return sum(a for a, _ in items) / whole if whole else 0.0


def _detokenize_setting(value: Any, source: str) -> bool:
    if value is None:
        return source.startswith(HF_PREFIX) and WIKITEXT_NAME in source.split(":")[1].lower()
    if not isinstance(value, bool):
        raise ValueError(f"metadata detokenize={value!r} must be true (lm-eval's Wikitext detokenizer) or false")
    return value


def _read_pages(source: str) -> list[str]:
    try:
        return documents(source)
    except (DocumentSourceError, MissingCorpusError) as error:
        raise DocumentSourceError(
            f"sb_wikitext could not read its documents: {error}\nWikitext comes through `datasets`, "
            "from its cache or the network. Offline, measure perplexity of the fetched corpus instead: "
            f"{fetch_command(LONG_DOCUMENTS)}, then --metadata '{{\"corpus\": \"{LONG_DOCUMENTS}\"}}' "
            "(or --tasks sb_ppl)"
        ) from error


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
                "the length's metrics (those named _L) to metric_list"
            )
    return sorted(set(lengths))
