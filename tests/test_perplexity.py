"""sb_ppl (long-document windows, re-encoded exactly as lm-eval scores them) and sb_wikitext
(lm-eval's Wikitext perplexity at several lengths in one run, equal to lm-eval's own `wikitext` at
each), on local stand-in documents."""

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
from tiny_models import write_tiny_llama
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
    assert "sb-eval data fetch aa-lcr, then --metadata '{\"corpus\": \"aa-lcr\"}'" in message


# Wikitext's document-level schema: a page per row; lm-eval's wikitext reads all three splits.
WIKITEXT_SPLITS = ("train", "validation", "test")


def wikitext_folder(folder: Path, pages: list[str]) -> str:
    """A local stand-in for EleutherAI/wikitext_document_level, as an hf: document source."""
    folder.mkdir()
    for split in WIKITEXT_SPLITS:
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"page": page}) + "\n" for page in pages))
    return f"hf:{folder}"


def lm_evals_wikitext(folder: str, tasks_folder: Path) -> TaskManager:
    """lm-eval's own `wikitext` task (its YAML, included as it is) on a local folder."""
    from lm_eval.tasks.wikitext import preprocess_wikitext

    tasks_folder.mkdir()
    own = Path(preprocess_wikitext.__file__).parent / "wikitext.yaml"
    (tasks_folder / "wikitext_local.yaml").write_text(
        f"include: {own}\ntask: wikitext_local\ndataset_path: {folder.removeprefix('hf:')}\ndataset_name: null\n"
    )
    return TaskManager(include_path=str(tasks_folder), include_defaults=False)


def wikitext_pages(count: int, seed: int) -> list[str]:
    """Pages in raw Wikitext's form: a title, sections, paragraphs with its spaced punctuation
    (" , ", " @-@ ", " ( ... ) ") that lm-eval's detokenizer undoes."""
    rng = random.Random(seed)
    sentences = standin_sentences(300, seed=seed)
    pages = []
    for number in range(count):
        lines = [f" = {sentences[number].rstrip('.?!')} = \n", " \n"]
        for paragraph in range(3 + 8 * number):
            if paragraph % 4 == 3:
                lines += [f" = = {rng.choice(sentences).split()[0]} = = \n", " \n"]
            words = " ".join(rng.sample(sentences, 3)).replace(".", " .").replace(",", " ,")
            lines += [f" {words} ( {rng.randint(1000, 2000)} @-@ {rng.randint(2000, 3000)} ) , {rng.choice(sentences)} \n", " \n"]
        pages.append("".join(lines))
    return pages


def _per_document(samples: list[dict], metric: str) -> list[float]:
    """Each document's log-likelihood from lm-eval's logged samples, in document order."""
    return [sample[metric][0] for sample in sorted(samples, key=lambda sample: sample["doc_id"])]


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory) -> str:
    """lm-eval's `hf` model over a tiny random Llama with the test BPE."""
    folder = tmp_path_factory.mktemp("llama") / "checkpoint"
    write_tiny_llama(folder, tokenizer=merging_bpe_tokenizer(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192)
    return str(folder)


@pytest.mark.parametrize("model_name", ["sb_hf", "hf"])
def test_sb_wikitext_equals_lm_evals_wikitext_at_each_length_in_one_run(model_name, offline_datasets, models, bpe_llama, tmp_path):
    if model_name == "sb_hf":
        model = models["bpe"]
    else:
        from lm_eval.models.huggingface import HFLM

        model = HFLM(pretrained=bpe_llama, device="cpu", batch_size=4, max_length=2048)
    pages = wikitext_pages(3, seed=5)
    source = wikitext_folder(tmp_path / "wiki", pages)
    lengths = [1024, 2048]
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata=dict(corpus=source, max_seq_lengths=lengths, tokenizer=model.tokenizer.name_or_path))
    model._max_length = 2048
    ours = lm_eval.simple_evaluate(model=model, tasks=["sb_wikitext"], task_manager=manager, log_samples=True)
    results, samples = ours["results"]["sb_wikitext"], ours["samples"]["sb_wikitext"]
    tokens = [sample["longest_document"] for sample in sorted(samples, key=lambda sample: sample["doc_id"])]
    assert tokens[0] < 1024 < tokens[1] < 2048 < tokens[2]  # short and long documents, several windows each
    assert results["longest_document,none"] == max(tokens)
    reference_manager = lm_evals_wikitext(source, tmp_path / "tasks")
    for length in lengths:
        assert results[f"approximate_windows_{length},none"] == 0
        assert results[f"windows_{length},none"] > len(pages)
        assert results[f"documents_longer_{length},none"] == sum(count > length for count in tokens)
        assert results[f"tokens_in_longer_{length},none"] == pytest.approx(sum(c for c in tokens if c > length) / sum(tokens))
        model._max_length = length
        reference = lm_eval.simple_evaluate(model=model, tasks=["wikitext_local"], task_manager=reference_manager, log_samples=True)
        expected = reference["results"]["wikitext_local"]
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert results[f"{metric}_{length},none"] == pytest.approx(expected[f"{metric},none"], rel=1e-6)
        assert _per_document(samples, f"bits_per_byte_{length}") == pytest.approx(
            _per_document(reference["samples"]["wikitext_local"], "bits_per_byte"), rel=1e-6)
    # a document no longer than a length is scored whole there, and the same at every longer one
    for sample in samples:
        whole = [sample[f"bits_per_byte_{length}"][0] for length in lengths if sample["longest_document"] <= length]
        assert whole == whole[:1] * len(whole)


def test_windows_lm_eval_would_encode_otherwise_are_exact_by_difference_or_counted(offline_datasets, models, tmp_path):
    """With one token per byte, a window's context token can be a space: alone (HFLM cannot send
    a context of whitespace) its window is scored after the prefix token and counted; ending a
    longer context (the last window's), it is scored and its whitespace subtracted, exactly. A
    boundary inside a two-byte character moves it into the next window, whose text then has one
    token too many for a model whose max_length is the length: the character is scored apart."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    model = models["bytes"]
    words = " ".join(standin_sentences(400, seed=6))
    page = list(words[:3372].replace("  ", " x"))
    page[1022:1024] = "a "  # the context token of window 2 at 1024: a space alone
    page[2046:2048] = "bc"  # of window 3: a letter
    page[3070:3072] = "d "  # the last window's context ends in a space
    accented = words[:1023] + "é" + words[1023:2500]  # bytes 1023 and 1024: window 2 starts inside it
    pages = ["".join(page), accented, words[:500].strip()]
    assert [wikitext_detokenizer({"page": text}) for text in pages] == pages
    source = wikitext_folder(tmp_path / "wiki", pages)
    docs = perplexity.wikitext_dataset(corpus=source, max_seq_lengths=[1024], tokenizer=model.tokenizer.name_or_path,
                                       metric_lengths=[1024])["test"]
    windows, requests = docs[0]["windows"], docs[0]["requests"]
    assert [(w["exact"], len(w["plus"]), w["minus"] >= 0) for w in windows] == [
        (True, 1, False), (False, 1, False), (True, 1, False), (True, 1, True)]
    covered = [(requests[w["plus"][0]]["split"], requests[w["plus"][0]]["end"]) for w in windows]
    assert covered == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 3372)]  # every character once
    approximate = requests[windows[1]["plus"][0]]
    assert approximate["start"] == approximate["split"]  # after the prefix token
    whitespace = requests[windows[3]["minus"]]
    assert (whitespace["split"], whitespace["end"]) == (3071, 3072)
    windows, requests = docs[1]["windows"], docs[1]["requests"]
    assert [(w["exact"], len(w["plus"])) for w in windows] == [(False, 1), (False, 2), (True, 1)]
    pieces = [(requests[plus]["split"], requests[plus]["end"]) for w in windows for plus in w["plus"]]
    assert pieces == [(0, 1023), (1023, 1024), (1024, 2047), (2047, len(accented))]  # the character apart
    for request in requests:
        assert len(model.tok_encode(accented[request["split"] : request["end"]])) <= 1024

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata=dict(corpus=source, max_seq_lengths=[1024], tokenizer=model.tokenizer.name_or_path))
    model._max_length = 1024
    ours = lm_eval.simple_evaluate(model=model, tasks=["sb_wikitext"], task_manager=manager, log_samples=True)
    assert ours["results"]["sb_wikitext"]["approximate_windows_1024,none"] == 3
    reference = lm_eval.simple_evaluate(model=model, tasks=["wikitext_local"], task_manager=lm_evals_wikitext(source, tmp_path / "tasks"),
                                        log_samples=True)
    ids = model.tok_encode(pages[0])
    targets = ids[1024:2048]
    (after_prefix, _), (after_space, _) = model._loglikelihood_tokens([(None, [model.prefix_token_id], targets), (None, ids[1023:1024], targets)])
    expected = _per_document(reference["samples"]["wikitext_local"], "bits_per_byte")
    expected[0] += after_prefix - after_space  # the one approximate window: its targets after the prefix token
    got = _per_document(ours["samples"]["sb_wikitext"], "bits_per_byte_1024")
    assert [got[0], got[2]] == pytest.approx([expected[0], expected[2]], rel=1e-6)
    assert got[1] == pytest.approx(expected[1], rel=1e-2)  # the character's bytes after the prefix token


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(max_seq_lengths=[2048, 4096], max_length=2048), r"max_seq_lengths=\[2048, 4096\] goes beyond the model's max_length=2048.*pass max_length=4096"),
        (dict(max_seq_lengths=[3000]), r"declares metrics for the lengths \[1024, 2048, 4096\], not 3000"),
        (dict(detokenize="yes"), r"metadata detokenize='yes' must be true .* or false"),
        (dict(add_bos_token="yes"), r"add_bos_token='yes' must be true or false"),
    ],
)
def test_sb_wikitext_names_bad_settings(settings, message, models, corpus):
    with pytest.raises(ValueError, match=message):
        perplexity.wikitext_dataset(**dict(dict(corpus=corpus, tokenizer=models["bytes"].tokenizer.name_or_path,
                                                max_seq_lengths=[1024], metric_lengths=[1024, 2048, 4096]), **settings))


def test_sb_wikitext_detokenizes_wikitext_sources_only(models, corpus, offline_datasets, tmp_path):
    page = " = Du Fu = \n Du Fu ( 712 @-@ 770 ) was a Chinese poet . \n"
    wiki = tmp_path / "wikitext_document_level"
    source = wikitext_folder(wiki, [page])
    tokenizer = models["bytes"].tokenizer.name_or_path
    settings = dict(max_seq_lengths=[1024], metric_lengths=[1024], tokenizer=tokenizer)
    (row,) = perplexity.wikitext_dataset(corpus=source, **settings)["test"]
    assert (row["page"], row["text"]) == (page, " = Du Fu =\nDu Fu (712-770) was a Chinese poet.\n")
    (row,) = perplexity.wikitext_dataset(corpus=source, detokenize=False, **settings)["test"]
    assert row["text"] == page
    texts = perplexity.wikitext_dataset(corpus=corpus, **settings)["test"]["text"]
    assert texts == standin_documents()
