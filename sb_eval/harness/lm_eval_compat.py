"""Every use of lm-eval's private names, in one place, for the lm-eval versions it was written for.

sb-eval relies on four things lm-eval does not promise: the task index a TaskManager builds
(`lm_eval.tasks._index`: an entry's kind, config, YAML path and tags), the TaskFactory a manager
holds in `_factory` (which fixes the metadata its tasks receive), the layout of its own task
folder (YAMLs naming tasks, groups and tags), and HFLM's underscored methods that `sb_hf` overrides (`_loglikelihood_tokens`, `_create_model`; HFLM's docstrings invite
subclasses to override them). `require_supported_lm_eval` checks the installed version before any
of them is used, so that an lm-eval they were not written for fails with a message that says so
rather than deep inside a run.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import re
from functools import cache
from pathlib import Path
from typing import Any

# The lm-eval releases these uses were written and tested for: [first, last) as release numbers.
SUPPORTED_LM_EVAL = ((0, 4, 13), (0, 5, 0))


class UnsupportedLmEvalError(RuntimeError):
    """The installed lm-eval is outside SUPPORTED_LM_EVAL."""


def require_supported_lm_eval(version: str | None = None) -> None:
    """Raises UnsupportedLmEvalError unless lm-eval's `version` (default: the installed one) is in
    SUPPORTED_LM_EVAL."""
    version = version or importlib.metadata.version("lm_eval")
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    first, last = SUPPORTED_LM_EVAL
    if not first <= numbers < last:
        raise UnsupportedLmEvalError(
            f"sb-eval works with lm-eval {_release(first)} up to (not including) {_release(last)}, and lm-eval "
            f"{version} is installed; it relies on parts of lm-eval that may have changed since (its task index, "
            f"task factory and HFLM's methods). Install a supported one: pip install 'lm_eval[hf]>={_release(first)},"
            f"<{_release(last)}'"
        )


def _release(numbers: tuple[int, ...]) -> str:
    return ".".join(map(str, numbers))


def task_index(manager) -> dict[str, Any]:
    """A TaskManager's index: task, group and tag names -> entries (read with the functions below)."""
    require_supported_lm_eval()
    return manager.task_index


def is_group(entry) -> bool:
    from lm_eval.tasks._index import Kind

    return entry.kind is Kind.GROUP


def is_tag(entry) -> bool:
    from lm_eval.tasks._index import Kind

    return entry.kind is Kind.TAG


def group_members(entry) -> list[str]:
    """The task and group names a group's YAML lists (inline task configs left out)."""
    members = (entry.cfg or {}).get("task", [])
    return [member for member in (members if isinstance(members, list) else [members]) if isinstance(member, str)]


def yaml_path(entry) -> Path | None:
    return entry.yaml_path


def tags(entry) -> set[str]:
    return entry.tags


# A name a task YAML gives: `task: x`, `group: x`, `tag: x`, or an item of a `tag:` list.
_NAME_LINE = re.compile(r"""^["']?(?:task|group|tag)["']?:[ \t]*["']?([^\s"'\[#{]+)["']?[ \t]*$""", re.MULTILINE)
_TAG_LIST = re.compile(r"""^["']?tag["']?:[ \t]*\n((?:[ \t]*-[ \t]*\S+[ \t]*\n)+)""", re.MULTILINE)


@cache
def quick_task_names() -> frozenset[str]:
    """The names lm-eval's own task YAMLs give to tasks, groups and tags, read with regular
    expressions in a second (building its index, which parses every YAML, can take a minute).
    Every task and group of lm-eval 0.4.13 is found; some tags given in nested lists are not,
    which a sweep refuses anyway (a tag has no result of its own)."""
    require_supported_lm_eval()
    spec = importlib.util.find_spec("lm_eval.tasks")
    names: set[str] = set()
    for folder in spec.submodule_search_locations or []:
        for path in Path(folder).rglob("*yaml*"):  # templates included by others are named like _default_template_yaml
            text = path.read_text(encoding="utf-8", errors="replace")
            names.update(name.strip("'\"") for name in _NAME_LINE.findall(text))
            for block in _TAG_LIST.findall(text):
                names.update(line.split("-", 1)[1].strip().strip("'\"") for line in block.splitlines())
    return frozenset(names)


def manager_with_metadata(manager, metadata: dict[str, Any]):
    """A copy of `manager` (its index shared, not rebuilt) whose tasks receive `metadata`: a manager
    fixes its metadata in its task factory when it is made."""
    require_supported_lm_eval()
    from lm_eval.tasks._factory import TaskFactory

    copied = copy.copy(manager)
    copied.metadata = metadata
    copied._factory = TaskFactory(meta=metadata)
    return copied
