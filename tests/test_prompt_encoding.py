"""sb_hf tokenizes each generation prompt once per generate_until call, and pads its batches from
that encoding exactly as lm-eval's HFLM.tok_batch_encode pads them, on the byte-level tokenizer and
the default checkpoint's BPE one."""

from collections import Counter
from contextlib import nullcontext

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from sb_eval.data import DEFAULT_CHECKPOINT
from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.saving import write_random_checkpoint

PROMPTS = [
    "Short",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n    indented\u00a0nbsp",
    "Unicode: héllo wörld — ünïcödé 漢字 🙂 zero\u200bwidth",
    "text with <|endoftext|> inside it, not at its start " * 3,
    "The quick brown fox jumps over the lazy dog. " * 8,
    "",
]


@pytest.fixture(scope="module", params=["byte-level", "default"])
def lm(request, tmp_path_factory):
    if request.param == "default":
        folder = DEFAULT_CHECKPOINT
    else:
        folder = write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", seed=7)
    return StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=2, truncate_long_prompts=True)


@pytest.fixture
def tokenized(lm, monkeypatch) -> list[str]:
    """The texts lm's tokenizer encodes from now on, one entry per text each time (through encode,
    which tok_encode calls, or __call__, which HFLM's tok_batch_encode calls; neither calls the other)."""
    texts = []
    tokenizer_class = type(lm.tokenizer)
    encode, call = tokenizer_class.encode, tokenizer_class.__call__

    def recording_encode(self, text, *args, **kwargs):
        texts.append(text)
        return encode(self, text, *args, **kwargs)

    def recording_call(self, text, *args, **kwargs):
        texts.extend([text] if isinstance(text, str) else text)
        return call(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "encode", recording_encode)
    monkeypatch.setattr(tokenizer_class, "__call__", recording_call)
    return texts


def instances(arguments):
    return [
        Instance(request_type="generate_until", doc={}, arguments=args, idx=i, metadata=("task", i, 1))
        for i, args in enumerate(arguments)
    ]


def encoded_as_in_generate_until(lm, prompts, padding_side="left", left_truncate_len=None):
    """lm.tok_batch_encode(prompts, ...) within generate_until's encoding scope, after each prompt
    went through tok_encode as HFLM's sort key and batch_size=auto's probe send it (which gives
    what HFLM's tok_encode gives, the second time too)."""
    expected = [HFLM.tok_encode(lm, prompt) for prompt in prompts]
    with lm._each_prompt_encoded_once(instances([(prompt, {}) for prompt in prompts])):
        for _ in ("sort key", "probe"):
            assert [lm.tok_encode(prompt) for prompt in prompts] == expected
        return lm.tok_batch_encode(prompts, padding_side, left_truncate_len)


def assert_same_batch(ours, theirs):
    for our_tensor, their_tensor in zip(ours, theirs, strict=True):
        assert our_tensor.dtype == their_tensor.dtype
        assert torch.equal(our_tensor, their_tensor)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("left_truncate_len", [None, 40])
def test_a_batch_padded_from_the_kept_encodings_is_hflms(lm, tokenized, padding_side, left_truncate_len):
    ours = encoded_as_in_generate_until(lm, PROMPTS, padding_side, left_truncate_len)
    assert Counter(tokenized) == Counter(PROMPTS + PROMPTS)  # the reference's, and tok_encode's once
    theirs = HFLM.tok_batch_encode(lm, PROMPTS, padding_side, left_truncate_len)
    assert_same_batch(ours, theirs)
    assert lm._prompt_encodings is None


def test_a_repeated_prompt_is_kept_until_its_last_batch(lm, tokenized):
    prompt, other = PROMPTS[3], PROMPTS[5]
    requests = [(prompt, {}), (other, {}), (prompt, {})]
    with lm._each_prompt_encoded_once(instances(requests)):
        for text, _ in requests:
            lm.tok_encode(text)
        assert_same_batch(lm.tok_batch_encode([other, prompt]), HFLM.tok_batch_encode(lm, [other, prompt]))
        assert set(lm._prompt_encodings.ids) == {prompt}
        tokenized.clear()
        assert_same_batch(lm.tok_batch_encode([prompt]), HFLM.tok_batch_encode(lm, [prompt]))
        assert lm._prompt_encodings.ids == {}
        assert tokenized == [prompt]  # HFLM's reference only


@pytest.mark.parametrize("bos_first", [True, False])
def test_a_batch_with_a_prompt_starting_with_bos_text_is_encoded_by_hflm(lm, tokenized, bos_first):
    prompts = [lm.tokenizer.bos_token + "starts with BOS text", "an ordinary prompt"]
    prompts = prompts if bos_first else prompts[::-1]
    ours = encoded_as_in_generate_until(lm, prompts)
    assert tokenized == prompts * 3  # the reference's, tok_encode's, and HFLM's tok_batch_encode's
    assert_same_batch(ours, HFLM.tok_batch_encode(lm, prompts))


REQUESTS = [
    ("What is the special magic number? The number is", {"until": ["\n"], "max_gen_toks": 6}),
    ("Short prompt", {"until": ["."], "max_gen_toks": 5}),
    ("What is the special magic number? The number is", {"until": ["\n"], "max_gen_toks": 6}),
    ("tabs\tand  spaces, ünïcödé 🙂", {"until": ["\n"], "max_gen_toks": 6}),
    ("Short prompt", {"until": ["\n"], "max_gen_toks": 4}),  # and in another batch, of other generation arguments
]


@pytest.mark.parametrize("batch_size", [2, "auto"])
def test_generate_until_tokenizes_each_prompt_once(lm, tokenized, monkeypatch, batch_size):
    monkeypatch.setattr(lm, "batch_size_per_gpu", batch_size)
    ours = lm.generate_until(instances(REQUESTS))
    assert lm._prompt_encodings is None
    prompts = {prompt for prompt, _ in REQUESTS}
    assert Counter(text for text in tokenized if text in prompts) == Counter(prompts)
    tokenized.clear()
    monkeypatch.setattr(StickBreakingLM, "_each_prompt_encoded_once", lambda self, requests: nullcontext())
    assert lm.generate_until(instances(REQUESTS)) == ours
    assert sum(text in prompts for text in tokenized) >= 2 * len(REQUESTS)  # HFLM's own: sort key and batch


def test_nothing_is_kept_after_generate_until_raises(lm, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(lm, "_model_generate", failing)
    with pytest.raises(RuntimeError, match="generation failed"):
        lm.generate_until(instances(REQUESTS))
    assert lm._prompt_encodings is None
