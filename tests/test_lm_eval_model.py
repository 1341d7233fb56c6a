"""sb_hf against lm-eval's own HFLM on the same checkpoint, and its own arguments and errors."""

import json
import logging
import re
import shutil

import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from sb_eval.harness.stick_breaking_lm import PromptTooLongError, StickBreakingLM
from sb_eval.model.checks import CheckpointError
from sb_eval.model.saving import write_random_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", seed=7)


@pytest.fixture(scope="module")
def sb_lm(folder):
    return StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=2, logprob_chunk_size=3)


@pytest.fixture(scope="module")
def hf_lm(folder):
    # lm-eval's own model class loads the same folder through AutoModelForCausalLM
    return HFLM(pretrained=str(folder), device="cpu", batch_size=2, max_length=4096)


def instances(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i, metadata=("task", i, 1)) for i, args in enumerate(arguments)]


LOGLIKELIHOOD = [
    ("The quick brown fox", " jumps over the lazy dog"),
    ("A special magic number is", " 1234567"),
    ("x", "y"),
    ("Stick-breaking attention " * 9, "breaks the stick nearest first."),
]


def test_loglikelihood_matches_hflm(sb_lm, hf_lm):
    ours = sb_lm.loglikelihood(instances("loglikelihood", LOGLIKELIHOOD))
    theirs = hf_lm.loglikelihood(instances("loglikelihood", LOGLIKELIHOOD))
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        assert greedy_a == greedy_b


def test_loglikelihood_rolling_matches_hflm(sb_lm, hf_lm):
    texts = [("Long documents are scored in rolling windows. " * 12,), ("short",)]
    ours = sb_lm.loglikelihood_rolling(instances("loglikelihood_rolling", texts))
    theirs = hf_lm.loglikelihood_rolling(instances("loglikelihood_rolling", texts))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_generate_until_matches_hflm(sb_lm, hf_lm):
    requests = [
        ("What is the special magic number? The number is", {"until": ["\n"], "max_gen_toks": 12}),
        ("Short prompt", {"until": ["."], "max_gen_toks": 7}),
    ]
    ours = sb_lm.generate_until(instances("generate_until", requests))
    theirs = hf_lm.generate_until(instances("generate_until", requests))
    assert ours == theirs


def test_a_prompt_longer_than_max_length_is_an_error_naming_the_sample(folder):
    lm = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=1, max_length=32)
    with pytest.raises(PromptTooLongError, match=r"^task, document 1: loglikelihood request of 25[03] tokens, more than the 32 that max_length=32"):
        lm.loglikelihood(instances("loglikelihood", [("short", " end"), ("word " * 50, " end")]))
    with pytest.raises(PromptTooLongError, match=r"^task, document 0: generate_until request of 200 tokens, more than the 28 .*truncate_long_prompts=true"):
        lm.generate_until(instances("generate_until", [("word " * 40, {"until": ["\n"], "max_gen_toks": 4})]))


def test_truncation_when_asked_warns_once_per_kind(folder, caplog):
    lm = StickBreakingLM(pretrained=str(folder), device="cpu", batch_size=1, max_length=32, truncate_long_prompts="yes")
    long_pairs = [("word " * 40, " end"), ("more " * 50, " end")]
    with caplog.at_level(logging.WARNING, logger="sb_eval.harness.stick_breaking_lm"):
        lm.loglikelihood(instances("loglikelihood", long_pairs))
        lm.generate_until(instances("generate_until", [("word " * 40, {"until": ["\n"], "max_gen_toks": 4})] * 2))
    warnings = [r.getMessage() for r in caplog.records if r.name == "sb_eval.harness.stick_breaking_lm"]
    assert len(warnings) == 2
    assert re.match(r"loglikelihood: a request of 25[03] tokens exceeds the 32-token limit", warnings[0])
    assert warnings[1].startswith("generate_until: a request of 200 tokens exceeds the 28-token limit")


def test_own_arguments_are_recorded(sb_lm):
    info = sb_lm.get_model_info()
    assert info["sb_attention_backend"] == "auto"
    assert info["sb_decode_graphs"] is True
    assert info["sb_logprob_chunk_size"] == 3
    assert info["sb_max_length"] == 65536


@pytest.mark.parametrize(
    "arguments,message",
    [
        (dict(attention_backend="flash"), "attention_backend must be one of"),
        (dict(logprob_chunk_size=0), "logprob_chunk_size must be a positive"),
        (dict(pretrained="/nonexistent/folder"), "is not a local folder"),
    ],
)
def test_bad_arguments(folder, arguments, message):
    arguments = {"pretrained": str(folder), "device": "cpu", **arguments}
    with pytest.raises(ValueError, match=message):
        StickBreakingLM(**arguments)


def test_missing_tokenizer_is_refused(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer"):
        StickBreakingLM(pretrained=str(copy), device="cpu")


def test_other_architecture_is_refused(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type is 'gpt2'"):
        StickBreakingLM(pretrained=str(copy), device="cpu")
