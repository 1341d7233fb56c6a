"""sb-eval report: RULER's report of lm-eval output folders and sweep folders: tables in numeric
order with bootstrap intervals, two models and their paired difference, the effective length,
depth heatmaps, RULER's summary.csv; and on a real lm-eval run."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_ruler_helpers import write_standin_essays
from tiny_models import write_tiny_llama

from sb_eval.commands import report as report_command
from sb_eval.reports import ruler as report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS_DIR = Path(__file__).parents[1] / "tasks"
# In lm-eval's text order, which sorts 16384 before 4096.
LENGTHS = [16384, 32768, 4096, 65536]


def write_lm_eval_folder(folder: Path, model_args: str, scores: dict[str, dict[int, list[float]]], stamp: str = "2026-01-01T00-00-00.000000") -> Path:
    """An lm-eval --output_path folder as lm-eval 0.4 writes it with --log_samples: results and
    samples files of `scores` (task -> length -> per-sample scores), each sample's needle at a
    depth that rises with its index."""
    run = folder / "model"
    run.mkdir(parents=True, exist_ok=True)
    results = {}
    for task, by_length in scores.items():
        entry = {"alias": task}
        lines = []
        for length, values in by_length.items():
            entry[f"{length},none"] = sum(values) / len(values)
            entry[f"{length}_stderr,none"] = 1.0
            for index, value in enumerate(values):
                doc = {"input": f"{task} {length} {index}", "max_length": length, "outputs": ["x"], "length": length - 200,
                       "needle_depths": [100 * index / len(values)], "needle_tokens": [index]}
                lines.append({"doc_id": index, "doc": doc, "filtered_resps": ["" if value == 0 else " x"],
                              "doc_hash": f"{task}-{length}-{index}", str(length): value, "metrics": [str(length)]})
        results[task] = entry
        (run / f"samples_{task}_{stamp}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    document = {"results": results, "group_subtasks": {task: [] for task in scores},
                "config": {"model": "hf", "model_args": model_args}}
    (run / f"results_{stamp}.json").write_text(json.dumps(document))
    return folder


def test_two_models_get_tables_in_numeric_order_with_intervals_and_their_difference(tmp_path):
    rng = random.Random(0)
    strong = {task: {length: [100.0 if rng.random() < 0.95 - length / 200000 else 0.0 for _ in range(40)] for length in LENGTHS}
              for task in ("sb_niah_single_1", "sb_ruler_vt")}
    weak = {task: {length: [0.0 if value == 0 or rng.random() < 0.3 else 100.0 for value in values] for length, values in by_length.items()}
            for task, by_length in strong.items()}
    first = write_lm_eval_folder(tmp_path / "a", "pretrained=/models/strong", strong)
    second = write_lm_eval_folder(tmp_path / "b", "pretrained=/models/weak", weak)
    written = report.write_report([first, second], tmp_path / "out", resamples=200)
    text = (tmp_path / "out" / "report.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", text, flags=re.M)
    assert [int(length) for length, *_ in rows[:4]] == sorted(LENGTHS)
    for length, strong_cell, weak_cell, difference in rows:
        value, low, high = map(float, re.fullmatch(r"([\d.]+) \[([\d.]+), ([\d.]+)\]", strong_cell.strip()).groups())
        assert 0 <= low <= value <= high <= 100
        # Both models answered the same prompts: the difference is resampled in pairs.
        assert difference.strip().endswith("paired") and difference.strip().startswith("-")
    assert "| length | hf:strong | hf:weak | hf:weak - hf:strong |" in text
    assert "average of the tasks present (niah_single_1, vt)" in text
    assert (tmp_path / "out" / "ruler-average.png").read_bytes().startswith(PNG_SIGNATURE)
    assert {path.name for path in written} >= {"depth-niah_single_1-hf_strong.png", "depth-vt-hf_weak.png", "summary-hf_strong-4096.csv"}
    with open(tmp_path / "out" / "summary-hf_weak-4096.csv") as file:
        table = list(csv.reader(file))
    assert table[0] == ["0", "1", "2"] and table[1] == ["Tasks", "niah_single_1", "vt"]
    assert table[2][0] == "Score" and table[3][0] == "Nulls"
    assert table[3][1] == f"{weak['sb_niah_single_1'][4096].count(0.0)}/40"


def test_effective_length_is_the_longest_up_to_which_the_average_stays_above_the_threshold():
    assert report.effective_length({4096: 90.0, 8192: 86.0, 16384: 80.0, 32768: 88.0}, 85.6) == 8192
    assert report.effective_length({4096: 85.6, 8192: 90.0}, 85.6) is None
    assert report.effective_length({16384: 99.0, 4096: 99.0}, 85.6) == 16384


def test_the_report_states_each_models_effective_length(tmp_path):
    scores = {"sb_niah_single_1": {4096: [100.0] * 10, 8192: [100.0] * 9 + [0.0], 16384: [0.0] * 10}}
    folder = write_lm_eval_folder(tmp_path / "a", "pretrained=/m/a", scores)
    report.write_report([folder], tmp_path / "out", threshold=85.6, resamples=50)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "- hf:a: 8192 tokens (8K)" in text
    report.write_report([folder], tmp_path / "strict", threshold=95.0, resamples=50)
    assert "- hf:a: 4096 tokens (4K)" in (tmp_path / "strict" / "report.md").read_text()


def test_a_sweep_folder_gets_intervals_from_lm_evals_standard_errors(tmp_path):
    rows = [
        {"model_spec": "sb_hf:pretrained=/m/sb", "task": "sb_niah_single_1", "length": length,
         "metrics": {str(length): value}, "stderr": {str(length): 5.0}, "samples": 20}
        for length, value in ((8192, 70.0), (4096, 90.0))
    ] + [{"model_spec": "sb_hf:pretrained=/m/sb", "task": "sb_ruler_vt", "length": 4096, "error": {"type": "OutOfMemoryError"}}]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    report.write_report([tmp_path / "sweep"], tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| 4096 | 90.0 [80.2, 99.8] (n) |" in text and "| 8192 | 70.0 [60.2, 79.8] (n) |" in text
    assert "sb_ruler_vt" not in text  # an error row has no score


def test_folders_without_ruler_results_and_bad_arguments_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_command.main([str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 2
    assert "holds neither results_*.json (lm-eval --output_path) nor results.jsonl (sb-eval sweep)" in capsys.readouterr().err
    assert report_command.main([str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_command.main([str(tmp_path), "--output", str(tmp_path / "out"), "--threshold", "120"])
    assert "'120' is not a score from 0 to 100" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert (report_command.DEFAULT_THRESHOLD, report_command.DEFAULT_RESAMPLES) == (report.DEFAULT_THRESHOLD, report.DEFAULT_RESAMPLES)


def test_the_report_reads_a_real_lm_eval_run(tmp_path):
    """lm-eval with --log_samples on two RULER tasks at two lengths, then sb-eval report on its folder."""
    data = tmp_path / "data"
    write_standin_essays(data)
    checkpoint = write_tiny_llama(
        tmp_path / "checkpoint", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
    )
    output = tmp_path / "results"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={checkpoint}",
        "--tasks", "sb_niah_single_1,sb_niah_multikey_3", "--include_path", str(TASKS_DIR), "--device", "cpu",
        "--batch_size", "8", "--gen_kwargs", "max_gen_toks=4",
        "--metadata", json.dumps({"max_seq_lengths": [4096, 2048], "num_samples": 3}),
        "--output_path", str(output), "--log_samples",
    ]
    # run outside the repository, whose own sb_eval/ folder would shadow the installed package
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path,
                         env=os.environ | {"TOKENIZERS_PARALLELISM": "false", "SB_EVAL_DATA_DIR": str(data)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert report_command.main([str(output), "--output", str(tmp_path / "report"), "--bootstrap", "100"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"`hf:pretrained={checkpoint}`" in text
    for task in ("sb_niah_single_1", "sb_niah_multikey_3"):
        section = text.split(f"### {task}")[1].split("###")[0]
        assert section.index("| 2048 |") < section.index("| 4096 |")
    assert "| niah_single_1 |" in text.split("## Accuracy by depth")[1]
    label = "hf_checkpoint"
    assert (tmp_path / "report" / f"depth-niah_multikey_3-{label}.png").read_bytes().startswith(PNG_SIGNATURE)
    with open(tmp_path / "report" / f"summary-{label}-2048.csv") as file:
        assert list(csv.reader(file))[1] == ["Tasks", "niah_multikey_3", "niah_single_1"]
