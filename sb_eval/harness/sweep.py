"""The engine of `sb-eval sweep` (sb_eval.commands.sweep): models x tasks x context lengths
through lm-eval, one JSON line per point.

A point is one (model, task, length): one lm-eval evaluation of the task with the metadata
max_seq_lengths=[length] merged over --metadata. Each model is loaded once and runs its lengths
shortest first. A finished point is appended to OUTPUT/results.jsonl at once and flushed to disk,
so a sweep that dies loses at most the point it was running; the same command run again skips the
points that have a result and retries the ones whose row is an error. The file is only ever
appended to. At the end, OUTPUT/summary.md and OUTPUT/plots/<task>.png are made from every row in
it (sb_eval.reports.sweep).

Under `accelerate launch` every process runs every point (lm-eval splits each point's requests
between them); all processes read results.jsonl before any of them writes, and only global rank 0
writes.
"""

from __future__ import annotations

import difflib
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path
from typing import Any

import lm_eval
import sb_eval_hook
import torch
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string
from tqdm import tqdm

from sb_eval.files import check_output_folder
from sb_eval.reports.sweep import write_report

from . import lm_eval_compat

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
SB_MODEL = "sb_hf"
TASKS_FOLDER = sb_eval_hook.task_folder()
# The most of an error's traceback a row keeps (its end, where the cause is).
TRACEBACK_CHARS = 4000
# What identifies a row's point; a line without them is not a row (a torn line, say).
ROW_FIELDS = ("model_spec", "task", "length")
# The settings a folder's results must share, being part of what was measured.
RESULT_SETTINGS = ("metadata", "limit", "gen_kwargs")


class SweepArgumentError(ValueError):
    """A sweep argument that cannot work; the message names the argument and what is valid."""


@dataclass(frozen=True)
class ModelSpec:
    """An lm-eval model name and its model_args string, as on lm_eval's command line."""

    name: str
    args: str

    @property
    def key(self) -> str:
        """NAME:ARGS with the arguments sorted, so that the same model written another way is the
        same model when resuming."""
        parsed = simple_parse_args_string(self.args)
        return f"{self.name}:" + ",".join(f"{key}={parsed[key]}" for key in sorted(parsed))


@dataclass(frozen=True)
class Point:
    model: ModelSpec
    task: str
    length: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.model.key, self.task, self.length


@dataclass(frozen=True)
class Settings:
    """What every point of one sweep shares besides model, task and length."""

    output: Path
    metadata: dict[str, Any]  # the user's --metadata, without max_seq_lengths
    limit: int | float | None
    gen_kwargs: dict[str, Any]  # overrides of the tasks' generation_kwargs
    device: str | None
    batch_size: int | str
    max_batch_size: int | None
    train_length: int | None


def prepare(args) -> tuple[list[Point], list[dict], TaskLoader, Settings]:
    """The points of `sb-eval sweep` from its parsed arguments (sb_eval.commands.sweep), every one
    checked before any model is loaded, and the rows its output folder already holds. Raises
    SweepArgumentError naming the argument that cannot work."""
    models = [ModelSpec(args.model, args.model_args)] + [parse_model_spec(spec) for spec in args.compare]
    check_models(models)
    lengths = parse_lengths(args.lengths)
    settings = Settings(
        output=args.output,
        metadata=parse_metadata(args.metadata),
        limit=parse_limit(args.limit),
        gen_kwargs=parse_gen_kwargs(args.gen_kwargs),
        device=parse_device(args.device),
        batch_size=parse_batch_size(args.batch_size),
        max_batch_size=args.max_batch_size,
        train_length=parse_train_length(args.train_length),
    )
    task_names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    loader = TaskLoader(task_names, args.include_path)
    if global_rank() == 0:  # the process that writes
        check_output_folder(settings.output, "--output", SweepArgumentError)
    rows = read_rows(settings.output / RESULTS_FILE)
    check_same_settings(rows, settings)
    points = [Point(model, task, length) for model in models for length in lengths for task in task_names]
    return points, rows, loader, settings


def split_model_spec(spec: str) -> ModelSpec | None:
    """NAME:ARGS (an lm-eval model name and its model_args) as a ModelSpec; None when `spec` is
    not of that form."""
    name, colon, args = spec.partition(":")
    if not colon or not name.strip() or "=" not in args:
        return None
    return ModelSpec(name.strip(), args.strip())


def parse_model_spec(spec: str) -> ModelSpec:
    model = split_model_spec(spec)
    if model is None:
        raise SweepArgumentError(
            f"--compare {spec!r} must be NAME:ARGS, an lm-eval model name and its model_args, "
            "e.g. hf:pretrained=/path/to/model or sb_hf:pretrained=/path/to/checkpoint"
        )
    return model


def check_models(models: list[ModelSpec]) -> None:
    """models[0] comes from --model/--model_args, the rest from --compare."""
    keys = []
    for number, model in enumerate(models):
        argument = "--model" if number == 0 else f"--compare {model.name}:{model.args}"
        try:
            model_class(model.name)
            keys.append(model.key)
        except SweepArgumentError as error:
            raise SweepArgumentError(f"{argument}: {error}") from None
        except ValueError as error:  # model arguments that are not key=value pairs
            raise SweepArgumentError(f"{argument}: model arguments {model.args!r} must be key=value pairs "
                                     f"separated by commas ({error})") from None
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise SweepArgumentError(f"--model and --compare name the same model twice: {', '.join(repeated)}")


def model_class(name: str) -> type:
    """The lm-eval model class registered as `name`, found without loading any weights."""
    if name == SB_MODEL:
        # The start-up hook registers it in installed copies; importing it directly also works
        # where the hook is not installed (editable installs).
        from sb_eval.harness.stick_breaking_lm import StickBreakingLM

        return StickBreakingLM
    import lm_eval.models  # noqa: F401  (lm-eval's own models register on import)
    from lm_eval.api.registry import model_registry

    if name not in model_registry:
        raise SweepArgumentError(
            f"model {name!r} is not an lm-eval model; valid: {SB_MODEL}, {', '.join(sorted(model_registry.keys()))}"
        )
    try:
        return model_registry.get(name)
    except ImportError as error:
        raise SweepArgumentError(f"lm-eval model {name!r} cannot be imported here: {error}") from None


def parse_lengths(text: str) -> list[int]:
    """'2048,4096' or '2K,4K' -> [2048, 4096], sorted, each once."""
    lengths = set()
    for part in (part.strip() for part in text.split(",")):
        number, kilo = (part[:-1], 1024) if part[-1:] in ("k", "K") else (part, 1)
        if not number.isdigit() or int(number) * kilo < 1:
            raise SweepArgumentError(
                f"--lengths {text!r}: {part!r} is not a positive number of tokens; give a comma-separated "
                "list such as 2048,4096,8192 or 2K,4K,8K"
            )
        lengths.add(int(number) * kilo)
    return sorted(lengths)


def parse_metadata(text: str) -> dict[str, Any]:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as error:
        raise SweepArgumentError(f"--metadata {text!r} is not JSON ({error.msg}); give an object such as "
                                 '\'{"num_samples": 100}\'') from None
    if not isinstance(metadata, dict):
        raise SweepArgumentError(f"--metadata {text!r} must be a JSON object, such as '{{\"num_samples\": 100}}'")
    if "max_seq_lengths" in metadata:
        raise SweepArgumentError("--metadata must not set max_seq_lengths: the sweep sets it for each point from --lengths")
    return metadata


def parse_limit(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        limit = float(text)
    except ValueError:
        limit = -1.0
    if not limit > 0 or not math.isfinite(limit):
        raise SweepArgumentError(f"--limit {text!r} must be a number of samples, or a fraction below 1")
    return int(limit) if limit >= 1 else limit


def parse_gen_kwargs(text: str) -> dict[str, Any]:
    try:
        return simple_parse_args_string(text)
    except ValueError as error:
        raise SweepArgumentError(f"--gen_kwargs {text!r} must be key=value pairs separated by commas ({error})") from None


def parse_batch_size(text: str) -> int | str:
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise SweepArgumentError(f"--batch_size {text!r} must be a positive number, auto or auto:N")


def parse_device(device: str | None, error: type[Exception] = SweepArgumentError) -> str:
    """--device, by default cuda where there is a CUDA device and cpu elsewhere (lm-eval's own
    default is cuda everywhere); cuda where there is none raises `error`."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {device}: this machine has no CUDA device; use --device cpu (the default here)")
    return device


def parse_train_length(length: int | None) -> int | None:
    if length is not None and length < 1:
        raise SweepArgumentError(f"--train_length {length} must be a positive number of tokens")
    return length


class TaskLoader:
    """lm-eval's task index, built once, handing out task managers with each point's metadata.

    A TaskManager indexes every task YAML it can see when it is made (about 6 s with lm-eval's
    15 000 tasks) and fixes its metadata then; a sweep needs new metadata for every (model,
    length). So the index is built once (from sb-eval's folder and --include_path alone when the
    requested tasks are all there, which takes milliseconds) and each point gets a copy of the
    manager with its own metadata.
    """

    def __init__(self, names: list[str], include_paths: list[Path]) -> None:
        if not names:
            raise SweepArgumentError("--tasks is empty; name lm-eval tasks or groups, e.g. ruler_niah,sb_ruler_vt")
        for folder in include_paths:
            if not folder.is_dir():
                raise SweepArgumentError(f"--include_path {folder} is not a folder")
        folders = [TASKS_FOLDER, *include_paths]
        manager = TaskManager(include_path=folders, include_defaults=False)
        index = lm_eval_compat.task_index(manager)
        if not self._all_indexed(index, names):
            # A name that is in no folder at all is reported now, from a quick scan of lm-eval's
            # task files, rather than after the minute its whole index can take to build.
            known = set(index) | lm_eval_compat.quick_task_names()
            self._check_known(names, known, index)
            manager = TaskManager(include_path=folders)  # lm-eval's own tasks as well
        self.manager = manager
        self._check(names)

    @staticmethod
    def _all_indexed(index: dict, names: list[str]) -> bool:
        """Whether `names` and, for groups, every task they name are in `index`."""
        pending = list(names)
        while pending:
            entry = index.get(pending.pop())
            if entry is None:
                return False
            if lm_eval_compat.is_group(entry):
                pending += lm_eval_compat.group_members(entry)
        return True

    def _check(self, names: list[str]) -> None:
        index = lm_eval_compat.task_index(self.manager)
        self._check_known(names, set(index), index)
        for name in names:
            if lm_eval_compat.is_tag(index[name]):
                members = sorted(entry_name for entry_name, entry in index.items() if name in lm_eval_compat.tags(entry))
                raise SweepArgumentError(
                    f"--tasks: {name!r} is a tag, which has no result of its own; name its tasks "
                    f"({', '.join(members)}) or a group"
                )

    @staticmethod
    def _check_known(names: list[str], known: set[str], index: dict) -> None:
        """Raises SweepArgumentError for the first of `names` not in `known`, with the nearest
        known names and sb-eval's own tasks (those of `index` from its task folder)."""
        ours = sorted(name for name, entry in index.items()
                      if (path := lm_eval_compat.yaml_path(entry)) is not None and path.parent == TASKS_FOLDER)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise SweepArgumentError(
                    f"--tasks: unknown task {name!r}.{hint} sb-eval's tasks: {', '.join(ours)}; lm-eval's own are "
                    "listed by `lm_eval ls tasks`; your own folders go in --include_path"
                )

    def manager_with(self, metadata: dict[str, Any]) -> TaskManager:
        return lm_eval_compat.manager_with_metadata(self.manager, metadata)


def point_metadata(point: Point, settings: Settings) -> dict[str, Any]:
    """What the point's tasks receive: the model's arguments (as lm_eval's own command passes
    them, so that tasks find the tokenizer), then --metadata, then the point's length."""
    return simple_parse_args_string(point.model.args) | settings.metadata | {"max_seq_lengths": [point.length]}


def read_rows(path: Path) -> list[dict]:
    """The rows of a results file. A line that is not a whole JSON row, such as the last line of a
    sweep killed while writing it, is skipped with a warning."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            row = None
        if not isinstance(row, dict) or any(field not in row for field in ROW_FIELDS):
            logger.warning("%s, line %d is not a whole result row (cut off when a sweep was killed?); ignored", path, number)
            continue
        rows.append(row)
    return rows


class ResultsWriteError(OSError):
    """results.jsonl could not take a row (a full disk, say); the rows before it are intact."""


def append_row(path: Path, row: dict) -> None:
    """Appends one JSON line and waits until it is on disk. A torn last line left by a killed
    sweep is first ended, so that this row starts a line of its own. A write that fails (a full
    disk) is undone, the file cut back to where it was, and raises ResultsWriteError."""
    line = (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(descriptor).st_size
    try:
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            line = b"\n" + line
        while line:
            line = line[os.write(descriptor, line):]
        os.fsync(descriptor)
    except OSError as error:
        os.ftruncate(descriptor, size)
        raise ResultsWriteError(error.errno, f"could not write a row to {path}: {error.strerror or error}; the rows "
                                "before it are intact: make room and run the same command again") from error
    finally:
        os.close(descriptor)


def is_error(row: dict) -> bool:
    return "error" in row


def row_key(row: dict) -> tuple[str, str, int]:
    return row["model_spec"], row["task"], row["length"]


def check_same_settings(rows: list[dict], settings: Settings) -> None:
    """Results made with other --metadata, --limit or --gen_kwargs would be skipped as done and
    shown beside this run's as if comparable; refuse instead."""
    wanted = {name: getattr(settings, name) for name in RESULT_SETTINGS}
    for row in rows:
        earlier = {name: row.get(name) for name in RESULT_SETTINGS}
        if not is_error(row) and earlier != wanted:
            raise SweepArgumentError(
                f"{settings.output / RESULTS_FILE} holds results made with {_settings_text(earlier)}, and this run "
                f"asks for {_settings_text(wanted)}; use another --output folder, or the same settings to resume"
            )


def _settings_text(values: dict[str, Any]) -> str:
    return " ".join(f"--{name} {json.dumps(value)}" for name, value in values.items())


def global_rank() -> int:
    """This process's rank under `accelerate launch` or torchrun; 0 alone."""
    return int(os.environ.get("RANK", "0"))


def run_sweep(points: list[Point], rows: list[dict], loader: TaskLoader, settings: Settings) -> int:
    done = {row_key(row) for row in rows if not is_error(row)}
    pending = [point for point in points if point.key not in done]
    writer = global_rank() == 0
    results_path = settings.output / RESULTS_FILE
    if writer:
        print(f"sb-eval sweep: {len(points) - len(pending)} of {len(points)} points already in {results_path}; "
              f"running {len(pending)}", file=sys.stderr)
    versions = installed_versions()
    # Counted in context tokens, so that the estimate of the time left allows for long points.
    progress = tqdm(total=sum(point.length for point in pending), desc="sweep", unit="tok", unit_scale=True,
                    disable=not writer, dynamic_ncols=True)
    failed: list[Point] = []
    interrupted = False
    unwritable = None
    try:
        for model, model_points in groupby(pending, key=lambda point: point.model):
            model_points = list(model_points)
            try:
                lm = load_model(model, settings)
            except Exception as error:  # every point of this model fails the same way
                for point in model_points:
                    failed.append(point)
                    if writer:
                        append_row(results_path, error_row(point, settings, versions, error, 0.0, "loading the model"))
                    progress.update(point.length)
                free_memory()
                continue
            try:
                for point in model_points:
                    progress.set_postfix_str(f"{model.name} {point.task} {point.length}")
                    row = evaluate_point(lm, point, loader, settings, versions)
                    if row is not None and is_error(row):
                        failed.append(point)
                    if row is not None and writer:
                        append_row(results_path, row)
                    progress.update(point.length)
            finally:
                close_model(lm)
                del lm
                free_memory()
    except KeyboardInterrupt:
        interrupted = True
    except ResultsWriteError as error:
        unwritable = error
    finally:
        progress.close()
    if unwritable is not None:
        print(f"sb-eval sweep: {unwritable.strerror}", file=sys.stderr)
        return 1
    if writer:
        written = write_report(read_rows(results_path), settings.output, settings.train_length)
        print(f"sb-eval sweep: wrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    if interrupted:
        print("sb-eval sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if failed:
        print(f"sb-eval sweep: {len(failed)} point(s) ended in an error row (see {results_path}); "
              "running the command again retries them", file=sys.stderr)
        return 1
    return 0


def load_model(model: ModelSpec, settings: Settings):
    additional = {"batch_size": settings.batch_size, "max_batch_size": settings.max_batch_size, "device": settings.device}
    return model_class(model.name).create_from_arg_string(model.args, additional)


def close_model(lm) -> None:
    """Lets a model that holds resources beyond its weights release them (sb_hf: its
    attention_stats file is written a last time); lm-eval's own models have nothing to close."""
    close = getattr(lm, "close", None)
    if callable(close):
        close()


def evaluate_point(lm, point: Point, loader: TaskLoader, settings: Settings, versions: dict) -> dict | None:
    """The point's row: its metrics, or the error it raised. None in processes other than rank
    0 of a data-parallel run, where lm-eval returns no results."""
    start = time.perf_counter()
    try:
        check_max_length(lm, point)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[point.task],
            task_manager=loader.manager_with(point_metadata(point, settings)),
            limit=settings.limit,
            gen_kwargs=settings.gen_kwargs or None,
            log_samples=False,
        )
        if results is None:
            return None
        return result_row(point, settings, versions, results, time.perf_counter() - start, str(getattr(lm, "device", "")))
    except Exception as error:  # out of memory, a sample that fails, ...: recorded, and the sweep goes on
        seconds = time.perf_counter() - start
        free_memory()
        logger.warning("%s %s at %d tokens failed: %s: %s", point.model.key, point.task, point.length,
                       type(error).__name__, error)
        return error_row(point, settings, versions, error, seconds, "evaluating")


class MaxLengthError(ValueError):
    """A model whose max_length is below a point's length: lm-eval would cut its prompts."""


def check_max_length(lm, point: Point) -> None:
    """lm-eval's HFLM cuts longer prompts from the left to max_length, silently; lm-eval's `hf`
    takes max_length from the checkpoint's max_position_embeddings (the training length for
    most). A point longer than that would be scored on its prompts' ends, so it becomes an error
    row instead. Lengths are compared as the task counts them: `mqrar` counts symbols, a few
    tokens each, so its prompts can outgrow a max_length this check lets through."""
    max_length = getattr(lm, "max_length", None)
    if isinstance(max_length, int) and max_length < point.length:
        raise MaxLengthError(
            f"{point.model.name}'s max_length is {max_length}, below this point's {point.length} tokens, so lm-eval "
            f"would cut its prompts from the left; pass max_length={point.length} (or more) in its model arguments"
        )


def free_memory() -> None:
    """Returns what a failed or finished evaluation held, so that the next point has it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def base_row(point: Point, settings: Settings, versions: dict, seconds: float) -> dict:
    return {
        "model_spec": point.model.key,
        "model": point.model.name,
        "model_args": point.model.args,
        "task": point.task,
        "length": point.length,
        "metadata": settings.metadata,
        "limit": settings.limit,
        "gen_kwargs": settings.gen_kwargs,
        "seconds": round(seconds, 3),
        "versions": versions,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def result_row(point: Point, settings: Settings, versions: dict, results: dict, seconds: float, device: str) -> dict:
    """The task's (or group's) metrics from lm-eval's results; a group's subtasks' metrics beside."""
    if point.task not in results["results"]:
        raise RuntimeError(f"lm-eval returned no results for {point.task}; it returned {sorted(results['results'])}")
    metrics, stderr = split_metrics(results["results"][point.task])
    subtasks = {name: split_metrics(results["results"][name])[0]
                for name in results.get("group_subtasks", {}).get(point.task, []) if name in results["results"]}
    samples = sum(int(counts.get("effective", 0)) for counts in results.get("n-samples", {}).values())
    return base_row(point, settings, versions, seconds) | {
        "metrics": metrics,
        "stderr": stderr,
        "subtasks": subtasks,
        "samples": samples,
        "task_version": results.get("versions", {}).get(point.task),
        "device": device,
        "batch_size": settings.batch_size,
    }


def split_metrics(entry: dict) -> tuple[dict[str, float | None], dict[str, float]]:
    """lm-eval's {"4096,none": 87.5, "4096_stderr,none": 1.2, "alias": ...} -> metrics {"4096":
    87.5} and standard errors {"4096": 1.2}; a filter other than "none" stays in the name
    ("acc,strict"); non-numbers (aliases, "N/A" errors) are left out, non-finite values become None."""
    metrics: dict[str, float | None] = {}
    stderr: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        base = metric.removesuffix("_stderr")
        name = base if filter_name == "none" else f"{base},{filter_name}"
        if base != metric:
            if math.isfinite(value):
                stderr[name] = value
        else:
            metrics[name] = value if math.isfinite(value) else None
    return metrics, stderr


def error_row(point: Point, settings: Settings, versions: dict, error: BaseException, seconds: float, stage: str) -> dict:
    trace = "".join(traceback.format_exception(error))
    return base_row(point, settings, versions, seconds) | {
        "error": {"type": type(error).__name__, "message": str(error), "stage": stage,
                  "traceback": trace[-TRACEBACK_CHARS:]},
    }


def installed_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("sb-eval", "lm_eval", "torch", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
