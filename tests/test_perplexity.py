"""sb_ppl (long-document windows, re-encoded exactly as lm-eval scores them) and sb_wikitext
(lm-eval's Wikitext scoring on documents from `datasets`), on local stand-in documents."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import lm_eval
import pytest
import torch
import yaml
from lm_eval.tasks import TaskManager
from test_ruler_helpers import merging_bpe_tokenizer, standin_sentences
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from sb_eval.data.documents import DocumentSourceError
from sb_eval.model.configuration import tiny_config
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.ruler.corpora import MissingCorpusError
from sb_eval.tasks import perplexity
from sb_eval.tokenization import END_OF_TEXT, byte_level_tokenizer

TASKS_DIR = Path(perplexity.__file__).parent
SMALL = dict(max_seq_lengths=[128, 256, 512], target_tokens=32, windows_per_document=3, max_context=512)


class _FunctionsAsText(yaml.SafeLoader):
    """Reads task YAMLs without importing the functions they name."""


_FunctionsAsText.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def standin_documents() -> list[str]:
    """Three long documents (paragraphs of random sentences with accents, dashes, curly quotes and
    digits), one of dense two-byte characters, and one too short for any window."""
    rng = random.Random(4)
    sentences = standin_sentences(600, seed=4)
    extras = ["Ünïcödé — “quoted” …", "3.14159 and 2,718", "naïve café", "\t(tabbed)", "  double  spaces "]

    def document(count: int) -> str:
        paragraphs = [" ".join(rng.sample(sentences, 6) + [rng.choice(extras)]) for _ in range(count)]
        return "\n\n".join(paragraphs) + "\n"

    return [document(12), document(20), document(30), "é" * 700 + "ü" * 700, "Too short to hold a window."]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path / "data"))
    path = tmp_path / "documents.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in standin_documents()))
    return str(path)


def bpe_with_bos() -> PreTrainedTokenizerFast:
    """The test BPE, adding <|endoftext|> before every text as a BOS token."""
    backend = Tokenizer.from_str(merging_bpe_tokenizer().backend_tokenizer.to_str())
    bos = backend.token_to_id(END_OF_TEXT)
    backend.post_processor = processors.TemplateProcessing(single=f"{END_OF_TEXT} $A", special_tokens=[(END_OF_TEXT, bos)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, model_max_length=1 << 20)


TOKENIZERS = {"bytes": byte_level_tokenizer, "bpe": merging_bpe_tokenizer, "bpe_with_bos": bpe_with_bos}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """sb_hf over a tiny random checkpoint per tokenizer, as lm-eval builds it."""
    from sb_eval.harness.stick_breaking_lm import StickBreakingLM

    built = {}
    for name, make_tokenizer in TOKENIZERS.items():
        tokenizer = make_tokenizer()
        config = tiny_config(vocab_size=len(tokenizer), n_layer=1, n_embd=32, n_head=2, n_inner=64,
                             bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.eos_token_id)
        folder = write_random_checkpoint(tmp_path_factory.mktemp(name) / "checkpoint", config, seed=1)
        tokenizer.save_pretrained(folder)
        built[name] = StickBreakingLM(pretrained=str(folder), attention_backend="torch", device="cpu", batch_size=4)
    return built


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_windows_reencode_to_exact_lengths_and_identical_targets(name, models, corpus):
    model = models[name]
    docs = perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=model.tokenizer.name_or_path, **SMALL)["test"]
    texts = standin_documents()
    prefix = model.tokenizer("")["input_ids"]
    assert len(prefix) == (1 if name == "bpe_with_bos" else 0)
    windows: dict[int, dict[int, tuple[list[int], list[int]]]] = {}
    for doc in docs:
        context, continuation = model._encode_pair(doc["context"], doc["continuation"])
        assert len(context) == doc["max_length"] - 32 and len(continuation) == 32
        assert context[: len(prefix)] == prefix and not doc["context"][-1:].isspace()
        assert doc["context"] + doc["continuation"] in texts[doc["document"]]
        assert doc["target_bytes"] == len(doc["continuation"].encode("utf-8"))
        windows.setdefault(doc["window"], {})[doc["max_length"]] = (context[len(prefix) :], continuation)
    for by_length in windows.values():
        assert sorted(by_length) == [128, 256, 512]
        (target,) = {tuple(continuation) for _, continuation in by_length.values()}
        # a shorter window is the end of a longer one: only the context grows
        assert by_length[256][0][-(128 - 32 - len(prefix)) :] == by_length[128][0]
        assert by_length[512][0][-(256 - 32 - len(prefix)) :] == by_length[256][0]
    used = {doc["document"] for doc in docs}
    assert 4 not in used and {0, 1, 2} <= used  # the short document holds no window
    per_document = [sum(1 for w in windows if docs[3 * w]["document"] == d) for d in sorted(used)]
    assert all(1 <= count <= 3 for count in per_document) and per_document[2] == 3


def test_add_bos_token_from_the_model_args_decides_the_special_tokens(models, corpus):
    tokenizer = models["bpe_with_bos"].tokenizer
    docs = perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer.name_or_path, add_bos_token=False, **SMALL)["test"]
    for doc in docs:
        assert len(tokenizer(doc["context"], add_special_tokens=False)["input_ids"]) == doc["max_length"] - 32


def test_sweep_runs_of_one_length_score_the_same_windows(models, corpus):
    tokenizer = models["bpe"].tokenizer.name_or_path
    declared = dict(SMALL, metric_lengths=[64, 128, 256, 512, 1024])
    every = perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer, **declared)["test"]
    alone = perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer, **dict(declared, max_seq_lengths=[256]))["test"]
    assert [(d["context"], d["continuation"]) for d in alone] == [(d["context"], d["continuation"]) for d in every if d["max_length"] == 256]


def test_windows_are_cached_by_what_makes_them(models, corpus, tmp_path, monkeypatch):
    tokenizer = models["bytes"].tokenizer.name_or_path
    first = perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer, **SMALL)["test"]
    assert len(list((tmp_path / "data" / "perplexity-cache").glob("*.json"))) == 1

    def no_search(*args, **kwargs):
        raise AssertionError("the windows were searched again")

    monkeypatch.setattr(perplexity, "_WindowFinder", no_search)
    assert perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer, **SMALL)["test"]["context"] == first["context"]
    with pytest.raises(AssertionError, match="searched again"):
        perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=tokenizer, **dict(SMALL, target_tokens=16))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(target_tokens=128), "target_tokens=128 must be below the smallest of max_seq_lengths"),
        (dict(max_seq_lengths=[100], metric_lengths=[128, 256]), "declares metrics for the lengths \\[128, 256\\], not 100"),
        (dict(max_seq_lengths=[1024]), "exceeds max_context=512"),
        (dict(max_seq_lengths="512"), "max_seq_lengths='512' must be a list"),
        (dict(max_context=65536, max_seq_lengths=[512]), "no document of corpus .* holds a window of max_context=65536"),
        (dict(windows_per_document=0), "windows_per_document=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_named(settings, message, models, corpus):
    with pytest.raises(ValueError, match=message):
        perplexity.sb_ppl_dataset(corpus=corpus, tokenizer=models["bytes"].tokenizer.name_or_path, **dict(SMALL, **settings))


def test_the_default_corpus_is_asked_for(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path))
    with pytest.raises(MissingCorpusError, match="sb-eval data fetch aa-lcr"):
        perplexity.sb_ppl_dataset(tokenizer=models["bytes"].tokenizer.name_or_path)


def test_the_yaml_declares_every_metric_of_its_lengths():
    config = yaml.load((TASKS_DIR / "sb_ppl.yaml").read_text(), Loader=_FunctionsAsText)  # noqa: S506 (a SafeLoader)
    lengths = config["dataset_kwargs"]["metric_lengths"]
    expected = [name for length in lengths for name in (f"nll_{length}", f"bits_per_byte_{length}", f"windows_{length}")]
    assert [m["metric"] for m in config["metric_list"]] == expected
    assert set(perplexity.DEFAULT_MAX_SEQ_LENGTHS) <= set(lengths) and perplexity.DEFAULT_MAX_CONTEXT in lengths


def _nll_of_targets(model, context: str, continuation: str) -> tuple[float, int]:
    """Summed negative log-likelihood of the continuation's tokens, from one forward pass."""
    context_ids, target_ids = model._encode_pair(context, continuation)
    tokens = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logits = model.model(tokens[:, :-1]).logits[0, -len(target_ids) :]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return -float(logprobs.gather(1, torch.tensor(target_ids)[:, None]).sum()), len(target_ids)


def test_lm_eval_runs_sb_ppl_with_sb_hf(models, corpus):
    model = models["bytes"]
    metadata = dict(corpus=corpus, tokenizer=model.tokenizer.name_or_path, max_seq_lengths=[1024, 2048],
                    target_tokens=64, windows_per_document=1, max_context=2048)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    output = lm_eval.simple_evaluate(model=model, tasks=["sb_ppl"], task_manager=manager, log_samples=True)
    results = output["results"]["sb_ppl"]
    samples = output["samples"]["sb_ppl"]
    count = len(samples) // 2
    assert count >= 3 and results["windows_1024,none"] == results["windows_2048,none"] == count
    assert "nll_4096,none" not in results
    for length in (1024, 2048):
        ours = [s for s in samples if s["doc"]["max_length"] == length]
        sums = [_nll_of_targets(model, s["doc"]["context"], s["doc"]["continuation"]) for s in ours]
        for sample, (nll, tokens) in zip(ours, sums):
            assert sample[f"nll_{length}"] == pytest.approx(nll / tokens, rel=1e-4)
        assert results[f"nll_{length},none"] == pytest.approx(sum(n for n, _ in sums) / (count * 64), rel=1e-4)
        total_bytes = sum(s["doc"]["target_bytes"] for s in ours)
        assert results[f"bits_per_byte_{length},none"] == pytest.approx(sum(n for n, _ in sums) / total_bytes / math.log(2), rel=1e-4)


def test_sb_wikitext_without_wikitext_names_the_offline_alternative(offline_datasets):
    with pytest.raises(DocumentSourceError) as raised:
        perplexity.wikitext_dataset()
    message = str(raised.value)
    assert "could not load document source 'hf:EleutherAI/wikitext_document_level:wikitext-2-raw-v1:test'" in message
    assert "sb-eval data fetch aa-lcr, then --tasks sb_ppl" in message


def test_sb_wikitext_needs_the_models_max_length_for_a_length():
    with pytest.raises(ValueError, match="pass --model_args max_length=L with max_seq_lengths=\\[L\\]"):
        perplexity.wikitext_dataset(max_seq_lengths=[4096])
    with pytest.raises(ValueError, match="here 2048"):
        perplexity.wikitext_dataset(max_seq_lengths=[4096], max_length=2048)


def test_sb_wikitext_scores_as_lm_evals_wikitext(offline_datasets, models, tmp_path):
    from lm_eval.tasks.wikitext import preprocess_wikitext

    folder = tmp_path / "wiki"
    folder.mkdir()
    pages = [" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . \n",
             " = Du Fu = \n Du Fu ( 712 @-@ 770 ) was a prominent Chinese poet of the Tang dynasty . \n" * 3]
    (folder / "test.jsonl").write_text("".join(json.dumps({"page": page, "title": "t"}) + "\n" for page in pages))
    model = models["bytes"]
    metadata = dict(corpus=f"hf:{folder}", max_seq_lengths=[256], max_length=256)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata=metadata)
    task = manager.load(["sb_wikitext"])["tasks"]["sb_wikitext"]
    assert task.config.process_results is preprocess_wikitext.process_results
    assert task.config.doc_to_target is preprocess_wikitext.wikitext_detokenizer
    model._max_length = 256
    output = lm_eval.simple_evaluate(model=model, tasks=["sb_wikitext"], task_manager=manager)
    results = output["results"]["sb_wikitext"]
    assert results["byte_perplexity,none"] == pytest.approx(2 ** results["bits_per_byte,none"])
    assert results["word_perplexity,none"] > results["byte_perplexity,none"] > 1
