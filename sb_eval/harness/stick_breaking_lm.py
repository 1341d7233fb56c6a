"""`sb_hf`: lm-eval's HFLM for stick-breaking checkpoints, made safe for 64K-token requests.

Without `pretrained`, it evaluates the checkpoint that ships in the package
(sb_eval.data.DEFAULT_CHECKPOINT) and says so in the log.

Everything HFLM does (batching, generate_until, loglikelihood_rolling, --model_args, data-parallel
`accelerate launch`) carries over. What changes:
- the checkpoint folder is checked once, before anything is loaded (sb_eval.model.checks),
  safetensors only unless allow_pickle=True;
- log-likelihoods come from the decoder's hidden states, turned into log-probs only at the
  continuation positions and `logprob_chunk_size` positions at a time (a full [T, vocab]
  log-softmax at 64K tokens and a 50K vocabulary is ~13 GB);
- a prompt longer than max_length is an error that names the sample, its length and max_length
  (HFLM silently keeps its last tokens); truncate_long_prompts=true truncates as HFLM does, with
  one warning per request kind;
- every model argument is checked: unknown ones are an error that suggests the nearest, and
  booleans are read strictly (true/false, 1/0, yes/no);
- max_length defaults to 65536: stick-breaking has no position embedding to outgrow;
- generation writes keys and values into a preallocated cache (sb_eval.model.cache), and each
  decode step on a GPU replays a CUDA graph (sb_eval.model.decode_graph) instead of launching
  its kernels one by one (decode_graphs=false launches them);
- each generation prompt is tokenized once per generate_until call, and its batch padded from
  that encoding where that is provably what HFLM pads (HFLM tokenizes it to sort the requests,
  batch_size=auto again to size its probe, and again to pad its batch: at 16K tokens, most of the
  harness's CPU time per prompt);
- batch_size=auto finds the largest batch that fits on the GPU for the requests at hand (their
  longest prompt and generation budget, or their longest scoring window), from max_batch_size
  down on out-of-memory; off the GPU, auto means 1;
- with attention_stats=PATH, every forward pass adds its attention statistics (how far back each
  head looks, sb_eval.analysis.attention_stats) to a JSON file at PATH; `close()` writes it a last time;
- with attribution=PATH, the answers to RULER's generate_until requests are attributed (where
  each head looked when it answered, sb_eval.harness.attributed_answers) into a JSON file at PATH, for
  the first attribution_tokens answer tokens (default 1).

Own model args (popped before HFLM sees them, recorded in the results' model info):
attention_backend (auto | triton | torch | reference), decode_graphs, logprob_chunk_size, allow_pickle,
attention_stats, truncate_long_prompts, attribution, attribution_tokens.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import find_executable_batch_size
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator, has_bos_prefix, normalize_gen_kwargs
from tqdm import tqdm

from sb_eval.analysis.attention_stats import StatisticsRecorder, UnsupportedArchitectureError
from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.kernels.attention import BACKENDS
from sb_eval.model.cache import PreallocatedCache
from sb_eval.model.checks import check_checkpoint_folder, check_tokenizer_folder
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.options import check_known, from_pretrained_argument_names, parse_bool

from .lm_eval_compat import require_supported_lm_eval

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 65536


class PromptTooLongError(ValueError):
    """A request longer than the model's max_length, which would be scored on its last tokens."""


class PromptEncodings:
    """The prompts of one generate_until call, each encoded once: the token ids tok_encode gave,
    kept (int32 [tokens]; as a list of Python ints a 16K-token prompt takes ~0.6 MB) from its first
    encoding until the last batch that pads it."""

    def __init__(self, prompts: Iterable[str]) -> None:
        self.batches_left = Counter(prompts)  # prompt -> batches still to pad it (a prompt may repeat)
        self.ids: dict[str, torch.Tensor] = {}

    def encoded(self, prompt: str, encode: Callable[[str], list[int]]) -> list[int]:
        """encode(prompt), calling it only the first time."""
        ids = self.ids.get(prompt)
        if ids is not None:
            return ids.tolist()
        encoding = encode(prompt)
        self.ids[prompt] = torch.tensor(encoding, dtype=torch.int32)
        return encoding

    def take(self, prompt: str) -> torch.Tensor | None:
        """The prompt's ids ([tokens], or None if not encoded yet) for one batch; forgotten after
        the last batch that pads it."""
        if prompt not in self.batches_left:
            return None
        ids = self.ids.get(prompt)
        self.batches_left[prompt] -= 1
        if not self.batches_left[prompt]:
            del self.batches_left[prompt]
            self.ids.pop(prompt, None)
        return ids


def padded_batch(sequences: list[torch.Tensor], pad_id: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sequences (each [length]) padded to the longest as a tokenizer pads them: input_ids (pad_id
    on padding_side, "left" or "right") and attention_mask (1 on tokens, 0 on padding), both long
    [len(sequences), longest]."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        columns = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, columns] = ids
        attention_mask[row, columns] = 1
    return input_ids, attention_mask


class StickBreakingLM(HFLM):
    def __init__(
        self,
        pretrained: str | StickBreakingForCausalLM | None = None,
        attention_backend: str = "auto",
        decode_graphs: bool = True,
        logprob_chunk_size: int = 2048,
        allow_pickle: bool = False,
        max_length: int | None = None,
        tokenizer=None,
        attention_stats: str | None = None,
        truncate_long_prompts: bool = False,
        attribution: str | None = None,
        attribution_tokens: int = 1,
        **kwargs,
    ) -> None:
        kwargs = checked_model_arguments(kwargs)
        allow_pickle = parse_bool(allow_pickle, "allow_pickle")
        truncate_long_prompts = parse_bool(truncate_long_prompts, "truncate_long_prompts")
        decode_graphs = parse_bool(decode_graphs, "decode_graphs")
        if pretrained is None:
            logger.warning(
                "sb_hf: no pretrained=PATH given; evaluating sb-eval's default checkpoint, a 17M-parameter "
                "stick-breaking model trained at 2K tokens (%s; model card: README.md there)", DEFAULT_CHECKPOINT,
            )
            pretrained = DEFAULT_CHECKPOINT
        require_supported_lm_eval()
        if attention_backend not in BACKENDS:
            raise ValueError(f"attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        if isinstance(attribution_tokens, bool) or not isinstance(attribution_tokens, int) or attribution_tokens < 1:
            raise ValueError(f"attribution_tokens must be a positive number of answer tokens, got {attribution_tokens!r}")
        if int(logprob_chunk_size) < 1:
            raise ValueError(f"logprob_chunk_size must be a positive number of tokens, got {logprob_chunk_size!r}")
        if isinstance(pretrained, (str, Path)):
            folder = Path(pretrained)
            if not folder.is_dir():
                raise ValueError(
                    f"pretrained={pretrained} is not a local folder; sb_hf loads checkpoints from "
                    "disk and downloads nothing"
                )
            check_checkpoint_folder(folder, StickBreakingForCausalLM, allow_pickle=allow_pickle)
            if tokenizer is None:
                check_tokenizer_folder(folder)
            pretrained = str(folder)
        if allow_pickle:
            kwargs["use_safetensors"] = False
        kwargs.setdefault("backend", "causal")
        self.attention_backend = attention_backend
        self.decode_graphs = decode_graphs
        self.logprob_chunk_size = int(logprob_chunk_size)
        self.allow_pickle = allow_pickle
        self.truncate_long_prompts = truncate_long_prompts
        self._warned_truncation: set[str] = set()
        self._request_names: dict = {}  # request arguments -> "task, document N", for errors
        self._prompt_encodings: PromptEncodings | None = None  # only while generate_until runs
        super().__init__(
            pretrained=pretrained,
            tokenizer=tokenizer,
            max_length=int(max_length) if max_length is not None else DEFAULT_MAX_LENGTH,
            **kwargs,
        )
        if not isinstance(self.model, StickBreakingForCausalLM):
            raise UnsupportedArchitectureError(
                f"sb_hf loaded a {type(self.model).__name__}, not a stick-breaking model; use "
                "--model hf for other architectures"
            )
        self.model.set_attention_backend(attention_backend)
        self.model.set_decode_graphs(decode_graphs)
        self.attention_stats = str(attention_stats) if attention_stats else None
        self.attention_recorder = None
        self.attribution = str(attribution) if attribution else None
        self.attribution_tokens = attribution_tokens
        self.attribution_recorder = None
        source = pretrained if isinstance(pretrained, str) else type(pretrained).__name__
        if self.attention_stats:
            self.attention_recorder = StatisticsRecorder(
                self.model, self.attention_stats_path(), {"pretrained": source, **self.get_model_info()}
            )
        if self.attribution:
            from .attributed_answers import AttributionRecorder  # the RULER generators: loaded only when asked for

            self.attribution_recorder = AttributionRecorder(
                self, self.rank_path(self.attribution), {"pretrained": source, **self.get_model_info()}, attribution_tokens
            )

    def _create_model(self, *args, **kwargs) -> None:
        # The folder was checked in __init__, before HFLM read anything from it.
        super()._create_model(*args, check_folder=False, **kwargs)

    def attention_stats_path(self) -> Path:
        """attention_stats, with .rankN before the suffix when several processes evaluate."""
        return self.rank_path(self.attention_stats)

    def rank_path(self, path: str) -> Path:
        """`path`, with .rankN before the suffix when several processes evaluate."""
        path = Path(path)
        return path if self.world_size == 1 else path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")

    def close(self) -> None:
        """Ends attention_stats and attribution recording: writes their files a last time and
        stops collecting. Call it when done with the model; without it the attention_stats file is
        still written when the model is garbage-collected or the interpreter exits (attribution's
        after every generate_until call)."""
        if self.attention_recorder is not None:
            self.attention_recorder.close()
            self.attention_recorder = None
        if self.attribution_recorder is not None:
            self.attribution_recorder.close()
            self.attribution_recorder = None

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info.update(
            sb_attention_backend=self.attention_backend,
            sb_decode_graphs=self.decode_graphs,
            sb_logprob_chunk_size=self.logprob_chunk_size,
            sb_allow_pickle=self.allow_pickle,
            sb_max_length=self.max_length,
            sb_attention_stats=self.attention_stats,
            sb_truncate_long_prompts=self.truncate_long_prompts,
            sb_attribution=self.attribution,
            sb_attribution_tokens=self.attribution_tokens,
        )
        return info

    # With attention_stats, the file is rewritten as each kind of request finishes (and, between,
    # at most every StatisticsRecorder.flush_seconds and at exit).
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._name_requests(requests)
        return self._written_after(super().loglikelihood(requests, disable_tqdm=disable_tqdm))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._written_after(super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm))

    def generate_until(self, requests, disable_tqdm: bool = False):
        self._name_requests(requests)
        if self.attribution_recorder is not None:
            self.attribution_recorder.expect(requests)
        with self._each_prompt_encoded_once(requests), self._batch_size_for(lambda: self._generation_probe(requests)):
            results = super().generate_until(requests, disable_tqdm=disable_tqdm)
        if self.attribution_recorder is not None:
            self.attribution_recorder.answered(requests, results)
        return self._written_after(results)

    def _name_requests(self, requests) -> None:
        """Remembers "task, document N" for each request, by its context (generation) or its
        (context, continuation) texts (log-likelihoods), as they reach the methods below."""
        self._request_names = {
            request.args[0] if request.request_type == "generate_until" else request.args: f"{request.task_name}, document {request.doc_id}"
            for request in requests
        }

    @contextmanager
    def _each_prompt_encoded_once(self, requests) -> Iterator[None]:
        """While the block runs, tok_encode keeps the requests' prompt encodings and
        tok_batch_encode pads batches from them, letting each go after its last batch."""
        self._prompt_encodings = PromptEncodings(request.args[0] for request in requests)
        try:
            yield
        finally:
            self._prompt_encodings = None

    def _written_after(self, results):
        if self.attention_recorder is not None:
            self.attention_recorder.write()
        return results

    @contextmanager
    def _batch_size_for(self, make_probe: Callable[[], Callable[[int], None]]) -> Iterator[None]:
        """With batch_size=auto, HFLM's batch size is, while the block runs, the largest that
        make_probe()'s probe (a forward pass as large as the block's biggest batch) runs with."""
        if self.batch_size_per_gpu != "auto":
            yield
            return
        self.batch_size_per_gpu = self._largest_batch(make_probe())
        try:
            yield
        finally:
            self.batch_size_per_gpu = "auto"

    def _largest_batch(self, probe: Callable[[int], None]) -> int:
        """The largest batch size for which probe(batch_size) runs, trying max_batch_size first and
        smaller ones after each CUDA out-of-memory (accelerate's find_executable_batch_size); the
        smallest over processes; 1 off the GPU, where running out of memory ends the process
        rather than raising."""
        if self.device.type != "cuda":
            return 1

        @find_executable_batch_size(starting_batch_size=self.max_batch_size)
        def fitting(batch_size: int) -> int:
            probe(batch_size)
            return batch_size

        batch_size = fitting()
        torch.cuda.empty_cache()
        if self.world_size > 1:
            batch_size = min(self.all_gather(torch.tensor([batch_size], device=self.device)).tolist())
        logger.info("sb_hf: batch_size=auto chose %d", batch_size)
        return batch_size

    def _detect_batch_size(self, requests=None, pos: int = 0) -> int:
        """HFLM's batch_size=auto detection (loglikelihood_rolling calls it), with the scoring
        probe: HFLM's would take full [batch, max_length, vocab] log-softmaxes."""
        if requests:
            request, context, continuation = requests[pos]
            width = len(self.scoring_window(context, continuation, request)[0])
        else:
            width = self.max_length
        return self._largest_batch(self._scoring_probe(width))

    def _generation_probe(self, requests) -> Callable[[int], None]:
        """A prefill of the longest prompt (as HFLM truncates it) into a cache with room for the
        largest generation budget, and one decoding step, launched rather than captured as a
        CUDA graph: an out-of-memory inside a capture would not reach the batch search as one."""
        budget = max(normalize_gen_kwargs(request.args[1], self.max_gen_toks)["max_gen_toks"] for request in requests)
        prompt = min(max(len(self.tok_encode(request.args[0])) for request in requests), self.max_length - budget)

        def probe(batch_size: int) -> None:
            ids = torch.ones(batch_size, prompt, dtype=torch.long, device=self.device)
            cache = PreallocatedCache(prompt + budget)
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=True, cache=cache, logits_to_keep=1)
                hidden = self.model.transformer(input_ids=ids[:, :1], use_cache=True, cache=cache).last_hidden_state
                self.model.logits_from_hidden(hidden)

        return probe

    def _scoring_probe(self, width: int) -> Callable[[int], None]:
        """A forward pass over windows of `width` tokens and one chunk of log-probabilities per
        window, as _loglikelihood_tokens runs them."""

        def probe(batch_size: int) -> None:
            ids = torch.ones(batch_size, width, dtype=torch.long, device=self.device)
            with torch.no_grad():
                hidden = self.model.transformer(input_ids=ids, use_cache=False).last_hidden_state
                F.log_softmax(self.model.logits_from_hidden(hidden[:, -self.logprob_chunk_size :]).float(), dim=-1)

        return probe

    def too_long(self, kind: str, request, length: int, limit: int) -> None:
        """A request (its context, or (context, continuation)) of `length` tokens where `limit`
        fit: an error naming it, or with truncate_long_prompts, a warning the first time a request
        of `kind` is cut."""
        if not self.truncate_long_prompts:
            name = self._request_names.get(request, "a request")
            raise PromptTooLongError(
                f"{name}: {kind} request of {length} tokens, more than the {limit} that max_length={self.max_length} "
                "allows; pass a larger max_length in --model_args (sb_hf has no position embedding to outgrow), "
                "or truncate_long_prompts=true to keep the last tokens as lm-eval does"
            )
        self.warn_truncation(kind, length, limit)

    def warn_truncation(self, kind: str, length: int, limit: int) -> None:
        """Warns the first time a request of `kind` is cut to its last `limit` tokens."""
        if kind in self._warned_truncation:
            return
        self._warned_truncation.add(kind)
        logger.warning(
            "%s: a request of %d tokens exceeds the %d-token limit (max_length=%d) and keeps only "
            "its last %d tokens; pass a larger max_length in --model_args. (Warned once per kind.)",
            kind, length, limit, self.max_length, limit,
        )

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        # Within generate_until, a prompt in the form HFLM sorts requests by is encoded once.
        memo = self._prompt_encodings
        if memo is None or add_special_tokens is not None or left_truncate_len or string not in memo.batches_left:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        return memo.encoded(string, super().tok_encode)

    def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
        batch = self._batch_from_prompt_encodings(strings, padding_side, truncation)
        if batch is None:
            batch = super().tok_batch_encode(strings, padding_side, None, truncation)
        input_ids, attention_mask = batch
        if left_truncate_len and input_ids.shape[1] > left_truncate_len:
            lengths = attention_mask.sum(1).tolist()
            longest = max(range(len(strings)), key=lengths.__getitem__)
            self.too_long("generate_until", strings[longest], int(lengths[longest]), left_truncate_len)
            input_ids = input_ids[:, -left_truncate_len:]
            attention_mask = attention_mask[:, -left_truncate_len:]
        if self.attribution_recorder is not None:
            self.attribution_recorder.arm(strings, input_ids, attention_mask)
        return input_ids, attention_mask

    def _batch_from_prompt_encodings(
        self, strings, padding_side: str, truncation: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """HFLM's tok_batch_encode(strings, padding_side, truncation=truncation), input_ids and
        attention_mask (long [len(strings), longest]), padded from the encodings tok_encode kept;
        None where it could differ: a string not kept, truncation, a model that is not causal, no
        pad token or an unknown padding side (HFLM's tokenizer would refuse them), or a string that
        starts with BOS text, on which HFLM's tok_encode (the prefix token's text, each string) and
        tok_batch_encode (bos_token, the first string only) may add different special tokens."""
        if self._prompt_encodings is None:
            return None
        # taken even when unused, so that only the prompts of batches still to come stay kept
        encodings = [self._prompt_encodings.take(string) for string in strings]
        bos_texts = [
            text for text in (self.tokenizer.decode(self.prefix_token_id), self.tokenizer.bos_token) if text is not None
        ]
        if (
            truncation
            or self.backend != "causal"
            or self.tokenizer.pad_token_id is None
            or padding_side not in ("left", "right")
            or any(ids is None for ids in encodings)
            or any(has_bos_prefix(string, bos_texts) for string in strings)
        ):
            return None
        return padded_batch(encodings, self.tokenizer.pad_token_id, padding_side)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """HFLM's contract: requests are ((context, continuation) or None, context tokens,
        continuation tokens); returns (sum of continuation log-probs, whether greedy decoding
        reproduces the continuation) per request, in the original order."""
        collator = Collator(requests, sort_fn=lambda req: (-len(req[1]) - len(req[2]), tuple(req[1] + req[2])))
        if override_bs:
            batch_size = override_bs
        elif self.batch_size_per_gpu == "auto":
            width = max(len(self.scoring_window(context, continuation, request)[0]) for request, context, continuation in requests)
            batch_size = self._largest_batch(self._scoring_probe(width))
        else:
            batch_size = self.batch_size
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0,
            desc="Running loglikelihood requests",
        )
        results = []
        for batch in collator.get_batched(n=batch_size):
            windows = [self.scoring_window(context, continuation, request) for request, context, continuation in batch]
            width = max(len(tokens) for tokens, _ in windows)
            inputs = torch.full((len(windows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
            for row, (tokens, _) in enumerate(windows):
                inputs[row, : len(tokens)] = torch.tensor(tokens)  # right padding: never attended
            # Right padding is never attended; the mask only tells the attention statistics which
            # rows are padding, so it is passed only while they are collected.
            padding_mask = None
            if self.attention_recorder is not None:
                lengths = torch.tensor([len(tokens) for tokens, _ in windows])
                padding_mask = (torch.arange(width)[None, :] < lengths[:, None]).long().to(self.device)
            with torch.no_grad():
                hidden = self.model.transformer(
                    input_ids=inputs.to(self.device), attention_mask=padding_mask, use_cache=False
                ).last_hidden_state
            for (request, _, continuation), (tokens, _), row_hidden in zip(batch, windows, hidden):
                n = len(continuation)
                answer = self.score_continuation(row_hidden[len(tokens) - n : len(tokens)], continuation)
                results.append(answer)
                if request is not None:
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def scoring_window(self, context: list[int], continuation: list[int], request=None) -> tuple[list[int], int]:
        """The model input for one request (its (context, continuation) texts, or None): context +
        continuation without its last token, cut to its last max_length tokens (see too_long);
        and the number of continuation tokens it predicts."""
        total = len(context) + len(continuation)
        if total > self.max_length + 1:
            self.too_long("loglikelihood", request, total - 1, self.max_length)
        tokens = (context + continuation)[-(self.max_length + 1) :][:-1]
        return tokens, len(continuation)

    def score_continuation(self, hidden: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """hidden [n, n_embd]: the states that predict the n continuation tokens."""
        targets = torch.tensor(continuation, device=hidden.device)
        total = 0.0
        greedy = True
        with torch.no_grad():
            for start in range(0, len(continuation), self.logprob_chunk_size):
                stop = start + self.logprob_chunk_size
                log_probs = F.log_softmax(self.model.logits_from_hidden(hidden[start:stop]).float(), dim=-1)
                chunk_targets = targets[start:stop]
                total += log_probs.gather(-1, chunk_targets[:, None]).sum().item()
                greedy = greedy and bool((log_probs.argmax(-1) == chunk_targets).all())
        return total, greedy


def checked_model_arguments(arguments: dict) -> dict:
    """The model arguments sb_hf hands to HFLM, checked: each must be HFLM's or one transformers'
    from_pretrained reads (anything else would become a stray config field), and HFLM's
    booleans are read strictly."""
    parameters = inspect.signature(HFLM.__init__).parameters
    own = [name for name in inspect.signature(StickBreakingLM.__init__).parameters if name not in ("self", "kwargs")]
    hflm = [name for name in parameters if name not in ("self", "kwargs", "pretrained", "max_length", "tokenizer")]
    check_known(arguments, own + hflm, "sb_hf's --model_args", also_accepted=from_pretrained_argument_names())
    return {
        name: parse_bool(value, name) if _is_boolean(parameters.get(name)) and value is not None else value
        for name, value in arguments.items()
    }


def _is_boolean(parameter: inspect.Parameter | None) -> bool:
    """Whether HFLM declares the parameter a boolean only (bool, or bool | None)."""
    if parameter is None:
        return False
    annotation = str(parameter.annotation)
    return "bool" in annotation and not any(other in annotation for other in ("str", "int", "dict"))
