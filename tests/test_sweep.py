"""sb-eval sweep: rows, table and plots for two models; failures as rows; resume after a kill and
after a torn last line; Ctrl-C; argument errors before any model loads; the report's headline
metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM
from test_ruler_helpers import standin_sentences, write_standin_essays
from tiny_models import write_tiny_llama

from sb_eval.commands import sweep as sweep_command
from sb_eval.harness import sweep
from sb_eval.harness.stick_breaking_lm import StickBreakingLM
from sb_eval.model.configuration import tiny_config
from sb_eval.model.saving import write_random_checkpoint
from sb_eval.reports import sweep as plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# One sample per point and four generated tokens: the sweep, not the models, is under test.
FAST = ["--metadata", '{"num_samples": 1}', "--gen_kwargs", "max_gen_toks=4", "--device", "cpu"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Model specs: a one-layer random stick-breaking checkpoint (sb_hf) and a tiny random Llama
    (lm-eval's hf), both with the byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("models")
    sb = write_random_checkpoint(folder / "sb", tiny_config(n_layer=1, n_head=2, n_embd=32, n_inner=64, attention_multiplier=1 / 16))
    write_tiny_llama(
        folder / "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
    )
    return {"sb": f"pretrained={sb},attention_backend=torch", "llama": f"pretrained={folder / 'llama'}"}


@pytest.fixture(scope="module")
def essays(tmp_path_factory) -> Path:
    """A data folder with stand-in essays, shared so that RULER's sample cache is reused."""
    folder = tmp_path_factory.mktemp("data")
    write_standin_essays(folder)
    return folder


@pytest.fixture
def data_dir(essays, monkeypatch) -> Path:
    monkeypatch.setenv("SB_EVAL_DATA_DIR", str(essays))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.delenv("RANK", raising=False)
    return essays


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_models_give_rows_table_and_plots_and_a_failure_becomes_a_row(models, data_dir, tmp_path, monkeypatch):
    output = tmp_path / "out"
    command = ["--model_args", models["sb"], "--compare", f"hf:{models['llama']}", "--tasks", "sb_niah_single_1",
               "--lengths", "2048,1024", "--train_length", "1024", "--output", str(output), *FAST]
    generate_until = StickBreakingLM.generate_until

    def out_of_memory_at_2048(self, requests, *args, **kwargs):
        if any(request.doc["max_length"] == 2048 for request in requests):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return generate_until(self, requests, *args, **kwargs)

    loads = []
    load_model = sweep.load_model
    with monkeypatch.context() as patch:
        patch.setattr(StickBreakingLM, "generate_until", out_of_memory_at_2048)
        patch.setattr(sweep, "load_model", lambda model, settings: loads.append(model.name) or load_model(model, settings))
        assert sweep_command.main(command) == 1

    assert loads == ["sb_hf", "hf"]  # each model once, for all its lengths
    rows = read_lines(output / "results.jsonl")
    assert [(row["model"], row["length"], "error" in row) for row in rows] == [
        ("sb_hf", 1024, False), ("sb_hf", 2048, True), ("hf", 1024, False), ("hf", 2048, False)]
    assert rows[1]["error"]["type"] == "OutOfMemoryError" and "20.00 GiB" in rows[1]["error"]["message"]
    for row in rows[:1] + rows[2:]:
        assert set(row["metrics"]) == {str(row["length"])} and 0 <= row["metrics"][str(row["length"])] <= 100
        assert row["samples"] == 1 and row["seconds"] > 0 and row["versions"]["lm_eval"]
        assert row["task"] == "sb_niah_single_1" and row["metadata"] == {"num_samples": 1}
    assert rows[2]["model_args"] == models["llama"]

    summary = (output / "summary.md").read_text()
    assert "| task | model | metric | 1024 | 2048 |" in summary
    sb_line = next(line for line in summary.splitlines() if line.startswith("| sb_niah_single_1 | sb_hf:sb |"))
    assert sb_line.endswith("| error (OutOfMemoryError) |")
    hf_line = next(line for line in summary.splitlines() if line.startswith("| sb_niah_single_1 | hf:llama |"))
    assert "error" not in hf_line and "<length>" in hf_line
    assert (output / "plots" / "sb_niah_single_1.png").read_bytes().startswith(PNG_SIGNATURE)

    # Rerun: only the error row's point runs again, appended; nothing earlier is rewritten.
    before = (output / "results.jsonl").read_bytes()
    assert sweep_command.main(command) == 0
    after = (output / "results.jsonl").read_bytes()
    assert after.startswith(before)
    (retried,) = read_lines(output / "results.jsonl")[4:]
    assert (retried["model"], retried["length"], "error" in retried) == ("sb_hf", 2048, False)
    assert "error (" not in (output / "summary.md").read_text()


def test_a_length_beyond_the_models_max_length_is_an_error_row_not_a_truncated_score(data_dir, tmp_path):
    """lm-eval's hf takes max_length from max_position_embeddings and would cut a longer prompt
    from the left; the point fails and names the argument that fixes it."""
    short = write_tiny_llama(
        tmp_path / "llama-1k", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
    )
    output = tmp_path / "out"
    command = ["--model", "hf", "--model_args", f"pretrained={short}", "--tasks", "sb_niah_single_1",
               "--lengths", "1024,2048", "--output", str(output), *FAST]
    assert sweep_command.main(command) == 1
    rows = read_lines(output / "results.jsonl")
    assert [(row["length"], "error" in row) for row in rows] == [(1024, False), (2048, True)]
    assert rows[1]["error"]["type"] == "MaxLengthError"
    assert "max_length is 1024, below this point's 2048 tokens" in rows[1]["error"]["message"]
    assert "pass max_length=2048" in rows[1]["error"]["message"]
    command[3] += ",max_length=2048"  # the fix it names; another model spec, so both lengths run
    assert sweep_command.main(command) == 0


def test_the_sweep_closes_each_model_and_lets_it_go(models, data_dir, tmp_path, monkeypatch):
    # sb_hf with attention_stats: the sweep closes it (the file is complete) and, once the sweep
    # is done with it, nothing keeps its weights alive.
    stats = tmp_path / "attention.json"
    command = ["--model_args", f"{models['sb']},attention_stats={stats}", "--tasks", "sb_niah_single_1",
               "--lengths", "1024", "--output", str(tmp_path / "out"), *FAST]
    weights = []
    evaluate_point = sweep.evaluate_point
    monkeypatch.setattr(sweep, "evaluate_point", lambda lm, *args: weights.append(weakref.ref(lm.model)) or evaluate_point(lm, *args))
    assert sweep_command.main(command) == 0
    assert len(weights) == 1 and weights[0]() is None
    statistics = json.loads(stats.read_text())["statistics"]
    assert statistics["forward_passes"] > 0


def run_sweep_until(command: list[str], results: Path, env: dict, stop: signal.Signals, new_rows: int = 1) -> subprocess.CompletedProcess:
    """Starts the sweep, and sends it `stop` as soon as results.jsonl has `new_rows` rows more than before."""
    rows_before = len(results.read_bytes().splitlines()) if results.exists() else 0
    process = subprocess.Popen(command, env=env, cwd=results.parent.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (results.exists() and len(results.read_bytes().splitlines()) >= rows_before + new_rows):
        assert process.poll() is None, f"the sweep ended before writing a row: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "no row within 300 s"
        time.sleep(0.05)
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def test_sb_wikitext_sweeps_its_lengths_in_one_command_one_line_per_model(models, data_dir, tmp_path):
    corpus = tmp_path / "documents.jsonl"
    sentences = standin_sentences(200, seed=2)
    texts = [" ".join(sentences[:8]), " ".join(sentences[8:24])]
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    tokens = [len(text.encode("utf-8")) for text in texts]  # the byte-level tokenizer: a token per byte
    assert tokens[0] < 1024 < tokens[1] < 2048
    output = tmp_path / "out"
    command = ["--model_args", models["sb"], "--compare", f"hf:{models['llama']}", "--tasks", "sb_wikitext",
               "--lengths", "1K,2K", "--output", str(output), "--metadata", json.dumps({"corpus": str(corpus)}), "--device", "cpu"]
    assert sweep_command.main(command) == 0
    rows = read_lines(output / "results.jsonl")
    assert [(row["model"], row["length"]) for row in rows] == [("sb_hf", 1024), ("sb_hf", 2048), ("hf", 1024), ("hf", 2048)]
    for row in rows:
        length, metrics = row["length"], row["metrics"]
        assert metrics[f"word_perplexity_{length}"] > metrics[f"byte_perplexity_{length}"] > 1
        assert metrics[f"documents_longer_{length}"] == sum(count > length for count in tokens)
        assert metrics[f"tokens_in_longer_{length}"] == pytest.approx(sum(c for c in tokens if c > length) / sum(tokens))
        assert metrics["longest_document"] == max(tokens) and row["samples"] == len(texts)
    # at 1K the longer document takes two windows; at 2K it fits whole
    assert [row["metrics"][f"windows_{row['length']}"] for row in rows] == [3, 2, 3, 2]

    summary = (output / "summary.md").read_text().splitlines()
    sb_line = next(line for line in summary if line.startswith("| sb_wikitext | sb_hf:sb | word_perplexity_<length> |"))
    assert sb_line.endswith(" * |") and sb_line.count("*") == 1  # only 2048: no document is longer
    assert f"| sb_wikitext | sb_hf:sb | {tokens[1]:,} | 1 ({tokens[1] / sum(tokens):.0%}) | 0 (0%) * |" in summary
    assert (output / "plots" / "sb_wikitext.png").read_bytes().startswith(PNG_SIGNATURE)
    before = (output / "results.jsonl").read_bytes()
    assert sweep_command.main(command) == 0  # resumed: every point is done
    assert (output / "results.jsonl").read_bytes() == before


@pytest.mark.parametrize("killed_after", [1, 2])
def test_a_killed_sweep_resumes_without_redoing_or_losing_rows(killed_after, models, data_dir, tmp_path):
    output = tmp_path / "out"
    results = output / "results.jsonl"
    command = [sys.executable, "-m", "sb_eval.cli", "sweep", "--model_args", models["sb"], "--tasks", "sb_niah_single_1",
               "--lengths", "1024,2048,4096", "--output", str(output), *FAST]
    env = dict(os.environ)

    killed = run_sweep_until(command, results, env, signal.SIGKILL, new_rows=killed_after)
    assert killed.returncode == -signal.SIGKILL
    first = results.read_bytes()
    done = len(first.splitlines())
    assert done >= killed_after

    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"{done} of 3 points already" in finished.stderr
    assert results.read_bytes().startswith(first)
    rows = read_lines(results)
    assert [(row["length"], "error" in row) for row in rows] == [(1024, False), (2048, False), (4096, False)]


def test_ctrl_c_stops_the_sweep_without_a_row_for_the_running_point(models, data_dir, tmp_path, monkeypatch):
    generate_until = HFLM.generate_until

    def interrupted_at_2048(self, requests, *args, **kwargs):
        if any(request.doc["max_length"] == 2048 for request in requests):
            raise KeyboardInterrupt
        return generate_until(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "generate_until", interrupted_at_2048)
    output = tmp_path / "out"
    command = ["--model", "hf", "--model_args", models["llama"], "--tasks", "sb_niah_single_1",
               "--lengths", "1024,2048,4096", "--output", str(output), *FAST]
    assert sweep_command.main(command) == 130
    assert [(row["length"], "error" in row) for row in read_lines(output / "results.jsonl")] == [(1024, False)]
    assert "| sb_niah_single_1 | hf:llama | <length> |" in (output / "summary.md").read_text()


def test_resume_ignores_a_torn_last_line_and_appends_after_it(models, data_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    spec = sweep.ModelSpec("hf", models["llama"])
    done = {
        "model_spec": spec.key, "model": "hf", "model_args": spec.args, "task": "sb_niah_single_1", "length": 1024,
        "metadata": {"num_samples": 1}, "limit": None, "gen_kwargs": {"max_gen_toks": 4},
        "metrics": {"1024": 42.0}, "samples": 1,
    }
    torn = '{"model_spec": "hf:pretrained=/x", "task": "sb_ni'
    (output / "results.jsonl").write_text(json.dumps(done) + "\n" + torn)
    command = ["--model", "hf", "--model_args", models["llama"], "--tasks", "sb_niah_single_1",
               "--lengths", "1024,2048", "--output", str(output), *FAST]
    assert sweep_command.main(command) == 0
    lines = (output / "results.jsonl").read_text().splitlines()
    assert lines[:2] == [json.dumps(done), torn]  # kept as they were
    (new,) = [json.loads(line) for line in lines[2:]]
    assert (new["length"], "error" in new) == (2048, False)
    hf_line = next(line for line in (output / "summary.md").read_text().splitlines() if line.startswith("| sb_niah_single_1"))
    assert "| 42 |" in hf_line

    # Results made with other settings are not resumed as if they were this run's.
    other = command[:-len(FAST)] + ["--metadata", '{"num_samples": 2}', "--gen_kwargs", "max_gen_toks=4", "--device", "cpu"]
    assert sweep_command.main(other) == 2


def test_only_rank_0_writes(models, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    output = tmp_path / "out"
    command = ["--model", "hf", "--model_args", models["llama"], "--tasks", "sb_niah_single_1",
               "--lengths", "1024", "--output", str(output), *FAST]
    assert sweep_command.main(command) == 0
    assert not output.exists()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--lengths", "2048,4k,abc"], r"--lengths '2048,4k,abc': 'abc' is not a positive number of tokens"),
    (["--lengths", "0"], r"--lengths '0'"),
    (["--compare", "hf"], r"--compare 'hf' must be NAME:ARGS"),
    (["--compare", "nosuchmodel:pretrained=x"], r"model 'nosuchmodel' is not an lm-eval model; valid: sb_hf, .*\bhf\b"),
    (["--metadata", "{num_samples: 1}"], r"--metadata .* is not JSON"),
    (["--metadata", '{"max_seq_lengths": [4096]}'], r"--metadata must not set max_seq_lengths"),
    (["--tasks", "ai2_arc"], r"'ai2_arc' is a tag.*arc_challenge"),
    (["--tasks", "ruler_nia"], r"unknown task 'ruler_nia'\. Did you mean ruler_niah"),
    (["--limit", "-3"], r"--limit '-3'"),
])
def test_argument_errors_name_the_argument_before_any_model_loads(arguments, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "load_model", lambda *args: pytest.fail("a model was loaded"))
    command = {"--model_args": f"pretrained={tmp_path / 'missing'}", "--tasks": "sb_niah_single_1",
               "--lengths": "1024", "--output": str(tmp_path / "out")}
    for name, value in zip(arguments[::2], arguments[1::2]):
        command[name] = value
    assert sweep_command.main([part for pair in command.items() for part in pair]) == 2
    error = capsys.readouterr().err
    assert "sb-eval sweep: error:" in error
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_headline_metric_follows_the_task_authors_contract():
    assert plots.headline_metric({"4096": 87.5, "acc": 0.1}, 4096) == ("4096", 87.5)
    assert plots.headline_metric({"tokens": 4096.0, "nll_4096": 2.31, "acc": 0.1}, 4096) == ("nll_4096", 2.31)
    assert plots.headline_metric({"acc_16": 0.3, "acc": 0.5}, 4096) == ("acc", 0.5)
    assert plots.headline_metric({"exact": 1.0, "acc_norm": 0.4, "acc_16": 0.5}, 4096) == ("acc_norm", 0.4)
    assert plots.headline_metric({"bits_per_byte": 1.1, "word_perplexity": 30.0}, 4096) == ("word_perplexity", 30.0)
    sb_wikitext = {"bits_per_byte_4096": 1.1, "documents_longer_4096": 3, "word_perplexity_4096": 30.0, "acc": 0.5}
    assert plots.headline_metric(sb_wikitext, 4096) == ("word_perplexity_4096", 30.0)
    assert plots.headline_metric({"word_perplexity": 30.0, "acc": 0.5}, 4096) == ("acc", 0.5)
    assert plots.headline_metric({"acc_norm": 0.4, "word_perplexity": 30.0}, 4096) == ("word_perplexity", 30.0)
    assert plots.headline_metric({"exact": 1.0}, 4096) is None


def test_report_shows_each_tasks_headline_latest_outcomes_and_errors(tmp_path):
    def row(task, length, model="sb_hf:pretrained=/m/a", **fields):
        return {"model_spec": model, "model": model.split(":")[0], "task": task, "length": length} | fields

    rows = [
        row("sb_ppl", 2048, metrics={"nll_2048": 2.5, "bytes": 9.0}),
        row("sb_ppl", 4096, error={"type": "OutOfMemoryError", "message": "CUDA out of memory"}),
        row("mqrar", 2048, metrics={"f1": 0.2, "acc": 0.75}),
        row("mqrar", 4096, error={"type": "ValueError", "message": "bad sample"}),
        row("mqrar", 4096, metrics={"acc": 0.5}),  # retried: the result wins
        row("mqrar", 4096, error={"type": "ValueError", "message": "later failure"}, model="hf:pretrained=/m/b"),
        row("ruler_niah", 2048, metrics={"2048": 100.0}, model="hf:pretrained=/m/b"),
    ]
    written = plots.write_report(rows, tmp_path, train_length=2048)
    assert written == [tmp_path / "summary.md", tmp_path / "plots" / "mqrar.png",
                       tmp_path / "plots" / "ruler_niah.png", tmp_path / "plots" / "sb_ppl.png"]
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert any(plots.HEADLINE_RULE in line for line in table)
    assert "| mqrar | sb_hf:a | acc | 0.75 | 0.5 |" in table
    assert "| mqrar | hf:b |  |  | error (ValueError) |" in table
    assert "| sb_ppl | sb_hf:a | nll_<length> | 2.5 | error (OutOfMemoryError) |" in table
    assert "| ruler_niah | hf:b | <length> | 100 |  |" in table
    assert "- sb_ppl, sb_hf:a, 4096: OutOfMemoryError: CUDA out of memory" in table
    assert "bad sample" not in "\n".join(table)
    for path in written[1:]:
        assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_report_says_what_the_lengths_cover(tmp_path):
    """Two models whose tokenizers count the same documents differently: each gets its own
    coverage line, and a length no document is longer than is marked for that model only."""
    def row(model, length, longer, share, longest, perplexity):
        metrics = {f"word_perplexity_{length}": perplexity, f"documents_longer_{length}": longer,
                   f"tokens_in_longer_{length}": share, "longest_document": longest}
        return {"model_spec": f"{model}:pretrained=/m/{model}", "model": model, "task": "sb_wikitext", "length": length, "metrics": metrics}

    rows = [row("sb_hf", 2048, 3, 0.5, 3000, 40.0), row("sb_hf", 4096, 0, 0.0, 3000, 35.0),
            row("hf", 2048, 5, 0.8, 5000, 50.0), row("hf", 4096, 1, 0.3, 5000, 45.0),
            {"model_spec": "hf:pretrained=/m/hf", "model": "hf", "task": "mqrar", "length": 4096, "metrics": {"acc": 0.5}}]
    plots.write_report(rows, tmp_path)
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert "| sb_wikitext | sb_hf:sb_hf | word_perplexity_<length> | 40 | 35 * |" in table
    assert "| sb_wikitext | hf:hf | word_perplexity_<length> | 50 | 45 |" in table
    assert "| mqrar | hf:hf | acc |  | 0.5 |" in table  # a task that does not say is not marked
    assert "| sb_wikitext | sb_hf:sb_hf | 3,000 | 3 (50%) | 0 (0%) * |" in table
    assert "| sb_wikitext | hf:hf | 5,000 | 5 (80%) | 1 (30%) |" in table
    assert not any(line.startswith("| mqrar") and "(" in line for line in table)
    plots.write_report(rows[-1:], tmp_path)
    assert "What the lengths cover" not in (tmp_path / "summary.md").read_text()


def test_model_args_may_be_left_out_for_the_packaged_checkpoint():
    arguments = sweep_command.build_parser().parse_args(["--tasks", "sb_niah_single_1", "--lengths", "1K", "--output", "out"])
    assert (arguments.model, arguments.model_args) == ("sb_hf", "")
