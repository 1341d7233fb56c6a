"""The fault matrix: every bad input and fault sb-eval promises to handle, each with the error it
raises (or the exit status of its command), a message that names the file, argument or field and
what would be valid, and nothing half-written left behind.

Rows are grouped by where the input enters: checkpoint folders, sb_hf's model arguments, task
metadata, corpora and sample caches, and the commands (sweep, distance, data, the lm-eval command
line, training).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from safetensors.torch import load_file, save_file
from test_ruler_helpers import write_standin_essays

from sb_eval.commands import data as data_command
from sb_eval.commands import distance as distance_command
from sb_eval.commands import sweep as sweep_command
from sb_eval.data.documents import DocumentSourceError, documents
from sb_eval.harness import sweep
from sb_eval.harness.stick_breaking_lm import PromptTooLongError, StickBreakingLM
from sb_eval.model.checks import CheckpointError, check_checkpoint_folder, check_tokenizer_folder
from sb_eval.model.configuration import tiny_config
from sb_eval.model.modeling import StickBreakingForCausalLM
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.ruler import cache as sample_cache
from sb_eval.ruler.corpora import ESSAY_SENTENCES_FILE, CorruptCorpusError, MissingCorpusError, essay_sentences
from sb_eval.ruler.generate import generate
from sb_eval.tasks import mqrar as mqrar_task
from sb_eval.tasks import perplexity, ruler_tasks
from sb_eval.tokenization import byte_level_tokenizer
from sb_eval.training.trainer import ModelSize, TokenWindows, TrainSettings, build_model, train

SMALL = dict(n_layer=1, n_embd=32, n_head=2, n_inner=64, attention_multiplier=1 / 16)


def leftovers(folder: Path) -> list[Path]:
    """Files a failed write could leave: temporary files and staging folders."""
    return [path for path in folder.rglob("*") if path.name.endswith(".tmp") or path.name.startswith(".")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", tiny_config(**SMALL), seed=3)


@pytest.fixture
def folder(checkpoint, tmp_path) -> Path:
    """A fresh copy of a good checkpoint for a test to break."""
    return Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))


# ---------------------------------------------------------------------------------------------
# Checkpoint folders: the checks before anything is loaded.


def _config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _rewrite_header(folder: Path, edit) -> None:
    raw = _weights(folder).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    new_header = json.dumps(edit(header)).encode()
    _weights(folder).write_bytes(len(new_header).to_bytes(8, "little") + new_header + raw[8 + size :])


def _pickle_only(folder: Path) -> None:
    torch.save(load_file(_weights(folder)), folder / "pytorch_model.bin")
    _weights(folder).unlink()


def _drop_tensor(folder: Path) -> None:
    tensors = load_file(_weights(folder))
    tensors.pop("transformer.ln_f.weight")
    save_file(tensors, _weights(folder))


def _extra_tensor(folder: Path) -> None:
    save_file(load_file(_weights(folder)) | {"transformer.h.7.attn.c_attn.weight": torch.zeros(2, 2)}, _weights(folder))


def _wrong_shape(folder: Path) -> None:
    tensors = load_file(_weights(folder))
    tensors["transformer.wte.weight"] = torch.zeros(100, 32)
    save_file(tensors, _weights(folder))


def _index(folder: Path, content: str) -> None:
    (folder / "model.safetensors.index.json").write_text(content)


CHECKPOINT_FAULTS = {
    "no config.json": (lambda f: (f / "config.json").unlink(), r"has no config\.json"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{'n_embd': 32"), r"config\.json is not valid JSON"),
    "another model_type": (lambda f: _config(f, model_type="llama"), r"model_type is 'llama'.*--model hf"),
    "n_embd and n_head": (lambda f: _config(f, n_head=3), r"n_embd \(32\) must be a multiple of n_head \(3\)"),
    "attention head type": (lambda f: _config(f, attention_head_type="local"), r"attention_head_type is 'local'; expected one of"),
    "activation": (lambda f: _config(f, activation_function="tanh"), r"activation_function is 'tanh'; expected one of"),
    "position embedding": (lambda f: _config(f, position_embedding_type="rope"), r"position_embedding_type is 'rope'"),
    "no weights": (lambda f: _weights(f).unlink(), r"has no weights: expected model\.safetensors"),
    "pickle only": (_pickle_only, r"only pickle weights \(pytorch_model\.bin\).*allow_pickle=True"),
    "safetensors of random bytes": (lambda f: _weights(f).write_bytes(os.urandom(4096)), r"model\.safetensors is not a safetensors file: .*header of"),
    "safetensors of 4 bytes": (lambda f: _weights(f).write_bytes(b"\x01\x02\x03\x04"), r"model\.safetensors is not a safetensors file: it has 4 bytes"),
    "safetensors cut in half": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes()[: _weights(f).stat().st_size // 2]),
                                r"model\.safetensors: tensor '.*' .* claims bytes .* cannot hold them"),
    "safetensors with bytes appended": (lambda f: _weights(f).write_bytes(_weights(f).read_bytes() + b"\0" * 16),
                                        r"model\.safetensors: its tensors end at byte \d+ of a data section of \d+ bytes"),
    "safetensors header not JSON": (lambda f: _weights(f).write_bytes((6).to_bytes(8, "little") + b"{oops}" + b"\0" * 8),
                                    r"model\.safetensors is not a safetensors file: its header is not JSON"),
    "safetensors header a list": (lambda f: _rewrite_header(f, lambda header: [header]), r"its header is not a JSON object"),
    "safetensors tensor dtype": (lambda f: _rewrite_header(f, lambda h: {k: (v | {"dtype": "F13"}) if k != "__metadata__" else v for k, v in h.items()}),
                                 r"model\.safetensors: tensor '.*' has no valid dtype, shape and data_offsets"),
    "index not JSON": (lambda f: _index(f, "weight_map ="), r"model\.safetensors\.index\.json is not a safetensors index"),
    "index names a missing shard": (lambda f: _index(f, json.dumps({"weight_map": {"x": "model-00002.safetensors"}})),
                                    r"model-00002\.safetensors is listed in model\.safetensors\.index\.json but does not exist"),
    "a tensor missing": (_drop_tensor, r"lacks 1 tensor\(s\) that config\.json needs: transformer\.ln_f\.weight"),
    "a tensor too many": (_extra_tensor, r"has 1 tensor\(s\) that config\.json does not describe: transformer\.h\.7"),
    "a tensor of the wrong shape": (_wrong_shape, r"tensor transformer\.wte\.weight has shape \[100, 32\] but config\.json implies \[257, 32\]; set by config\.json's vocab_size, n_embd"),
}


@pytest.mark.parametrize("fault", sorted(CHECKPOINT_FAULTS))
def test_a_broken_checkpoint_folder_is_named_before_any_tensor_is_read(fault, folder):
    breaking, message = CHECKPOINT_FAULTS[fault]
    breaking(folder)
    with pytest.raises(CheckpointError, match=message):
        check_checkpoint_folder(folder, StickBreakingForCausalLM)
    # the same from transformers' Auto classes and from sb_hf
    with pytest.raises(CheckpointError, match=message):
        StickBreakingForCausalLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match=message):
        StickBreakingLM(pretrained=str(folder), device="cpu")


def test_a_folder_without_a_tokenizer_is_named(folder):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match=r"has no tokenizer .*tokenizer=PATH"):
        check_tokenizer_folder(folder)


def test_a_malicious_pickle_is_refused_by_default_and_never_run(folder, tmp_path):
    """pytorch_model.bin holding code: refused without allow_pickle, however false is spelt; a word
    that is no boolean ("off") is refused as such."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    _weights(folder).unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    for refused in (False, "no", "NO", "0", "False"):
        with pytest.raises(CheckpointError, match="only pickle weights"):
            StickBreakingLM(pretrained=str(folder), device="cpu", allow_pickle=refused)
    with pytest.raises(ValueError, match=r"allow_pickle='off' is not a boolean"):
        StickBreakingLM(pretrained=str(folder), device="cpu", allow_pickle="off")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# sb_hf's model arguments.


SB_HF_FAULTS = {
    "pretrained not a folder": (dict(pretrained="/nonexistent/model"), ValueError, r"pretrained=/nonexistent/model is not a local folder"),
    "allow_pickle=maybe": (dict(allow_pickle="maybe"), ValueError, r"allow_pickle='maybe' is not a boolean; write true or false"),
    "truncate_long_prompts=sometimes": (dict(truncate_long_prompts="sometimes"), ValueError, r"truncate_long_prompts='sometimes' is not a boolean"),
    "decode_graphs=fast": (dict(decode_graphs="fast"), ValueError, r"decode_graphs='fast' is not a boolean"),
    "attention_backend=flash": (dict(attention_backend="flash"), ValueError, r"attention_backend must be one of \('auto', 'triton', 'torch', 'reference'\)"),
    "logprob_chunk_size=0": (dict(logprob_chunk_size=0), ValueError, r"logprob_chunk_size must be a positive number of tokens"),
    "a misspelt argument": (dict(attention_backnd="torch"), ValueError, r"sb_hf's --model_args has no setting 'attention_backnd'\. Did you mean 'attention_backend'\?"),
    "an argument of no model": (dict(num_layerz=2), ValueError, r"has no setting 'num_layerz'.*Valid: .*allow_pickle"),
    "an odd boolean of HFLM's": (dict(trust_remote_code="maybe"), ValueError, r"trust_remote_code='maybe' is not a boolean"),
    "attribution_tokens=0": (dict(attribution_tokens=0), ValueError, r"attribution_tokens must be a positive number"),
}


@pytest.mark.parametrize("fault", sorted(SB_HF_FAULTS))
def test_bad_model_arguments_are_named(fault, checkpoint):
    arguments, error, message = SB_HF_FAULTS[fault]
    with pytest.raises(error, match=message):
        StickBreakingLM(**({"pretrained": str(checkpoint), "device": "cpu"} | arguments))


def test_a_prompt_longer_than_max_length_is_an_error_naming_the_sample(checkpoint):
    lm = StickBreakingLM(pretrained=str(checkpoint), device="cpu", max_length=64, attention_backend="torch")
    request = Instance("generate_until", {}, ("x" * 500, {"until": [], "max_gen_toks": 4}), 0, metadata=("sb_niah_single_2", 7, 1))
    with pytest.raises(PromptTooLongError, match=r"^sb_niah_single_2, document 7: generate_until request of 500 tokens, more than the 60"):
        lm.generate_until([request])


# ---------------------------------------------------------------------------------------------
# Task metadata (--metadata, into which lm-eval merges --model_args).


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data"
    write_standin_essays(folder)
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(folder))
    return folder


TASK_FAULTS = {
    "RULER: num_sample": (ruler_tasks.custom_dataset, dict(ruler_task="niah_single_1", num_sample=5),
                          r"RULER task niah_single_1's --metadata has no setting 'num_sample'\. Did you mean 'num_samples'\?"),
    "RULER: num_samples=0": (ruler_tasks.custom_dataset, dict(ruler_task="vt", num_samples=0), r"num_samples=0 must be a positive integer"),
    "RULER: max_seq_lengths a string": (ruler_tasks.custom_dataset, dict(ruler_task="vt", max_seq_lengths="4K"),
                                        r"max_seq_lengths='4K' must be a list of token counts"),
    "RULER: seed a word": (ruler_tasks.custom_dataset, dict(ruler_task="vt", seed="x"), r"seed='x' must be an integer"),
    "RULER: sizing": (ruler_tasks.custom_dataset, dict(ruler_task="vt", sizing="tight"), r"sizing"),
    "RULER: no task": (ruler_tasks.custom_dataset, dict(), r"need either ruler_task .* or generator and tokens_to_generate"),
    "RULER: unknown task": (ruler_tasks.custom_dataset, dict(ruler_task="niah_single_9"), r"ruler_task='niah_single_9' is not one of"),
    "mqrar: num_pair": (mqrar_task.custom_dataset, dict(num_pair=[32]), r"mqrar's --metadata has no setting 'num_pair'\. Did you mean 'num_pairs'\?"),
    "mqrar: too many pairs": (mqrar_task.custom_dataset, dict(num_pairs=[400], seq_length=768),
                              r"num_pairs=\[400\], seq_length=768: .* takes at most 192 pairs at this length"),
    "mqrar: task": (mqrar_task.custom_dataset, dict(task="recall"), r"task='recall' must be one of \['mqrar', 'mqar'\]"),
    "mqrar: filler": (mqrar_task.custom_dataset, dict(task="mqar", filler="zeros"), r"filler='zeros' must be one of \['values', 'constant'\]"),
    "mqrar: constant filler in MQRAR": (mqrar_task.custom_dataset, dict(filler="constant"), r"filler='constant' is MQAR's"),
    "sb_ppl: target_token": (perplexity.sb_ppl_dataset, dict(target_token=64, metric_lengths=[1024]),
                             r"sb_ppl's --metadata has no setting 'target_token'\. Did you mean 'target_tokens'\?"),
    "sb_ppl: an undeclared length": (perplexity.sb_ppl_dataset, dict(max_seq_lengths=[3000], metric_lengths=[1024, 2048]),
                                     r"declares metrics for the lengths \[1024, 2048\], not 3000"),
    "sb_ppl: add_bos_token=perhaps": (perplexity.sb_ppl_dataset, dict(add_bos_token="perhaps", metric_lengths=[1024], max_seq_lengths=[1024],
                                                                      target_tokens=64, max_context=1024, corpus="{documents}"),
                                      r"add_bos_token='perhaps' is not a boolean"),
    "sb_wikitext: detokenise": (perplexity.wikitext_dataset, dict(detokenise=True, metric_lengths=[1024]),
                                r"sb_wikitext's --metadata has no setting 'detokenise'\. Did you mean 'detokenize'\?"),
}


@pytest.mark.parametrize("fault", sorted(TASK_FAULTS))
def test_bad_task_metadata_is_named_with_what_is_valid(fault, data_dir, checkpoint, offline_datasets, tmp_path):
    dataset, metadata, message = TASK_FAULTS[fault]
    (tmp_path / "document.txt").write_text("A long document. " * 400)
    metadata = {key: value.format(documents=tmp_path / "document.txt") if isinstance(value, str) else value for key, value in metadata.items()}
    with pytest.raises(ValueError, match=message):
        dataset(**({"tokenizer": str(checkpoint)} | metadata))


def test_model_arguments_in_the_metadata_are_not_mistaken_for_task_settings(data_dir, checkpoint):
    """lm-eval merges --model_args into every task's metadata."""
    rows = ruler_tasks.custom_dataset(ruler_task="niah_single_1", pretrained=str(checkpoint), dtype="float32", device="cpu",
                                      batch_size=4, max_length=4096, trust_remote_code=False, version=1.0,
                                      config_source="x.yaml", max_seq_lengths=[2048], num_samples=1)["test"]
    assert len(rows) == 1


# ---------------------------------------------------------------------------------------------
# Corpora and sample caches.


CORPUS_FAULTS = {
    "garbage bytes": (b"\xff\xfe\x00garbage", r"sentences\.json is not the JSON file sb-eval wrote \(UnicodeDecodeError"),
    "cut off": (b'{"sentences": ["One.", "Tw', r"sentences\.json is not the JSON file sb-eval wrote \(JSONDecodeError"),
    "a list": (b'["One.", "Two."]', r"sentences\.json holds a JSON list, not an object with 'sentences'"),
    "no sentences": (b'{"sentences": []}', r"sentences\.json: field 'sentences' must be a non-empty list of strings"),
}


@pytest.mark.parametrize("fault", sorted(CORPUS_FAULTS))
def test_a_damaged_essay_file_is_named_with_the_command_that_restores_it(fault, data_dir):
    content, message = CORPUS_FAULTS[fault]
    (data_dir / ESSAY_SENTENCES_FILE).write_bytes(content)
    with pytest.raises(CorruptCorpusError, match=message + r".*sb-eval data fetch essays"):
        essay_sentences()


def test_missing_essays_name_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(MissingCorpusError, match=r"Fetch it once with: sb-eval data fetch essays"):
        essay_sentences()


@pytest.mark.parametrize(("source", "message"), [
    ("no-such-corpus", r"'no-such-corpus' is neither a corpus name nor an existing file or folder; valid:"),
    ("bad.jsonl", r"bad\.jsonl, line 2: not JSON"),
    ("list.jsonl", r'list\.jsonl, line 1: expected a JSON object with a string field "text"'),
])
def test_bad_document_sources_are_named(source, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "list.jsonl").write_text('["text"]\n')
    with pytest.raises(DocumentSourceError, match=message):
        documents(source)


def _break_cache(path: Path, how: str) -> None:
    stored = json.loads(path.read_text())
    if how == "bytes":
        path.write_bytes(os.urandom(64))
    elif how == "a list":
        path.write_text(json.dumps([stored]))
    elif how == "null":
        path.write_text("null")
    elif how == "a sample without its input":
        del stored["samples"][0]["input"]
        path.write_text(json.dumps(stored))
    elif how == "another answer":
        stored["samples"][0]["outputs"] = ["0000000"]
        path.write_text(json.dumps(stored))


@pytest.mark.parametrize("how", ["bytes", "a list", "null", "a sample without its input", "another answer"])
def test_a_sample_cache_that_does_not_verify_is_made_again_with_one_warning(how, data_dir, tmp_path, caplog):
    tokenizer = byte_level_tokenizer()
    fresh = generate("niah_single_1", 2048, tokenizer, 2, cache_dir=tmp_path / "cache", sizing="fill")
    (path,) = (tmp_path / "cache").glob("*.json")
    _break_cache(path, how)
    with caplog.at_level("WARNING", logger=sample_cache.__name__):
        again = generate("niah_single_1", 2048, tokenizer, 2, cache_dir=tmp_path / "cache", sizing="fill")
    assert again == fresh
    warnings = [record.getMessage() for record in caplog.records if record.name == sample_cache.__name__]
    assert len(warnings) == 1 and str(path) in warnings[0] and "making it again" in warnings[0]
    assert sample_cache.load(path, json.loads(path.read_text())["key"]) == fresh  # rewritten whole
    assert not leftovers(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Commands: sb-eval sweep, distance, data, the lm-eval command line, training.


def _sweep(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "sb_niah_single_1", "--lengths", "1024",
            "--output", str(tmp_path / "out"), *extra]


SWEEP_FAULTS = {
    "output is a file": (lambda t: (t / "out").write_text("x"), (), r"--output .*out is a file, not a folder"),
    "output not creatable": (lambda t: None, ("--output", "/proc/sb-eval-results"), r"--output /proc/sb-eval-results cannot hold the results"),
    "cuda without CUDA": (lambda t: None, ("--device", "cuda"), r"--device cuda: this machine has no CUDA device"),
    "a misspelt task": (lambda t: None, ("--tasks", "ruler_nia"), r"unknown task 'ruler_nia'\. Did you mean ruler_niah"),
    "lengths": (lambda t: None, ("--lengths", "2048,abc"), r"--lengths '2048,abc': 'abc' is not a positive number"),
    "metadata not JSON": (lambda t: None, ("--metadata", "{num_samples: 1}"), r"--metadata .* is not JSON"),
    "limit": (lambda t: None, ("--limit", "-3"), r"--limit '-3'"),
    "batch size": (lambda t: None, ("--batch_size", "big"), r"--batch_size 'big' must be a positive number, auto or auto:N"),
}


@pytest.mark.parametrize("fault", sorted(SWEEP_FAULTS))
def test_sweep_checks_its_ground_before_any_model_loads(fault, tmp_path, capsys, monkeypatch):
    if fault == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prepare, extra, message = SWEEP_FAULTS[fault]
    prepare(tmp_path)
    monkeypatch.setattr(sweep, "load_model", lambda *args: pytest.fail("a model was loaded"))
    assert sweep_command.main(_sweep(tmp_path, *extra)) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_misspelt_task_is_named_without_building_lm_evals_task_index(tmp_path, capsys, monkeypatch):
    built = []
    task_manager = sweep.TaskManager
    monkeypatch.setattr(sweep, "TaskManager", lambda *args, **kwargs: built.append(kwargs) or task_manager(*args, **kwargs))
    assert sweep_command.main(_sweep(tmp_path, "--tasks", "sb_niah_single_I")) == 2
    assert re.search(r"unknown task 'sb_niah_single_I'\. Did you mean .*sb_niah_single_1", capsys.readouterr().err)
    assert all(kwargs.get("include_defaults") is False for kwargs in built)


def test_sweep_without_device_runs_on_the_cpu_of_a_machine_without_cuda():
    assert sweep.parse_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_full_disk_stops_the_sweep_with_a_message_and_the_results_intact(checkpoint, data_dir, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    command = ["--model_args", f"pretrained={checkpoint},attention_backend=torch", "--tasks", "sb_niah_single_1",
               "--lengths", "2048,3072", "--output", str(output), "--metadata", '{"num_samples": 1, "sizing": "fill"}',
               "--gen_kwargs", "max_gen_toks=2", "--device", "cpu"]
    write = os.write
    calls = []

    def full_after_the_first_row(descriptor, data):
        calls.append(data)
        if len(calls) > 1:
            write(descriptor, data[: len(data) // 2])  # a part gets onto the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(descriptor, data)

    monkeypatch.setattr(sweep.os, "write", full_after_the_first_row)
    assert sweep_command.main(command) == 1
    assert "No space left on device; the rows before it are intact" in capsys.readouterr().err
    rows = (output / "results.jsonl").read_text().splitlines()
    assert len(rows) == 1 and json.loads(rows[0])["length"] == 2048  # the half row was cut away
    monkeypatch.setattr(sweep.os, "write", write)
    assert sweep_command.main(command) == 0  # made room: the same command continues
    assert [json.loads(line)["length"] for line in (output / "results.jsonl").read_text().splitlines()] == [2048, 3072]


DISTANCE_FAULTS = {
    "output is a file": (("--output", "{tmp}/file"), r"--output .*file is a file, not a folder"),
    "cuda without CUDA": (("--device", "cuda"), r"--device cuda: this machine has no CUDA device"),
    "length 1": (("--length", "1"), r"--length must be at least 2 tokens, got 1"),
    "no such corpus": (("--corpus", "poems"), r"'poems' is neither a corpus name"),
}


@pytest.mark.parametrize("fault", sorted(DISTANCE_FAULTS))
def test_distance_checks_its_ground_before_any_model_loads(fault, checkpoint, tmp_path, capsys):
    if fault == "cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "file").write_text("x")
    (tmp_path / "doc.txt").write_text("word " * 100)
    arguments = {"--model_args": f"pretrained={checkpoint}", "--corpus": str(tmp_path / "doc.txt"), "--length": "16",
                 "--output": str(tmp_path / "out"), "--device": "cpu"}
    extra, message = DISTANCE_FAULTS[fault]
    arguments[extra[0]] = extra[1].format(tmp=tmp_path)
    assert distance_command.main([part for pair in arguments.items() for part in pair]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_fetching_an_unknown_corpus_names_the_valid_ones(tmp_path, capsys):
    assert data_command.main(["fetch", "poems", "--data-dir", str(tmp_path)]) == 1
    assert re.search(r"unknown corpus poems; valid: essays, aa-lcr, books", capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_errors_through_the_lm_eval_command_line_end_with_our_message(checkpoint, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sb_eval.cli", "run", "--model", "sb_hf", "--model_args", f"pretrained={checkpoint},allow_pickle=maybe",
         "--tasks", "sb_niah_single_1", "--device", "cpu"],
        capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"SB_EVAL_DATA_DIR": str(tmp_path)},
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].endswith("allow_pickle='maybe' is not a boolean; write true or false (also 1/0, yes/no)")


def test_training_resumes_without_running_pickled_code(tmp_path):
    """A train_state.pt that holds code (not what training writes) is refused, not run."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    output = tmp_path / "run"
    output.mkdir()
    (output / "train_state.pt").write_bytes(pickle.dumps({"model": Payload()}))
    tokenizer = byte_level_tokenizer()
    model = build_model("stickbreaking", ModelSize(1, 32, 2, len(tokenizer), 64), tokenizer)
    source = TokenWindows(torch.randint(0, 256, (4096,)), 64, 2, seed=0)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(model, tokenizer, source, source, TrainSettings(steps=2, lr=1e-3, attention_backend="torch"), output, device="cpu")
    assert not marker.exists()
