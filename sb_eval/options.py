"""Strict reading of options given as text (lm-eval's --model_args, --metadata): booleans that mean
what they say, and names checked against the ones that exist, with the nearest suggested.

lm-eval turns "True"/"False" in --model_args into booleans and leaves every other word a string,
so `allow_pickle=no` arrives as "no", which Python's bool() reads as True. Standard library only.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


def parse_bool(value: Any, name: str) -> bool:
    """`value` as a boolean: True/False, 1/0, or the words true/false, 1/0, yes/no in any case;
    anything else is a ValueError naming `name`."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"{name}={value!r} is not a boolean; write true or false (also 1/0, yes/no)")


def check_known(given: Iterable[str], valid: Iterable[str], what: str, also_accepted: Iterable[str] = ()) -> None:
    """Raises ValueError for the first name in `given` that is neither in `valid` nor in
    `also_accepted`, listing `valid` (what `what` takes) and the nearest of them."""
    valid = sorted(set(valid))
    accepted = set(valid) | set(also_accepted)
    for name in given:
        if name not in accepted:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{what} has no setting {name!r}.{hint} Valid: {', '.join(valid)}")


@cache
def model_argument_names() -> frozenset[str]:
    """Every name lm-eval's models take as a model argument, sb_hf's own, and the keyword
    arguments transformers' from_pretrained reads: read from their source files (nothing is
    imported), so that task metadata, into which lm-eval merges --model_args, can tell a model
    argument from a misspelt task setting."""
    names = set(from_pretrained_argument_names())
    for package in ("lm_eval.models", "sb_eval.harness"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in Path(folder).glob("*.py"):
                names |= _init_parameters(path)
    return frozenset(names)


@cache
def from_pretrained_argument_names() -> frozenset[str]:
    """The keyword arguments transformers' PreTrainedModel.from_pretrained takes or reads."""
    loading = importlib.util.find_spec("transformers.modeling_utils")
    if loading is None or not loading.origin:
        return frozenset()
    return frozenset(_keyword_reads(Path(loading.origin), "from_pretrained"))


def _init_parameters(path: Path) -> set[str]:
    """Parameter names of every __init__ in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            arguments = node.args
            names |= {arg.arg for arg in arguments.posonlyargs + arguments.args + arguments.kwonlyargs} - {"self"}
    return names


def _keyword_reads(path: Path, function: str) -> set[str]:
    """The string keys a function reads out of its **kwargs (kwargs.pop("x") / kwargs.get("x")),
    and its parameter names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            arguments = node.args
            names |= {arg.arg for arg in arguments.args + arguments.kwonlyargs}
            for call in ast.walk(node):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in ("pop", "get")
                        and isinstance(call.func.value, ast.Name) and call.func.value.id == "kwargs"
                        and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                    names.add(call.args[0].value)
    return names
