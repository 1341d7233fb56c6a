"""The stock `lm_eval` command with sb-eval installed: sb_hf and our tasks without --include_path,
lm-eval's own models and tasks untouched, and `sb-eval run` as the same command.

These run the console scripts of the environment, so they need sb-eval installed the way users
install it (`pip install .`): an editable install does not carry the start-up hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_ruler_helpers import write_standin_essays

from sb_eval.model.saving import write_random_checkpoint

HOOK = Path(sysconfig.get_paths()["purelib"]) / "sb_eval_hook.pth"


@pytest.fixture(scope="module", autouse=True)
def hook_installed():
    if not HOOK.is_file():
        pytest.fail(f"{HOOK} is missing: install sb-eval with `pip install .` (editable installs "
                    "do not carry lm-eval's start-up hook)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("sb") / "ckpt", seed=11)


def run(command: list[str], cwd: Path, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false"}
    if data_dir is not None:
        env["SB_EVAL_DATA_DIR"] = str(data_dir)
    # a neutral working directory: the repository's own sb_eval/ folder must not shadow the install
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)


def script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_registry_has_sb_hf_beside_lm_evals_models_and_tasks(tmp_path):
    code = (
        "from lm_eval.api.registry import get_model\n"
        "from lm_eval.tasks import TaskManager\n"
        "print(get_model('sb_hf').__name__, get_model('hf').__name__)\n"
        "tasks = set(TaskManager().all_tasks)\n"
        "print('ruler_niah' in tasks, 'sb_ruler_vt' in tasks, 'hellaswag' in tasks, 'niah_single_1' in tasks)\n"
    )
    result = run([sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["StickBreakingLM", "HFLM", "True", "True", "True", "True"]


@pytest.mark.parametrize("command", ["lm_eval", "sb-eval run"])
def test_stock_command_evaluates_sb_hf_on_our_task(command, checkpoint, tmp_path):
    write_standin_essays(tmp_path / "data")
    output = tmp_path / "results"
    program = [script("lm_eval")] if command == "lm_eval" else [script("sb-eval"), "run"]
    result = run(program + [
        "--model", "sb_hf", "--model_args", f"pretrained={checkpoint},attention_backend=torch",
        "--tasks", "ruler_niah" if command == "lm_eval" else "sb_niah_single_1",
        # Byte tokens: RULER's 500-word essay steps do not fit these lengths, so the samples fill.
        "--metadata", json.dumps({"max_seq_lengths": [1024, 2048], "num_samples": 1, "sizing": "fill"}),
        "--device", "cpu", "--batch_size", "4", "--output_path", str(output),
    ], tmp_path, data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr[-3000:]
    (results_file,) = output.glob("**/results_*.json")
    report = json.loads(results_file.read_text())
    task = "ruler_niah" if command == "lm_eval" else "sb_niah_single_1"
    for length in ("1024", "2048"):
        assert 0.0 <= report["results"][task][f"{length},none"] <= 100.0
    assert report["config"]["model"] == "sb_hf"
    assert "sb_attention_backend" in json.dumps(report)
