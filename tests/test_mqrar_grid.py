"""scripts/mqrar_grid.py end to end on a tiny grid (CPU, torch backend): train, an interrupted
grid resumed to the same results, the report (checkpoints, docs/mqrar-grid.json with the earlier
grids' rows kept, the plot), and the choice of runs that fit the time."""

import array
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sb_eval.model.modeling import StickBreakingForCausalLM

SCRIPT = Path(__file__).parents[1] / "scripts" / "mqrar_grid.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("mqrar_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses and its data processes look it up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def train_args(folder: Path) -> list[str]:
    return [
        "train", "--output", str(folder / "out"), "--state", str(folder / "state"), "--time-limit", "3000",
        "--steps", "6", "--batch-size", "4", "--pool-size", "16", "--eval-sequences", "8", "--eval-every", "3",
        "--save-every", "2", "--seq-length", "32", "--hidden", "32", "--heads", "2", "--num-keys", "16",
        "--num-values", "16", "--pairs", "8", "--control-pairs", "4", "--device", "cpu",
        "--attention-backend", "torch", "--max-stack", "4", "--workers", "2", "--part-size", "8",
        "--timing-steps", "1", "--save-models", "8",
    ]


def results(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "out" / "results.jsonl").read_text().splitlines()]
    return [{key: value for key, value in row.items() if key != "elapsed_s"} for row in rows]


def test_an_interrupted_grid_resumes_to_the_results_of_an_uninterrupted_one(grid, tmp_path, monkeypatch):
    grid.main(train_args(tmp_path / "whole"))
    plan = json.loads((tmp_path / "whole" / "out" / "plan.json").read_text())
    assert len(plan["kept"]) == len(grid.plan([8], [4])) and plan["left_out"] == []
    assert set(plan["timings"]) == {"softmax", "stickbreaking", "stickbreaking+offsets"}  # each kind timed as itself
    rows = results(tmp_path / "whole")
    assert {row["step"] for row in rows} == {3, 6} and len(rows) == 2 * len(plan["kept"])
    assert all(0 <= row["eval_accuracy"] <= 1 and row["eval_positions"] > 0 for row in rows)
    # by how far back the answer lies: every held-out query in one bin, none before its assignment
    assert all(sum(row["eval_positions_by_distance"].values()) == row["eval_positions"] for row in rows)
    assert all(set(row["eval_accuracy_by_distance"]) == set(row["eval_positions_by_distance"]) <= {"2", "4", "8", "16"} for row in rows)

    # the clock passes --time-limit after the 4th training step (the timing's steps not counted)
    clock = {"training": False, "steps": 0, "late": False}
    stacks = len(grid.stacks_of(grid.plan([8], [4]), 4))
    real_monotonic, real_time_stacks, real_build_stack = grid.time.monotonic, grid.time_stacks, grid.build_stack

    def time_stacks(*args, **kwargs):
        timed = real_time_stacks(*args, **kwargs)
        clock["training"] = True
        return timed

    def build_stack(*args, **kwargs):
        trainer, sources, most = real_build_stack(*args, **kwargs)
        step = trainer.step

        def counted(*step_args):
            if clock["training"]:
                clock["steps"] += 1
                clock["late"] = clock["late"] or clock["steps"] >= 4 * stacks
            return step(*step_args)

        trainer.step = counted
        return trainer, sources, most

    monkeypatch.setattr(grid, "time_stacks", time_stacks)
    monkeypatch.setattr(grid, "build_stack", build_stack)
    monkeypatch.setattr(grid.time, "monotonic", lambda: real_monotonic() + (1e6 if clock["late"] else 0))
    grid.main(train_args(tmp_path / "parts"))
    stopped = results(tmp_path / "parts")
    assert {row["step"] for row in stopped} == {3, 4} and all(row.get("interrupted") for row in stopped if row["step"] == 4)
    assert list((tmp_path / "parts" / "out").glob("models-*.pt"))  # what there is comes back
    monkeypatch.undo()
    monkeypatch.setattr(grid, "make_data", lambda *args: pytest.fail("the data were made again"))
    grid.main(train_args(tmp_path / "parts"))  # the same command again: goes on from step 4, on the stored data
    assert results(tmp_path / "parts") == rows
    # the finished grid again, into an empty --output (as a device's fresh output folder): its whole history comes back
    again = train_args(tmp_path / "parts")
    again[again.index("--output") + 1] = str(tmp_path / "again" / "out")
    grid.main(again)
    assert results(tmp_path / "again") == rows
    monkeypatch.undo()

    # another grid in the same state folder is refused
    with pytest.raises(SystemExit, match="holds a grid of other settings"):
        grid.main([*train_args(tmp_path / "parts"), "--batch-size", "2"])


def test_the_data_kept_in_the_state_are_made_again_for_other_data_settings(grid, tmp_path, monkeypatch):
    args = grid.parse_args(train_args(tmp_path))
    vocabulary = grid.mqrar.Vocabulary(args.num_keys, args.num_values)
    cell = ("mqar", 4)
    first = grid.stored_data([cell], vocabulary, args)[cell]
    assert (tmp_path / "state" / "data-mqar-4.pt").is_file()
    with monkeypatch.context() as patched:
        patched.setattr(grid, "make_data", lambda *arguments: pytest.fail("the data were made again"))
        kept = grid.stored_data([cell], vocabulary, args)[cell]
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    args.data_seed += 1
    other = grid.stored_data([cell], vocabulary, args)[cell]
    assert not torch.equal(other[0], first[0])
    assert torch.equal(grid.stored_data([cell], vocabulary, args)[cell][0], other[0])


def test_the_report_writes_checkpoints_the_grid_file_and_the_plot(grid, tmp_path):
    grid.main(train_args(tmp_path))
    # a second command of the same grid: softmax at another learning rate, with RoPE and with learnt positions
    grid.main([*train_args(tmp_path / "second"), "--learning-rates", "0.003", "--attentions", "softmax", "--positions", "both"])
    folders = [str(tmp_path / "out"), str(tmp_path / "second" / "out")]
    docs = tmp_path / "docs"
    docs.mkdir()
    earlier = {"grid": "dense", "attention": "softmax", "offsets": None, "model": "softmax", "task": "mqrar",
               "layout": "dense", "pairs": 32, "lr": 1e-4, "seed": 0, "steps": 1200, "accuracy": 0.04}
    longer = {**earlier, "grid": "power-law, 99 steps of 4", "layout": "power-law"}
    name = "power-law, 6 steps of 4, 2 layers x 32 with 2 heads, 32 tokens, a pool of 16"  # the tiny grid is not the paper's size
    (docs / "mqrar-grid.json").write_text(json.dumps([earlier, {**longer, "grid": name}, longer]))
    grid.main(["report", "--runs", *folders, "--docs", str(docs), "--models", str(tmp_path / "models"), "--harness-samples", "0"])
    rows = json.loads((docs / "mqrar-grid.json").read_text())
    assert rows[:2] == [earlier, longer]  # other grids kept (another budget too)
    stale = {**longer, "grid": name}  # a run of this grid that this report does not make again stays
    assert stale in rows[2:]
    ours = [row for row in rows[2:] if row != stale]
    kept = [json.loads((Path(folder) / "plan.json").read_text())["kept"] for folder in folders]
    assert len(kept[1]) == 4 and {run["lr"] for run in kept[1]} == {0.003}
    assert len(ours) == len(kept[0]) + len(kept[1]) and all(row["grid"] == name and row["steps"] == 6 for row in ours)
    assert not any(row.get("interrupted") for row in ours)
    assert len({(row["model"], row["task"], row["pairs"], row["lr"], row["seed"]) for row in ours}) == len(ours)  # each run once
    assert {row["model"] for row in ours} == {"softmax", "softmax+positions", "stickbreaking", "stickbreaking+offsets"}
    assert sum(row["model"] == "softmax" and row["lr"] == 0.003 for row in ours) == 2
    assert [row["learnt_positions"] for row in ours].count(True) == 2 == sum(row["model"] == "softmax+positions" for row in ours)
    assert (docs / "mqrar.png").read_bytes()[:4] == b"\x89PNG"
    # the plot sets this grid beside other grids of its size only (rows without a size are the paper's)
    tiny = {"layers": 2, "hidden": 32, "heads": 2, "seq_length": 32}
    assert all({key: row[key] for key in tiny} == tiny for row in ours)
    assert grid.of_the_same_shape(rows, tiny) == ours
    assert grid.of_the_same_shape(rows, {"layers": 2, "hidden": 256, "heads": 1, "seq_length": 768}) == [earlier, longer, stale]
    # a report without scoring keeps the lm-eval scores the grid file has for this grid's runs, and
    # replaces the rows of the runs it reports (rows from before the card was recorded with them)
    scored = {**ours[0], "harness_accuracy": 0.75}
    uncarded = {key: value for key, value in ours[1].items() if key != "device"} | {"accuracy": 0.125}
    (docs / "mqrar-grid.json").write_text(json.dumps([{**longer, "harness_accuracy": 0.5}, scored, uncarded, *ours[2:]]))
    grid.main(["report", "--runs", *folders, "--docs", str(docs), "--models", str(tmp_path / "models"), "--harness-samples", "0"])
    again = json.loads((docs / "mqrar-grid.json").read_text())
    assert again[1:] == [scored, *ours[1:]] and again[0]["harness_accuracy"] == 0.5
    # this grid's runs from another card stay beside this card's, and their scores stay theirs
    assert {row["device"] for row in ours} == {"cpu"}
    elsewhere = {**ours[0], "device": "NVIDIA H200", "accuracy": 0.5, "harness_accuracy": 0.25}
    (docs / "mqrar-grid.json").write_text(json.dumps([*ours, elsewhere]))
    grid.main(["report", "--runs", *folders, "--docs", str(docs), "--models", str(tmp_path / "models"), "--harness-samples", "0"])
    assert json.loads((docs / "mqrar-grid.json").read_text()) == [elsewhere, *ours]

    # the best softmax and stick-breaking model of each MQRAR cell of each folder, as checkpoints lm-eval loads
    # (softmax with learnt positions has no such checkpoint)
    names = sorted(path.name for path in (tmp_path / "models").iterdir())
    assert len(names) == 3 and all("-mqrar-kv8-" in name and "offsets" not in name for name in names)
    assert sum(name.startswith("softmax") and "-lr3.00e-03-" in name for name in names) == 1
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / name)
        assert isinstance(model, StickBreakingForCausalLM) == name.startswith("stickbreaking")
        assert model.config.vocab_size == 33
    payload = torch.load(sorted((tmp_path / "out").glob("models-*.pt"))[0], weights_only=False)
    assert all(weight.dtype == torch.bfloat16 for entry in payload.values() for weight in entry["weights"].values())

    # a folder given twice, and folders of other settings, are refused
    report = ["--docs", str(docs), "--models", str(tmp_path / "models"), "--harness-samples", "0"]
    with pytest.raises(SystemExit, match="is in both"):
        grid.main(["report", "--runs", folders[0], folders[0], *report])
    plan = json.loads((Path(folders[1]) / "plan.json").read_text())
    plan["settings"]["steps"] = 7
    (Path(folders[1]) / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(SystemExit, match=r"other settings \(steps\)"):
        grid.main(["report", "--runs", *folders, *report])

    # a command killed after its step-3 evaluation: its runs' rows say so, though no evaluation was cut short
    history = Path(folders[0]) / "results.jsonl"
    history.write_text("".join(line + "\n" for line in history.read_text().splitlines() if json.loads(line)["step"] == 3))
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "mqrar-grid.json").write_text("[]")
    grid.main(["report", "--runs", folders[0], "--docs", str(killed), "--models", str(tmp_path / "models"), "--harness-samples", "0"])
    rows = json.loads((killed / "mqrar-grid.json").read_text())
    assert len(rows) == len(kept[0]) and all(row["steps"] == 3 and row["interrupted"] for row in rows)


def test_the_runs_kept_are_the_longest_prefix_that_fits(grid):
    runs = grid.plan()
    assert runs[0] == grid.GridRun("softmax", "mqar", 32, grid.LR_MAIN)  # the control first
    assert {run.cell for run in runs[2:10]} == {(a, "mqrar", p) for a in grid.ATTENTIONS for p in grid.PAIRS}

    def step_seconds(model, models):
        return 0.01 + {"softmax": 0.002, "stickbreaking": 0.003, "stickbreaking+offsets": 0.018}[model] * models

    def cost(kept):
        return 1000 * sum(step_seconds(model, len(stack)) for model, stack in grid.stacks_of(kept, 8))

    costs = [cost(runs[:count]) for count in range(1, len(runs) + 1)]
    assert costs == sorted(costs)  # a longer prefix never costs less
    assert grid.fit_prefix(runs, step_seconds, 1000, budget_s=costs[9] + 0.1, max_stack=8) == runs[:10]
    assert grid.fit_prefix(runs, step_seconds, 1000, budget_s=costs[-1], max_stack=8) == runs
    assert grid.fit_prefix(runs, step_seconds, 1000, budget_s=5.0, max_stack=8) == []
    # a stack holds one kind of model, and is projected at that kind's step time
    stacks = grid.stacks_of(runs, 8)
    assert [(model, len(stack)) for model, stack in stacks] == [
        ("softmax", 6), ("softmax", 6), ("softmax", 6), ("stickbreaking", 8), ("stickbreaking", 8), ("stickbreaking+offsets", 4)]
    assert all(run.model == model for model, stack in stacks for run in stack)
    assert grid.projected_seconds(runs, step_seconds, 1000, 8) == pytest.approx(1000 * (
        3 * (0.01 + 6 * 0.002) + 2 * (0.01 + 8 * 0.003) + 0.01 + 4 * 0.018))


def test_plan_seconds_keep_runs_for_more_calls_than_one(grid, tmp_path, monkeypatch):
    """A plan longer than one call's --time-limit is refused without --plan-seconds and kept in
    full with it (each call then stops at its --time-limit, as the resume test shows)."""
    def slow_timing(runs, *args):
        return (lambda attention, models: 100.0), {"softmax": "100 s a step"}

    monkeypatch.setattr(grid, "time_stacks", slow_timing)
    args = train_args(tmp_path)
    args[args.index("--time-limit") + 1] = "300"
    with pytest.raises(SystemExit, match=r"fits the \d+ s left of --time-limit"):
        grid.main(args)
    assert not (tmp_path / "state" / "plan.json").exists()
    everything = len(grid.stacks_of(grid.plan([8], [4]), 4)) * 6 * 100.0
    with pytest.raises(SystemExit, match="fits the 500 s of --plan-seconds"):
        grid.main([*args, "--plan-seconds", "500"])
    grid.main([*args, "--plan-seconds", str(everything)])
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert len(plan["kept"]) == len(grid.plan([8], [4])) and plan["budget_s"] == everything


def test_a_grid_at_given_rates_makes_the_runs_asked_for(grid, capsys):
    both = grid.plan_at([1e-3], ["softmax", "stickbreaking"], pairs=[64], control_pairs=[], offsets="both")
    assert both == [grid.GridRun("softmax", "mqrar", 64, 1e-3), grid.GridRun("stickbreaking", "mqrar", 64, 1e-3),
                    grid.GridRun("stickbreaking", "mqrar", 64, 1e-3, offsets=True)]
    control = grid.plan_at([1e-3, 1e-4], ["softmax"], pairs=[], control_pairs=[32, 64], seeds=[0, 1])
    assert [(run.lr, run.seed, run.pairs) for run in control] == [
        (1e-3, 0, 32), (1e-3, 0, 64), (1e-3, 1, 32), (1e-3, 1, 64), (1e-4, 0, 32), (1e-4, 0, 64), (1e-4, 1, 32), (1e-4, 1, 64)]
    assert all(run.task == "mqar" for run in control)
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--learning-rates", "1e-3", "--pairs", "--control-pairs", "32"])
    assert args.pairs == [] and args.attentions == list(grid.ATTENTIONS) and args.offsets == "without" and args.seeds == [0]
    assert args.positions == "rope"
    positions = grid.plan_at([1e-3], ["softmax", "stickbreaking"], pairs=[], control_pairs=[32], positions="both")
    assert positions == [grid.GridRun("softmax", "mqar", 32, 1e-3), grid.GridRun("softmax", "mqar", 32, 1e-3, learnt_positions=True),
                         grid.GridRun("stickbreaking", "mqar", 32, 1e-3)]
    assert positions[1].name == "softmax+positions-mqar-kv32-lr1.00e-03-s0"
    # a stack has one kind of position encoding
    assert [[run.learnt_positions for run in stack] for _, stack in grid.stacks_of(positions, 8)] == [[False], [True], [False]]
    for wrong, message in ((["--offsets", "both", "--seeds", "1"], "--offsets and --seeds choose the runs of --learning-rates"),
                           (["--positions", "learnt"], "--positions choose the runs of --learning-rates"),
                           (["--learning-rates", "1e-3", "--attentions", "stickbreaking", "--positions", "learnt"],
                            "--positions chooses softmax runs, and --attentions stickbreaking has none"),
                           (["--learning-rates", "1e-3", "--seeds", "1", "1"], "must be distinct"),
                           (["--learning-rates", "1e-3", "--pairs", "--control-pairs"], "both empty"),
                           (["--dropout", "0.1"], "--dropout applies to softmax only"),
                           (["--learning-rates", "1e-3", "--attentions", "softmax", "--dropout", "1"], "--dropout must be a probability"),
                           (["--plan-seconds", "0"], "--plan-seconds must be > 0")):
        with pytest.raises(SystemExit):
            grid.parse_args(["train", "--output", "out", "--device", "cpu", *wrong])
        assert message in capsys.readouterr().err


def test_a_grid_trained_otherwise_keeps_its_own_name(grid):
    """Rows of a grid with another pool, warm-up, dropout or precision must not replace those of the same
    budget without them in docs/mqrar-grid.json; a grid of the defaults keeps its old name."""
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--steps", "16000"])
    assert "dropout" not in grid.train_settings(args)
    assert grid.grid_name(grid.train_settings(args)) == "power-law, 16000 steps of 64"
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--steps", "16000", "--pool-size", "1024000",
                            "--learning-rates", "1e-3", "--attentions", "softmax", "--dropout", "0.1"])
    assert grid.grid_name(grid.train_settings(args)) == "power-law, 16000 steps of 64, a pool of 1024000, dropout 0.1"
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--steps", "16000", "--warmup-steps", "1000"])
    assert grid.grid_name(grid.train_settings(args)) == "power-law, 16000 steps of 64, 1000 steps of warm-up"
    assert "precision" not in grid.train_settings(args)
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--steps", "8000", "--precision", "fp32"])
    assert grid.grid_name(grid.train_settings(args)) == "power-law, 8000 steps of 64, fp32"
    assert "control_filler" not in grid.train_settings(args)
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--steps", "8000", "--control-filler", "constant"])
    assert grid.grid_name(grid.train_settings(args)) == "power-law, 8000 steps of 64, the control's filler constant"


def test_the_controls_filler_reaches_its_data_and_only_its_data(grid):
    vocabulary = grid.mqrar.Vocabulary(16, 16)
    filler = vocabulary.value_id(grid.mqrar.CONSTANT_FILLER_VALUE)
    inputs, _ = grid._make_part("mqar", 4, 0, 0, 3, 32, vocabulary, "constant")
    rows = array.array("h", inputs).tolist()
    assert len(rows) == 3 * 32 and sum(token == filler for token in rows) == 3 * (32 - 8 - 4)  # all but assignments and queries
    args = grid.parse_args(["train", "--output", "out", "--device", "cpu", "--control-filler", "constant", "--pairs", "8",
                            "--control-pairs", "4", "--seq-length", "32", "--num-keys", "16", "--num-values", "16",
                            "--pool-size", "8", "--eval-sequences", "8", "--batch-size", "4", "--workers", "1", "--part-size", "8"])
    data = grid.make_data([("mqar", 4), ("mqrar", 8)], vocabulary, args)
    assert (data[("mqar", 4)][0] == filler).sum() == 8 * (32 - 8 - 4)
    assert (data[("mqrar", 8)][0] == filler).sum() < 8 * (32 - 16 - 8)  # MQRAR keeps its random values
