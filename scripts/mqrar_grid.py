"""The paper's MQRAR experiment (Figure 3) and its MQAR control as one GPU job: stick-breaking
against softmax + RoPE as the number of key-value pairs grows, the best learning rate per cell.

    python scripts/mqrar_grid.py train --output $OUT/mqrar --time-limit 510
    python scripts/mqrar_grid.py report --runs FOLDER [FOLDER ...] --harness-samples 50

`train` (one GPU, no lm-eval needed): the runs of the plan share one process. The runs of one
attention are stacked into one model with a leading model axis (sb_eval.training.stacked; at most
--max-stack a stack), and the stacks take their steps in turn, so every run advances together.
The data (the paper's 100,000 training sequences per cell and held-out ones) are made first, in
as many processes as there are CPUs. Then it times a few steps of each attention, keeps the
longest prefix of the plan (in priority order, `plan()`; or, with --learning-rates, the runs that
--attentions, --offsets, --positions, --seeds, --pairs and --control-pairs name, `plan_at()`) that fits
--time-limit (or --plan-seconds of training, for a grid that takes several calls of the same
command), and trains those runs to the end. Into --output (5 files with the defaults, none over 16 MiB, so that they come
back from a device machine):

- plan.json: settings, the plan, the runs kept, the timings and the projection;
- results.jsonl: one row per run and evaluation (step, train loss, held-out loss and accuracy,
  and accuracy by how far back the answer lies, in power-of-two bins of tokens);
- models-N.pt: the best softmax and stick-breaking run of each MQRAR pair count in --save-models,
  two a file (bf16 weights).

Should the projection be wrong and the time run out, the runs are evaluated where they stand
(rows marked "interrupted") and their models saved as they are; the report marks as interrupted
every run whose last evaluation comes before its last step, a killed command's too. The
resumable state (large: the models, their optimisers and the data) goes to --state: rerunning the
same command continues where the last one stopped (by --time-limit or a kill) and redoes
nothing, the data included; its --output then holds the whole history, also where it was a
fresh folder.

`report` (CPU): from one or more train folders (runs of one grid made by several commands, e.g.
at other learning rates), writes the saved models as checkpoints (`sb_hf` loads the
stick-breaking ones, lm-eval's `hf` the softmax ones) into --models, scores them with lm-eval's
`mqrar` task (--harness-samples sequences each; 0 skips it), and writes docs/mqrar-grid.json
(every run of this grid beside the rows of other grids, which it keeps: the first, dense grid and
power-law grids of other budgets; a run not scored now keeps the score the file has for it) and
docs/mqrar.png.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import subprocess
import sys
import textwrap
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's sb_eval, wherever the command runs from

from sb_eval.files import write_atomically  # noqa: E402
from sb_eval.ruler import mqrar  # noqa: E402

# From the paper's grid (1e-4, 10^(-10/3), 10^(-8/3), 1e-2); docs/mqrar.md has the evidence.
LR_MAIN = 10 ** (-10 / 3)
LR_SECOND = 10 ** (-8 / 3)
LR_HIGH = 1e-2
PAIRS = (32, 64, 128, 192)
CONTROL_PAIRS = (32, 64)
# The paper's code trains on 100,000 sequences per cell.
DEFAULT_POOL_SIZE = 100_000
# Figure 3's models and sequences: the settings a grid of another shape names.
PAPER_SHAPE = {"layers": 2, "hidden": 256, "heads": 1, "seq_length": mqrar.PAPER_SEQ_LENGTH}
# The settings the data are made from: part of a grid's settings; stored data made with others are made again.
DATA_SETTINGS = ("pool_size", "eval_sequences", "seq_length", "num_keys", "num_values", "data_seed")
# Stick-breaking's initial logit offset where a run asks for one (every head, every layer): a
# break probability of sigmoid(-5) = 0.7% a token, so that a fresh head reaches ~150 tokens back
# instead of 1-2 (trainer.offset_attention_logits says why).
OFFSETS = (-5.0, -5.0)
ATTENTIONS = ("softmax", "stickbreaking")
LABELS = {"softmax": "softmax + RoPE", "softmax+positions": "softmax + learnt positions", "stickbreaking": "stick-breaking",
          "stickbreaking+offsets": "stick-breaking + logit offsets"}
MODELS_PER_FILE = 2


@dataclass(frozen=True)
class GridRun:
    """One training run: attention, task ("mqrar" or the "mqar" control), pairs, peak learning
    rate, seed (initialisation and batch order), for stick-breaking whether it starts with logit
    offsets, and for softmax whether it has learnt absolute positions (the paper's code) instead of
    RoPE."""

    attention: str
    task: str
    pairs: int
    lr: float
    seed: int = 0
    offsets: bool = False
    learnt_positions: bool = False

    @classmethod
    def from_row(cls, row: dict) -> GridRun:
        """The run a results row (its fields among others) was made by; rows written before
        learnt_positions existed are RoPE runs."""
        return cls(**{field: row[field] for field in cls.__dataclass_fields__ if field != "learnt_positions"},
                   learnt_positions=row.get("learnt_positions", False))

    @property
    def model(self) -> str:
        return self.attention + ("+offsets" if self.offsets else "") + ("+positions" if self.learnt_positions else "")

    @property
    def cell(self) -> tuple[str, str, int]:
        return self.model, self.task, self.pairs

    @property
    def name(self) -> str:
        return f"{self.model}-{self.task}-kv{self.pairs}-lr{self.lr:.2e}-s{self.seed}"


def plan_at(learning_rates: list[float], attentions: list[str], pairs=PAIRS, control_pairs=CONTROL_PAIRS,
            offsets: str = "without", seeds=(0,), positions: str = "rope") -> list[GridRun]:
    """A grid at the given learning rates and seeds (in order, each seed of a rate in turn) for the
    given attentions: at each the control, then MQRAR at every pair count. Stick-breaking runs
    without logit offsets (the paper's model), with them, or both (offsets "without", "with",
    "both"; both: each run without, then with); softmax with RoPE (the paper's text), learnt
    absolute positions (the paper's code), or both (positions "rope", "learnt", "both")."""
    choices = {"without": (False,), "with": (True,), "both": (False, True), "rope": (False,), "learnt": (True,)}
    variants = {"softmax": [(False, learnt) for learnt in choices[positions]],
                "stickbreaking": [(offset, False) for offset in choices[offsets]]}
    runs = []
    for lr in learning_rates:
        for seed in seeds:
            runs += [GridRun(attention, "mqar", count, lr, seed, offset, learnt)
                     for attention in attentions for count in control_pairs for offset, learnt in variants[attention]]
            runs += [GridRun(attention, "mqrar", count, lr, seed, offset, learnt)
                     for count in pairs for attention in attentions for offset, learnt in variants[attention]]
    return runs


def plan(pairs=PAIRS, control_pairs=CONTROL_PAIRS) -> list[GridRun]:
    """Every run this grid would make with unlimited time, most important first (what --time-limit
    keeps is a prefix). Learning rates from the paper's grid, chosen from the evidence in
    docs/mqrar.md: 10^(-10/3) first (the first grid's best at this width, where stick-breaking
    learnt), then 10^(-8/3) (the rate nearest the best at hidden 64; first for the control), 1e-2
    last."""
    runs = [GridRun("softmax", "mqar", count, LR_MAIN) for count in control_pairs]  # the control first
    runs += [GridRun(attention, "mqrar", count, LR_MAIN) for count in pairs for attention in ATTENTIONS]
    runs += [GridRun("softmax", "mqar", count, LR_SECOND) for count in control_pairs]
    runs += [GridRun("stickbreaking", "mqrar", count, LR_MAIN, offsets=True) for count in reversed(pairs)]  # longest reach first
    runs += [GridRun(attention, "mqrar", count, LR_SECOND) for count in pairs for attention in ATTENTIONS]
    runs += [GridRun(attention, "mqrar", count, LR_MAIN, seed=1) for count in pairs[-2:] for attention in ATTENTIONS]
    runs += [GridRun("stickbreaking", "mqar", count, LR_MAIN) for count in control_pairs]
    runs += [GridRun(attention, "mqrar", count, LR_HIGH) for count in pairs for attention in ATTENTIONS]
    return runs


def fit_prefix(runs: list[GridRun], step_seconds, steps: int, budget_s: float, max_stack: int) -> list[GridRun]:
    """The longest prefix of `runs` whose projected training time, steps x the sum over its stacks
    of step_seconds(model kind, models in the stack), is within budget_s (possibly empty)."""
    kept: list[GridRun] = []
    for run in runs:
        if projected_seconds(kept + [run], step_seconds, steps, max_stack) > budget_s:
            break
        kept.append(run)
    return kept


def projected_seconds(runs: list[GridRun], step_seconds, steps: int, max_stack: int) -> float:
    return steps * sum(step_seconds(model, len(stack)) for model, stack in stacks_of(runs, max_stack))


def stacks_of(runs: list[GridRun], max_stack: int) -> list[tuple[str, list[GridRun]]]:
    """(model kind, runs) for the runs of each model kind (`GridRun.model`: the attention, and
    whether with logit offsets or learnt positions) in stacks of at most max_stack, as even as can
    be. A stack holds one kind: one position encoding, and one step time to time and project
    (stick-breaking with offsets takes several times as long a step: its heads skip fewer blocks)."""
    stacks = []
    for model, same in runs_by_model(runs).items():
        count = math.ceil(len(same) / max_stack)
        stacks += [(model, same[index::count]) for index in range(count)]
    return stacks


def runs_by_model(runs: list[GridRun]) -> dict[str, list[GridRun]]:
    """The runs of each model kind, in plan order, the kinds sorted: softmax, its variant,
    stick-breaking, its variant."""
    return {model: [run for run in runs if run.model == model] for model in sorted({run.model for run in runs})}


# ---------------------------------------------------------------------------------------------
# train


def train(args: argparse.Namespace) -> None:
    import torch

    from sb_eval.tokenization import word_level_tokenizer
    from sb_eval.training.trainer import ModelSize

    started = time.monotonic()
    deadline = started + args.time_limit
    args.output.mkdir(parents=True, exist_ok=True)
    args.state.mkdir(parents=True, exist_ok=True)
    vocabulary = mqrar.Vocabulary(args.num_keys, args.num_values)
    for count in set(args.pairs) | set(args.control_pairs):
        mqrar.check_settings(args.seq_length, count, vocabulary, "mqar", filler=args.control_filler)  # the stricter of the two tasks
    tokenizer = word_level_tokenizer(vocabulary.symbols)
    size = ModelSize(args.layers, args.hidden, args.heads, len(tokenizer), args.seq_length)
    settings = train_settings(args)
    if args.learning_rates:
        candidates = plan_at(args.learning_rates, args.attentions, args.pairs, args.control_pairs, args.offsets, args.seeds,
                             args.positions)
    else:
        candidates = plan(args.pairs, args.control_pairs)
    saved_plan = _read_json(args.state / "plan.json")
    if saved_plan is not None and saved_plan["settings"] != settings:
        raise SystemExit(f"{args.state} holds a grid of other settings; give another --state or delete it")

    cells = sorted({(run.task, run.pairs) for run in candidates})
    data = stored_data(cells, vocabulary, args)  # before CUDA starts: the workers fork
    device = torch.device(args.device)
    pools = {cell: tuple(tensor.to(device) for tensor in tensors) for cell, tensors in data.items()}

    if saved_plan is None:
        step_seconds, timings = time_stacks(candidates, pools, size, args)
        if args.plan_seconds is None:
            budget, source = deadline - time.monotonic() - args.reserve, "left of --time-limit"
        else:
            budget, source = args.plan_seconds, "of --plan-seconds"
        kept = fit_prefix(candidates, step_seconds, args.steps, budget, args.max_stack)
        if not kept:
            raise SystemExit(f"not one run of {args.steps} steps fits the {budget:.0f} s {source}; timings: {timings}")
        saved_plan = {
            "settings": settings, "device": _device_name(device), "timings": timings,
            "projected_s": projected_seconds(kept, step_seconds, args.steps, args.max_stack), "budget_s": budget,
            "kept": [asdict(run) for run in kept], "left_out": [asdict(run) for run in candidates[len(kept):]],
            "max_stack": args.max_stack,
        }
        write_atomically(args.state / "plan.json", json.dumps(saved_plan, indent=1).encode())
    write_atomically(args.output / "plan.json", json.dumps(saved_plan, indent=1).encode())
    kept = [GridRun(**run) for run in saved_plan["kept"]]
    args.max_stack = saved_plan["max_stack"]  # the stacks the saved state holds
    print(f"training {len(kept)} of {len(candidates)} runs for {args.steps} steps "
          f"(projected {saved_plan['projected_s']:.0f} s of {saved_plan['budget_s']:.0f} s)", flush=True)

    trained = train_runs(kept, pools, size, args, started)
    save_best_models(kept, trained, args.output, args.save_models)  # also where the time ran out: what there is
    print(summary(_read_rows(args.output / "results.jsonl")), flush=True)


def train_settings(args: argparse.Namespace) -> dict:
    """What makes a grid: rerunning with any of these changed starts another one."""
    names = ("steps", "batch_size", "layers", "hidden", "heads", "warmup_steps", "weight_decay", "grad_clip", *DATA_SETTINGS)
    # dropout, precision and the control's filler only where not the default, so that grids from
    # before these options keep their settings
    return ({name: getattr(args, name) for name in names} | ({"dropout": args.dropout} if args.dropout else {})
            | ({"precision": args.precision} if args.precision != "auto" else {}) | _filler_setting(args)
            | {"pairs": list(args.pairs), "control_pairs": list(args.control_pairs)})


def _filler_setting(args: argparse.Namespace) -> dict:
    return {"control_filler": args.control_filler} if args.control_filler != "values" else {}


def stored_data(cells, vocabulary: mqrar.Vocabulary, args: argparse.Namespace) -> dict:
    """make_data's sets, kept in --state (data-TASK-PAIRS.pt) so that a resumed grid does not make
    them again (a pool of a million 768-token sequences takes a minute on 14 processes). A file
    made with other data settings is made again."""
    import torch

    recipe = {name: getattr(args, name) for name in DATA_SETTINGS} | _filler_setting(args)
    files = {cell: args.state / f"data-{cell[0]}-{cell[1]}.pt" for cell in cells}
    data = {}
    for cell, path in files.items():
        stored = torch.load(path, weights_only=True) if path.is_file() else None
        if stored is not None and stored["recipe"] == recipe:
            data[cell] = tuple(stored["tensors"])
    missing = [cell for cell in cells if cell not in data]
    if missing:
        made = make_data(missing, vocabulary, args)
        for cell, tensors in made.items():
            _save_torch(files[cell], {"recipe": recipe, "tensors": list(tensors)})
        data |= made
    return data


def make_data(cells, vocabulary: mqrar.Vocabulary, args: argparse.Namespace) -> dict:
    """(task, pairs) -> training inputs, targets, held-out inputs, targets: int16 [N, T] tensors,
    made in parts by --workers processes (the sets do not depend on how)."""
    from tqdm import tqdm

    parts = []
    for task, count in cells:
        for which, total, seed in (("train", args.pool_size, args.data_seed), ("eval", args.eval_sequences, args.data_seed + 1)):
            parts += [(task, count, which, seed, first, min(args.part_size, total - first)) for first in range(0, total, args.part_size)]
    made: dict[tuple, list] = {}
    with ProcessPoolExecutor(args.workers) as workers:
        futures = [workers.submit(_make_part, task, count, seed, first, number, args.seq_length, vocabulary,
                                  args.control_filler if task == "mqar" else "values")
                   for task, count, _, seed, first, number in parts]
        for part, future in zip(parts, tqdm(futures, desc="MQRAR data", unit="part")):
            made.setdefault(part[:3], []).append(future.result())
    data = {}
    for task, count in cells:
        tensors = []
        for which in ("train", "eval"):
            inputs, targets = zip(*made[(task, count, which)])
            tensors += [_int16(b"".join(part), args.seq_length) for part in (inputs, targets)]
        data[(task, count)] = tuple(tensors)
    return data


def _make_part(task, count, seed, first, number, seq_length, vocabulary, filler) -> tuple[bytes, bytes]:
    """Sequences first .. first + number - 1 of a set, inputs and targets as int16 bytes."""
    sequences = mqrar.sequences(number, seq_length, count, vocabulary, seed, task, first=first, filler=filler)
    return (array("h", [t for s in sequences for t in s.inputs]).tobytes(),
            array("h", [t for s in sequences for t in s.targets]).tobytes())


def _int16(raw: bytes, seq_length: int):
    import torch

    return torch.frombuffer(bytearray(raw), dtype=torch.int16).view(-1, seq_length)


def time_stacks(runs: list[GridRun], pools, size, args: argparse.Namespace):
    """Seconds per training step of a stack as a function of its models, t(G) = a + b G per
    model kind (`GridRun.model`), fitted to stacks of max_stack and half as many models (or what
    the plan has) on the pair count with the most queries. A stack the GPU cannot hold halves
    args.max_stack. Returns the function and the measurements."""
    import torch

    timings = {}
    for model, same in runs_by_model(runs).items():
        largest = max(same, key=lambda run: run.pairs)
        while True:
            sizes = sorted({min(args.max_stack, len(same)), max(1, min(args.max_stack, len(same)) // 2)})
            try:
                timings[model] = [(count, _time_stack(largest, count, pools, size, args)) for count in sizes]
                break
            except torch.OutOfMemoryError:
                if args.max_stack == 1:
                    raise
                args.max_stack //= 2
                print(f"{model}: out of GPU memory; at most {args.max_stack} models a stack from here", flush=True)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        print(f"{model}: seconds per step by models stacked: {timings[model]}", flush=True)

    def step_seconds(model: str, count: int) -> float:
        (g1, t1), (g2, t2) = timings[model][0], timings[model][-1]
        per_model = (t2 - t1) / (g2 - g1) if g2 != g1 else t2 / g2
        overhead = max(0.0, t1 - per_model * g1)
        # evaluations: eval_sequences forward passes (a third of a step each) every eval_every steps
        evaluations = 1 + args.eval_sequences / args.batch_size / 3 / args.eval_every
        return args.safety * evaluations * (overhead + per_model * count)

    return step_seconds, timings


def _time_stack(run: GridRun, count: int, pools, size, args: argparse.Namespace) -> float:
    """Seconds per step of a stack of `count` copies of `run` (other seeds), after two untimed
    steps (compilation, autotuning)."""
    import torch

    device = torch.device(args.device)
    trainer, sources, most = build_stack([replace(run, seed=seed) for seed in range(count)], pools, size, args, device)
    for step in range(args.timing_steps + 2):
        if step == 2:
            _synchronize(device)
            began = time.perf_counter()
        trainer.step([source.batch(step) for source in sources], most)
    _synchronize(device)
    return (time.perf_counter() - began) / args.timing_steps


def build_stack(runs: list[GridRun], pools, size, args: argparse.Namespace, device):
    """The trainer of one stack of runs of one model kind, their batch sources, and the most
    scored positions of a batch in each."""
    from sb_eval.training.stacked import StackedDecoder, StackedRun, StackedTrainer, StackSettings
    from sb_eval.training.trainer import SequencePool

    stacked_runs = [StackedRun(run.name, run.lr, run.seed, OFFSETS if run.offsets else None) for run in runs]
    model = StackedDecoder(runs[0].attention, size, stacked_runs, args.attention_backend, args.dropout, runs[0].learnt_positions).to(device)
    settings = StackSettings(steps=args.steps, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                             bf16={"auto": None, "bf16": True, "fp32": False}[args.precision])
    sources = [SequencePool(*pools[(run.task, run.pairs)][:2], batch_size=args.batch_size, seed=run.seed) for run in runs]
    return StackedTrainer(model, settings), sources, [source.max_scored for source in sources]


def answer_distances(pools, vocabulary: mqrar.Vocabulary) -> dict:
    """{cell: [N, T] how many tokens back each held-out query's answer lies (IGNORE elsewhere)},
    for the held-out accuracy by distance."""
    import torch

    return {cell: torch.tensor([mqrar.answer_distances(row, vocabulary) for row in held_out_inputs.tolist()], device=held_out_inputs.device)
            for cell, (_, _, held_out_inputs, _) in pools.items()}


def train_runs(runs: list[GridRun], pools, size, args: argparse.Namespace, started: float) -> dict:
    """Trains every run to args.steps (resuming from --state), evaluating every eval_every steps
    (loss and accuracy, and accuracy by how far back the answer lies) and where --time-limit
    stops it; returns {run name: (stack trainer, index)}."""
    import torch
    from tqdm import tqdm

    from sb_eval.training.trainer import Batch, max_scored

    device = torch.device(args.device)
    deadline = started + args.time_limit
    distances = answer_distances(pools, mqrar.Vocabulary(args.num_keys, args.num_values))
    evaluation_starts = range(0, args.eval_sequences, args.batch_size)
    stacks, train_losses, since = [], [], 0
    for number, (_, stack_runs) in enumerate(stacks_of(runs, args.max_stack)):
        trainer, sources, most = build_stack(stack_runs, pools, size, args, device)
        state_file = args.state / f"stack{number}.pt"
        state = torch.load(state_file, map_location=device, weights_only=True) if state_file.is_file() else None
        if state is not None:
            trainer.load_state_dict(state["trainer"])
        # the training losses summed since the last evaluation, and over how many steps
        losses = state["train_losses"] if state is not None else torch.zeros(len(stack_runs), device=device)
        since = state["since"] if state is not None else 0
        held_out = [pools[(run.task, run.pairs)][2:] for run in stack_runs]
        eval_batches = [
            [Batch(inputs[first:first + args.batch_size].long(), targets[first:first + args.batch_size].long()) for inputs, targets in held_out]
            for first in evaluation_starts
        ]
        eval_distances = [[distances[(run.task, run.pairs)][first:first + args.batch_size] for run in stack_runs]
                          for first in evaluation_starts]
        eval_most = [max_scored(targets) for _, targets in held_out]
        stacks.append((number, stack_runs, trainer, sources, most, (eval_batches, eval_most, eval_distances)))
        train_losses.append(losses)
    history = _read_history(args.state / "history.jsonl")
    start = min(trainer.step_count for _, _, trainer, *_ in stacks)
    if any(trainer.step_count != start for _, _, trainer, *_ in stacks):
        raise SystemExit(f"the stacks in {args.state} stopped at different steps; delete it to start over")
    history = [row for row in history if row["step"] <= start and not row.get("interrupted")]
    _write_history(args, history)  # a resumed grid's --output holds its whole history, even where nothing is left to train
    progress = tqdm(total=args.steps, initial=start, desc="MQRAR grid", unit="step")
    for step in range(start, args.steps):
        for (_, _, trainer, sources, most, *_), losses in zip(stacks, train_losses):
            losses += trainer.step([source.batch(step) for source in sources], most)
        since += 1
        progress.update(1)
        done = step + 1
        out_of_time = time.monotonic() > deadline
        regular = done % args.eval_every == 0 or done == args.steps
        if regular or out_of_time:
            for (_, stack_runs, trainer, _, _, evaluation), losses in zip(stacks, train_losses):
                metrics = trainer.evaluate(*evaluation)
                for run, mean_loss, row in zip(stack_runs, (losses / since).tolist(), metrics):
                    # an evaluation where the time ran out is marked, and superseded on resuming
                    history.append({"run": run.name, **asdict(run), "step": done, "train_loss": mean_loss, **row,
                                    "elapsed_s": round(time.monotonic() - started, 1), **({} if regular else {"interrupted": True})})
                if regular:
                    losses.zero_()
            since = 0 if regular else since
            best = max((row["eval_accuracy"] for row in history if row["step"] == done), default=0.0)
            progress.set_postfix(best_accuracy=f"{best:.3f}")
            _write_history(args, history)
        if done % args.save_every == 0 or done == args.steps or out_of_time:
            for (number, _, trainer, *_), losses in zip(stacks, train_losses):
                _save_state(args.state / f"stack{number}.pt", trainer, losses, since)
            _write_history(args, history)
        if out_of_time and done < args.steps:
            print(f"\n--time-limit reached at step {done} of {args.steps}; rerun the same command to go on", flush=True)
            break
    progress.close()
    return {run.name: (trainer, index) for _, stack_runs, trainer, *_ in stacks for index, run in enumerate(stack_runs)}


def save_best_models(runs: list[GridRun], trained: dict, output: Path, save_pairs: list[int]) -> None:
    """The best run (final held-out accuracy) of each MQRAR cell of the paper's two models
    (softmax + RoPE, stick-breaking without offsets) with pairs in save_pairs, its weights in
    bf16, MODELS_PER_FILE to a models-N.pt file (7.4 MB a model at the paper's size: six
    fit what may come back from a device machine). Softmax with learnt positions has no
    checkpoint format lm-eval loads, so none of its runs is saved."""
    import torch

    rows = {row["run"]: row for row in _read_rows(output / "results.jsonl")}
    best: dict[tuple, GridRun] = {}
    for run in runs:
        if run.task == "mqrar" and run.pairs in save_pairs and not run.offsets and not run.learnt_positions:
            current = best.get(run.cell)
            if current is None or _accuracy(rows[run.name]) > _accuracy(rows[current.name]):
                best[run.cell] = run
    chosen = sorted(best.values(), key=lambda run: (run.model, run.pairs))
    for number in range(math.ceil(len(chosen) / MODELS_PER_FILE)):
        payload = {}
        for run in chosen[number * MODELS_PER_FILE:(number + 1) * MODELS_PER_FILE]:
            trainer, index = trained[run.name]
            stack = trainer.model
            payload[run.name] = {
                "run": asdict(run), "stacked_run": asdict(stack.runs[index]), "size": asdict(stack.size),
                "weights": {name: parameter[index].detach().to(torch.bfloat16).cpu()
                            for name, parameter in stack.named_parameters()
                            if not (name.endswith("qkv_bias") and not run.offsets)},
            }
        _save_torch(output / f"models-{number + 1}.pt", payload)


# ---------------------------------------------------------------------------------------------
# report


def report(args: argparse.Namespace) -> None:
    settings, rows = read_grids(args.runs)
    harness = {}
    for folder in args.runs:
        harness |= export_and_score(folder, args, settings)
    grid_file = args.docs / "mqrar-grid.json"
    recorded = _read_json(grid_file) or []
    name = grid_name(settings)
    ours = [row for row in recorded if row.get("grid") == name]
    others = [row for row in recorded if row.get("grid") != name]
    # A report replaces the rows of the runs it reports and keeps the grid's other rows: folders do
    # not outlive the machine that trained them, so later reports add runs to a grid, and a model
    # not scored now keeps the score its row had. The same run on another card is another row: a
    # run that waits on a plateau leaves it at a step that rounding decides, so a rerun elsewhere
    # is a second sample. Rows from before the card was recorded count as the reporting card's.
    grid_rows, replaced = [], []
    for row in last_rows(rows):
        entry = _grid_row(row, settings, harness.get(row["run"]))
        earlier = [old for old in ours
                   if _run_of(old) == _run_of(entry) and old.get("device", entry["device"]) == entry["device"]]
        scored = [old["harness_accuracy"] for old in earlier if "harness_accuracy" in old]
        if scored and "harness_accuracy" not in entry:
            entry["harness_accuracy"] = scored[0]
        grid_rows.append(entry)
        replaced += earlier
    kept = [old for old in ours if old not in replaced]
    every = others + sorted(grid_rows + kept, key=lambda row: (*_run_of(row), row.get("device", "")))
    write_atomically(grid_file, json.dumps(every, indent=1, allow_nan=False).encode())
    write_atomically(args.docs / "mqrar.png", plot(grid_rows, kept, others, rows, settings))
    print(summary(rows))
    for name, accuracy in harness.items():
        print(f"lm-eval mqrar, {name}: {accuracy}")
    print(f"wrote {grid_file} ({len(grid_rows)} runs reported, {len(kept)} more of this grid kept, "
          f"{len(others)} of other grids) and {args.docs / 'mqrar.png'}")


def read_grids(folders: list[Path]) -> tuple[dict, list[dict]]:
    """The training settings and the results.jsonl rows of one or more `train --output` folders,
    as one grid: the folders must share every setting but the pair counts, and each run may come
    from only one of them (runs of other learning rates, attentions or seeds are other runs).
    Each row gains "device", the card its folder's plan names (the same run on another card is
    another run: see report)."""
    settings, rows, source = None, [], {}
    for folder in folders:
        saved_plan = _read_json(folder / "plan.json")
        if saved_plan is None or not (folder / "results.jsonl").is_file():
            raise SystemExit(f"--runs {folder}: no plan.json and results.jsonl there; give a folder `train --output` wrote")
        shared = {key: value for key, value in saved_plan["settings"].items() if key not in ("pairs", "control_pairs")}
        if settings is None:
            settings = shared
        differing = sorted(key for key in settings.keys() | shared.keys() if settings.get(key) != shared.get(key))
        if differing:
            raise SystemExit(f"--runs {folders[0]} and {folder} were trained with other settings ({', '.join(differing)}); "
                             "report them separately")
        folder_rows = [{**row, "device": saved_plan["device"]} for row in _read_rows(folder / "results.jsonl")]
        for name in dict.fromkeys(row["run"] for row in folder_rows):
            if name in source:
                raise SystemExit(f"--runs: run {name} is in both {source[name]} and {folder}; give each run's folder once")
            source[name] = folder
        rows += folder_rows
    return settings, rows


def export_and_score(folder: Path, args: argparse.Namespace, settings: dict) -> dict[str, float | str]:
    """Every model saved in a train folder as a checkpoint folder in --models, and its lm-eval
    mqrar accuracy on --harness-samples fresh sequences of its pair count (none when 0)."""
    import torch

    from sb_eval.model.saving import save_checkpoint
    from sb_eval.tokenization import word_level_tokenizer
    from sb_eval.training.stacked import StackedDecoder, StackedRun
    from sb_eval.training.trainer import ModelSize

    tokenizer = word_level_tokenizer(mqrar.Vocabulary(settings["num_keys"], settings["num_values"]).symbols)
    harness = {}
    for path in sorted(folder.glob("models-*.pt")):
        for name, entry in torch.load(path, weights_only=True).items():
            run = GridRun(**entry["run"])
            stack = StackedDecoder(run.attention, ModelSize(**entry["size"]), [StackedRun(**entry["stacked_run"])], "torch")
            stack.load_state_dict({key: value.float()[None] for key, value in entry["weights"].items()})
            checkpoint = save_checkpoint(stack.export(0, tokenizer), tokenizer, args.models / name)
            print(f"wrote {checkpoint}")
            if args.harness_samples:
                harness[name] = harness_accuracy(run, checkpoint, settings, args)
    return harness


def harness_accuracy(run: GridRun, folder: Path, settings: dict, args: argparse.Namespace) -> float | str:
    """The model's accuracy through lm-eval's `mqrar` task (sb_hf or hf, as a user would run it)
    on fresh sequences of its task and pair count; an error message if lm-eval failed."""
    results_folder = folder.parent / f"{folder.name}-harness"
    model = "sb_hf" if run.attention == "stickbreaking" else "hf"
    metadata = {"task": run.task, "num_pairs": [run.pairs], "seq_length": settings["seq_length"], "num_samples": args.harness_samples,
                "num_keys": settings["num_keys"], "num_values": settings["num_values"]}
    command = [
        sys.executable, "-m", "sb_eval.cli", "run", "--model", model, "--model_args", f"pretrained={folder}",
        "--tasks", "mqrar", "--metadata", json.dumps(metadata), "--batch_size", str(args.harness_batch_size),
        "--device", args.device, "--output_path", str(results_folder),
    ]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    if finished.returncode != 0:
        return "failed: " + " | ".join(finished.stderr.strip().splitlines()[-2:])
    try:
        results = json.loads(max(results_folder.rglob("results_*.json"), key=os.path.getmtime).read_text())
        return results["results"]["mqrar"]["acc,none"]
    except (ValueError, KeyError, OSError) as error:  # no results file, or not the expected metric
        return f"failed: lm-eval's results in {results_folder} are unreadable ({type(error).__name__}: {error})"


def grid_name(settings: dict) -> str:
    """The name of a grid's rows in docs/mqrar-grid.json: the layout, the training budget, a model
    size or length other than the paper's, and a pool, warm-up, dropout, precision or control
    filler other than the defaults, so that a report of a grid trained otherwise keeps this one's
    rows."""
    name = f"power-law, {settings['steps']} steps of {settings['batch_size']}"
    layers, hidden, heads, seq_length = (settings[key] for key in PAPER_SHAPE)
    if (layers, hidden, heads, seq_length) != tuple(PAPER_SHAPE.values()):
        name += f", {layers} layers x {hidden} with {heads} head{'s' * (heads != 1)}, {seq_length} tokens"
    if settings["pool_size"] != DEFAULT_POOL_SIZE:
        name += f", a pool of {settings['pool_size']}"
    if settings["warmup_steps"]:
        name += f", {settings['warmup_steps']} steps of warm-up"
    if settings.get("dropout"):
        name += f", dropout {settings['dropout']}"
    if settings.get("precision"):
        name += f", {settings['precision']}"
    if settings.get("control_filler"):
        name += f", the control's filler {settings['control_filler']}"
    return name


def _run_of(grid_row: dict) -> tuple:
    """What names a run among its grid's rows in docs/mqrar-grid.json (the card aside)."""
    return grid_row["task"], grid_row["model"], grid_row["pairs"], grid_row["lr"], grid_row["seed"]


def _grid_row(row: dict, settings: dict, harness) -> dict:
    """A run's final evaluation as a docs/mqrar-grid.json row: what it was, how it was trained."""
    run = GridRun.from_row(row)
    entry = {
        "grid": grid_name(settings), "attention": run.attention, "offsets": list(OFFSETS) if run.offsets else None,
        "learnt_positions": run.learnt_positions, "model": run.model, "task": run.task, "layout": "power-law",
        "layers": settings["layers"], "hidden": settings["hidden"], "heads": settings["heads"],
        "num_keys": settings["num_keys"], "num_values": settings["num_values"],
        "seq_length": settings["seq_length"], "pairs": run.pairs, "lr": run.lr, "seed": run.seed, "steps": row["step"],
        "batch_size": settings["batch_size"], "accuracy": _number(row["eval_accuracy"]), "eval_loss": _number(row["eval_loss"]),
        "eval_positions": row["eval_positions"], "train_loss": _number(row["train_loss"]), "device": row["device"],
    }
    if row["step"] < settings["steps"]:  # its time ran out (the history marks that row too), or its command was killed
        entry["interrupted"] = True
    if harness is not None:
        entry["harness_accuracy"] = harness
    return entry


def plot(reported: list[dict], kept: list[dict], others: list[dict], history: list[dict], settings: dict) -> bytes:
    """PNG: first, the best accuracy per cell against the pair count (this grid's MQRAR and MQAR
    control, over the runs `reported` now and the rows of earlier reports `kept`, and faintly
    the MQRAR of other grids of the same model size and length); second, the held-out accuracy
    over training of each cell's best reported run (only those have their evaluations in
    `history`); third, that run's accuracy at its last evaluation by how far back the answer lies
    (where its results have it), to show how far a partly learnt recall reaches;
    last, the held-out loss of every run over training (where accuracy stays near 0 the loss still
    shows whether a run learnt anything)."""
    from matplotlib.figure import Figure

    colours = {"softmax": "tab:blue", "softmax+positions": "tab:pink", "stickbreaking": "tab:orange", "stickbreaking+offsets": "tab:green"}
    figure = Figure(figsize=(21, 4.2))
    by_count, over_steps, by_distance, losses = figure.subplots(1, 4)
    def best_of(rows: list[dict]) -> dict[tuple, dict]:
        return best_per_cell([{**row, "run": "", "eval_accuracy": row["accuracy"], "offsets": row["offsets"] is not None}
                              for row in rows])

    best = best_of(reported + kept)
    comparable = of_the_same_shape(others, settings)
    for model, colour in colours.items():
        for task, style in (("mqrar", "-"), ("mqar", "--")):
            points = sorted((count, entry["accuracy"]) for (m, t, count), entry in best.items() if m == model and t == task)
            if points:
                label = f"{LABELS[model]}, {'MQRAR' if task == 'mqrar' else 'MQAR (control)'}"
                by_count.plot(*zip(*points), style, marker="o", color=colour, label=label)
        for grid, style in zip(dict.fromkeys(row["grid"] for row in comparable), itertools.cycle((":", "-.", (0, (1, 4))))):
            best_other: dict[int, float] = {}
            for row in comparable:
                if row["grid"] == grid and row["model"] == model and row["task"] == "mqrar":
                    best_other[row["pairs"]] = max(row["accuracy"] or 0.0, best_other.get(row["pairs"], 0.0))  # null: diverged
            if best_other:
                points = sorted(best_other.items())
                # wrapped: grid names run long, and an unwrapped legend squeezes the other panels
                by_count.plot(*zip(*points), linestyle=style, color=colour, alpha=0.5,
                              label=textwrap.fill(f"{LABELS[model]}, MQRAR, {grid} grid", 48))
    by_count.set_xlabel("key-value pairs")
    by_count.set_ylabel("held-out accuracy (best learning rate)")
    by_count.set_ylim(0, 1.02)
    by_count.set_title(f"{settings['layers']} layers x {settings['hidden']}, {settings['seq_length']} tokens, "
                      f"{settings['steps']} steps of {settings['batch_size']}")
    # Below the panel: with other grids drawn faintly the legend runs to a dozen entries and would
    # cover the curves and the title.
    legend = by_count.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    legend.set_in_layout(False)  # tight_layout would shrink the panels to make room for it
    by_count.grid(alpha=0.3)
    # Shade by rank among the counts plotted, so that grids off the paper's counts read the same way.
    traced = best_of(reported)
    counts = sorted({count for _, _, count in traced})
    for (model, task, count), entry in sorted(traced.items()):
        run = max(entry["runs"], key=_accuracy)
        name = GridRun.from_row(run).name
        evaluations = sorted((row for row in history if row["run"] == name), key=lambda row: row["step"])
        shade = 0.35 + 0.65 * counts.index(count) / (len(counts) - 1) if len(counts) > 1 else 1.0
        style = {"linestyle": "-" if task == "mqrar" else "--", "color": colours[model], "alpha": shade,
                 "label": f"{LABELS[model]}, {'MQRAR' if task == 'mqrar' else 'MQAR'} {count}"}
        over_steps.plot([row["step"] for row in evaluations], [row["eval_accuracy"] for row in evaluations], **style)
        if "eval_accuracy_by_distance" in evaluations[-1]:
            by_bin = sorted((int(first), accuracy) for first, accuracy in evaluations[-1]["eval_accuracy_by_distance"].items())
            by_distance.plot(*zip(*by_bin), marker="o", markersize=3, **style)
    over_steps.set_xlabel("training step")
    over_steps.set_ylabel("held-out accuracy")
    over_steps.set_ylim(0, 1.02)
    over_steps.set_title("best run per cell over training (darker: more pairs; dashed: control)")
    over_steps.legend(fontsize=6, ncol=2)
    over_steps.grid(alpha=0.3)
    by_distance.set_xscale("log", base=2)
    by_distance.set_xlabel("tokens back to the answer's assignment (bins from 2^k)")
    by_distance.set_ylabel("held-out accuracy, last evaluation")
    by_distance.set_ylim(0, 1.02)
    by_distance.set_title("best run per cell, by how far back the answer lies")
    if by_distance.lines:
        by_distance.legend(fontsize=6, ncol=2)
    else:
        by_distance.text(0.5, 0.5, "not in these runs' results", ha="center", transform=by_distance.transAxes)
    by_distance.grid(alpha=0.3)
    plot_losses(losses, history, settings["num_values"])
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=130, bbox_inches="tight", bbox_extra_artists=[legend])
    return png.getvalue()


def of_the_same_shape(grid_rows: list[dict], settings: dict) -> list[dict]:
    """The docs/mqrar-grid.json rows of models of the size and sequence length `settings` give;
    rows written before the size was recorded are all of the paper's size."""
    shape = {key: settings[key] for key in PAPER_SHAPE}
    return [row for row in grid_rows if {key: row.get(key, paper) for key, paper in PAPER_SHAPE.items()} == shape]


def plot_losses(axes, history: list[dict], num_values: int) -> None:
    """Every run's held-out loss over training on `axes`: a colour per model and learning rate
    (the first rate in the model's colour of the other panels), solid for MQRAR, dashed for the
    control, a marker per pair count (by rank among the counts plotted, as the other panels shade
    them); and the loss of a uniform guess among the values."""
    shades = {"softmax": ("tab:blue", "tab:purple", "tab:cyan"), "softmax+positions": ("tab:pink", "xkcd:plum", "xkcd:salmon"),
              "stickbreaking": ("tab:orange", "tab:red", "tab:brown"),
              "stickbreaking+offsets": ("tab:green", "tab:olive", "tab:gray")}
    curves: dict[GridRun, list[tuple[int, float]]] = {}
    for row in history:
        if row["eval_loss"] is not None and not math.isnan(row["eval_loss"]):
            curves.setdefault(GridRun.from_row(row), []).append((row["step"], row["eval_loss"]))
    markers = dict(zip(sorted({run.pairs for run in curves}), "os^Dv<>p"))
    rates = {model: sorted({run.lr for run in curves if run.model == model}) for model in shades}
    for run, curve in sorted(curves.items(), key=lambda item: (list(shades).index(item[0].model), item[0].lr, item[0].task, item[0].pairs)):
        colour = shades[run.model][rates[run.model].index(run.lr) % len(shades[run.model])]
        task = "MQRAR" if run.task == "mqrar" else "MQAR"
        axes.plot(*zip(*sorted(curve)), "-" if run.task == "mqrar" else "--", marker=markers.get(run.pairs, "x"), markersize=2.5,
                  linewidth=1, color=colour, label=f"{LABELS[run.model]}, {task} {run.pairs}, lr {run.lr:.1e}")
    axes.axhline(math.log(num_values), color="black", linewidth=0.8, linestyle=":", label=f"uniform among {num_values} values")
    axes.set_xlabel("training step")
    axes.set_ylabel("held-out loss (nats)")
    axes.set_title("every run's held-out loss (dashed: MQAR control)")
    axes.legend(fontsize=5)
    axes.grid(alpha=0.3)


def summary(rows: list[dict]) -> str:
    """Best held-out accuracy per cell at each run's last evaluation (over learning rates; the
    mean over seeds of one learning rate), as a Markdown table."""
    best = best_per_cell(last_rows(rows))
    models = sorted({cell[0] for cell in best}, key=lambda model: list(LABELS).index(model))
    lines = ["| task | pairs | " + " | ".join(LABELS[model] for model in models) + " |", "|---|---|" + "---|" * len(models)]
    for task, count in sorted({(cell[1], cell[2]) for cell in best}, key=lambda key: (key[0] != "mqrar", key[1])):
        cells = []
        for model in models:
            entry = best.get((model, task, count))
            if entry is None:
                cells.append("")
                continue
            steps = sorted({row["step"] for row in entry["runs"]})
            cells.append(f"{entry['accuracy']:.3f} (lr {entry['lr']:.1e}, {entry['seeds']} seed{'s' * (entry['seeds'] > 1)}, "
                         f"step {'/'.join(map(str, steps))})")
        lines.append(f"| {task} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def last_rows(rows: list[dict]) -> list[dict]:
    """The last evaluation of every run (rows come in step order)."""
    return list({row["run"]: row for row in rows}.values())


def best_per_cell(rows: list[dict]) -> dict[tuple, dict]:
    """(model, task, pairs) -> {"lr", "accuracy" (mean over the learning rate's seeds), "seeds",
    "runs"} for the learning rate with the best mean."""
    by_lr: dict[tuple, list[dict]] = {}
    for row in rows:
        run = GridRun.from_row(row)
        by_lr.setdefault((*run.cell, run.lr), []).append(row)
    best: dict[tuple, dict] = {}
    for (*cell, lr), runs in by_lr.items():
        accuracy = sum(_accuracy(row) for row in runs) / len(runs)
        if tuple(cell) not in best or accuracy > best[tuple(cell)]["accuracy"]:
            best[tuple(cell)] = {"lr": lr, "accuracy": accuracy, "seeds": len(runs), "runs": runs}
    return best


def _accuracy(row: dict) -> float:
    """A diverged run's accuracy (NaN, or None in docs/mqrar-grid.json) counts as 0."""
    accuracy = row["eval_accuracy"]
    return 0.0 if accuracy is None or math.isnan(accuracy) else accuracy


def _number(value: float) -> float | None:
    """NaN (a diverged run) as null, which JSON has."""
    return None if math.isnan(value) else value


def _save_state(path: Path, trainer, train_losses, since: int) -> None:
    _save_torch(path, {"trainer": trainer.state_dict(), "train_losses": train_losses, "since": since})


def _save_torch(path: Path, payload) -> None:
    """torch.save, written so that a reader never sees half a file."""
    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomically(path, buffer.getvalue())


def _write_history(args: argparse.Namespace, history: list[dict]) -> None:
    text = "".join(json.dumps(row) + "\n" for row in history).encode()
    write_atomically(args.state / "history.jsonl", text)
    write_atomically(args.output / "results.jsonl", text)


def _read_history(path: Path) -> list[dict]:
    return _read_rows(path) if path.is_file() else []


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("train", help="train the grid on one GPU (see the module's docstring)")
    run.add_argument("--output", type=Path, required=True, help="results that come back: plan.json, results.jsonl, models-N.pt")
    run.add_argument("--state", type=Path, default=Path("runs/mqrar-state"), help="resumable state (large)")
    run.add_argument("--time-limit", type=float, default=510, help="seconds for the whole command, data and timing included")
    run.add_argument("--reserve", type=float, default=20, help="seconds kept back for the last evaluation and saving")
    run.add_argument("--plan-seconds", type=float, default=None,
                     help="projected seconds of training the runs kept may take, over as many calls of the same command as "
                          "that needs (each stops at its --time-limit and the next resumes; default: what the first call's "
                          "--time-limit leaves after the data and the timing)")
    run.add_argument("--steps", type=int, default=4000)
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--pool-size", type=int, default=DEFAULT_POOL_SIZE, help="training sequences per cell (the paper's 100,000)")
    run.add_argument("--dropout", type=float, default=0.0,
                     help="in training, on the embeddings and softmax's attention weights (the paper's code: 0.1); softmax runs only")
    run.add_argument("--eval-sequences", type=int, default=512, help="held-out sequences per cell")
    run.add_argument("--eval-every", type=int, default=250)
    run.add_argument("--save-every", type=int, default=2000, help="steps between saves of the resumable state (and at the end)")
    run.add_argument("--seq-length", type=int, default=PAPER_SHAPE["seq_length"])
    run.add_argument("--layers", type=int, default=PAPER_SHAPE["layers"])
    run.add_argument("--hidden", type=int, default=PAPER_SHAPE["hidden"])
    run.add_argument("--heads", type=int, default=PAPER_SHAPE["heads"])
    run.add_argument("--num-keys", type=int, default=mqrar.DEFAULT_NUM_KEYS)
    run.add_argument("--num-values", type=int, default=mqrar.DEFAULT_NUM_VALUES)
    run.add_argument("--pairs", type=int, nargs="*", default=list(PAIRS), help="MQRAR pair counts, ascending (none: only the control)")
    run.add_argument("--control-pairs", type=int, nargs="*", default=list(CONTROL_PAIRS), help="MQAR pair counts (none: no control)")
    run.add_argument("--control-filler", choices=mqrar.FILLERS, default="values",
                     help="what lies between the control's queries: random values (the default, as in MQRAR) or one constant "
                          "value (Zoology's paper)")
    run.add_argument("--learning-rates", type=float, nargs="+",
                     help="instead of the default plan: these rates in order, each with the control and every MQRAR pair count")
    run.add_argument("--attentions", nargs="+", choices=ATTENTIONS, help="with --learning-rates (default: both)")
    run.add_argument("--offsets", choices=("without", "with", "both"),
                     help="with --learning-rates: stick-breaking without logit offsets (the default, the paper's), with them, or both")
    run.add_argument("--positions", choices=("rope", "learnt", "both"),
                     help="with --learning-rates: softmax with RoPE (the default, the paper's text), with learnt absolute "
                          "positions (the paper's code; not exported for lm-eval), or both")
    run.add_argument("--seeds", type=int, nargs="+", help="with --learning-rates: the runs' seeds (initialisation, batch order; default 0)")
    run.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up (the paper's code has none)")
    run.add_argument("--weight-decay", type=float, default=0.1)
    run.add_argument("--grad-clip", type=float, default=None, help="per-model gradient norm clipping (the paper's code has none)")
    run.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="auto: bf16 autocast on CUDA, float32 on the CPU; fp32: float32 throughout, as the "
                          "paper's code; bf16: bf16 autocast on any device")
    run.add_argument("--data-seed", type=int, default=0)
    run.add_argument("--save-models", type=int, nargs="*", default=[32, 128, 192],
                     help="MQRAR pair counts whose best model per attention is saved for `report`")
    run.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    run.add_argument("--attention-backend", default="auto", help="stick-breaking kernels: auto (triton on CUDA), triton, torch")
    run.add_argument("--max-stack", type=int, default=12, help="most models in one stack (GPU memory)")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes making the data")
    run.add_argument("--part-size", type=int, default=2000, help="sequences a data process makes at a time")
    run.add_argument("--timing-steps", type=int, default=6, help="steps timed per stack size before choosing the runs")
    run.add_argument("--safety", type=float, default=1.15, help="factor on the projected time")
    run.set_defaults(func=train)
    summarise = commands.add_parser("report", help="checkpoints, lm-eval scores, docs/mqrar-grid.json and docs/mqrar.png")
    summarise.add_argument("--runs", type=Path, nargs="+", required=True,
                           help="the folders train --output wrote (one grid: the same settings but the pair counts, each run in one)")
    summarise.add_argument("--docs", type=Path, default=Path("docs"))
    summarise.add_argument("--models", type=Path, default=Path("runs/mqrar-models"), help="where the checkpoints go")
    summarise.add_argument("--harness-samples", type=int, default=50, help="lm-eval mqrar sequences per model (0: skip)")
    summarise.add_argument("--harness-batch-size", type=int, default=16)
    summarise.add_argument("--device", default="cpu", help="lm-eval's device")
    summarise.set_defaults(func=report)
    args = parser.parse_args(argv)
    if args.command == "train":
        _check_train_args(parser, args)
    return args


def _check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("steps", "batch_size", "pool_size", "eval_sequences", "eval_every", "save_every", "max_stack", "workers",
                 "part_size", "timing_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size > min(args.pool_size, args.eval_sequences):
        parser.error(f"--batch-size {args.batch_size} is larger than --pool-size or --eval-sequences")
    if args.eval_sequences % args.batch_size:
        parser.error(f"--eval-sequences {args.eval_sequences} must be a multiple of --batch-size {args.batch_size}")
    if sorted(args.pairs) != args.pairs or len(set(args.pairs)) != len(args.pairs):
        parser.error(f"--pairs {args.pairs} must be ascending without repeats")
    if not args.pairs and not args.control_pairs:
        parser.error("--pairs and --control-pairs are both empty: no run to make")
    if args.learning_rates is None:
        given = [name for name in ("attentions", "offsets", "positions", "seeds") if getattr(args, name) is not None]
        if given:
            parser.error(f"--{' and --'.join(given)} choose the runs of --learning-rates; give the rates too")
    args.attentions = args.attentions or list(ATTENTIONS)
    for option, attention in (("offsets", "stickbreaking"), ("positions", "softmax")):
        if getattr(args, option) is not None and attention not in args.attentions:
            parser.error(f"--{option} chooses {attention} runs, and --attentions {' '.join(args.attentions)} has none")
    args.offsets = args.offsets or "without"
    args.positions = args.positions or "rope"
    args.seeds = args.seeds or [0]
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        parser.error(f"--seeds {args.seeds} must be distinct and >= 0")
    if not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup-steps must be in 0..--steps - 1, got {args.warmup_steps}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be a probability in [0, 1), got {args.dropout}")
    if args.dropout and "stickbreaking" in args.attentions:
        parser.error("--dropout applies to softmax only (the stick-breaking kernels drop no attention weights): "
                     "give --learning-rates with --attentions softmax")
    if args.plan_seconds is not None and args.plan_seconds <= 0:
        parser.error(f"--plan-seconds must be > 0, got {args.plan_seconds}")
    if args.time_limit <= args.reserve:
        parser.error(f"--time-limit {args.time_limit} leaves nothing after --reserve {args.reserve}")


def main(argv=None) -> None:
    args = parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
