"""The models a measuring command runs side by side (`sb-eval distance`, `sb-eval attribution`):
`--compare NAME:ARGS` parsed, each model's model_args checked (a local folder, a usable device)
and given --device and --dtype, and the labels that name each model's files."""

from __future__ import annotations

import re
from pathlib import Path

from lm_eval.utils import simple_parse_args_string

from .sweep import ModelSpec, model_class, parse_device, split_model_spec

MODELS = ("sb_hf", "hf")


def parse_compare(spec: str, error: type[Exception]) -> ModelSpec:
    """--compare NAME:ARGS with NAME one of MODELS; raises `error` naming what is valid."""
    model = split_model_spec(spec)
    if model is None or model.name not in MODELS:
        raise error(
            f"--compare {spec!r} must be NAME:ARGS with NAME one of {', '.join(MODELS)}, e.g. "
            "hf:pretrained=/path/to/softmax-model or sb_hf:pretrained=/path/to/checkpoint"
        )
    return model


def local_model_arguments(model: ModelSpec, device: str | None, dtype: str | None, error: type[Exception]) -> dict:
    """The model's constructor arguments: its model_args, whose pretrained must be a local folder
    (sb_hf may leave it out for the default checkpoint), with the device (default: cuda where
    there is one) and dtype applied. Raises `error` for arguments that cannot work."""
    try:
        arguments = simple_parse_args_string(model.args)
    except ValueError as problem:
        raise error(f"model arguments {model.args!r} of {model.name}: {problem}") from None
    if "pretrained" not in arguments and model.name != "sb_hf":
        raise error(f"model arguments {model.args!r} of {model.name} need pretrained=PATH")
    if "pretrained" in arguments and not Path(str(arguments["pretrained"])).expanduser().is_dir():
        raise error(
            f"pretrained={arguments['pretrained']} of {model.name} is not a local folder; sb-eval downloads "
            "nothing: save the model to a folder first and pass that folder"
        )
    arguments["device"] = parse_device(device, error)
    if dtype:
        arguments["dtype"] = dtype
    return arguments


def load_model(model: ModelSpec, arguments: dict):
    """An lm-eval model object, built as `lm_eval --model NAME --model_args ...` would build it."""
    return model_class(model.name)(**arguments)


def file_labels(models: list[ModelSpec]) -> list[str]:
    """File-name labels NAME-FOLDER (sb_hf without pretrained: NAME-default_model), numbered
    where two models would share one."""
    names = []
    for model in models:
        pretrained = simple_parse_args_string(model.args).get("pretrained")
        folder = Path(str(pretrained)).expanduser().resolve().name if pretrained else "default_model"
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model.name}-{folder}").strip("-")
        names.append(label if label not in names else f"{label}-{len(names) + 1}")
    return names
