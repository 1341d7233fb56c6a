"""Makes lm-eval find sb-eval's `sb_hf` model and task folder, with no import of sb-eval itself.

lm-eval 0.4.13 has no plugin discovery, so sb-eval's wheel installs `sb_eval_hook.pth`, which
imports this module at interpreter start-up. It only places an import hook (microseconds); when
lm-eval's model registry or task manager is first imported, it registers `sb_hf` as a lazy
placeholder and adds the installed task folder to every TaskManager, so that
`lm_eval --model sb_hf --tasks ruler_niah` works as installed and `--model hf` keeps working.
"""

import sys

MODEL_NAME = "sb_hf"
MODEL_TARGET = "sb_eval.harness.stick_breaking_lm:StickBreakingLM"


def _register_model(registry) -> None:
    # Populate lm-eval's own models first: its get_model() imports them only into an empty
    # registry, so registering ours alone would hide `hf` and the rest.
    import lm_eval.models  # noqa: F401

    if MODEL_NAME not in registry.model_registry:
        registry.model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def task_folder():
    """sb-eval's task YAMLs: the folder of the package sb_eval.tasks (inside sb_eval in a wheel,
    the checkout's tasks/ otherwise). Finding it imports sb_eval's __init__ alone, which is light."""
    from importlib.util import find_spec
    from pathlib import Path

    spec = find_spec("sb_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _add_task_folder(manager) -> None:
    original_init = manager.TaskManager.__init__

    def __init__(self, verbosity=None, include_path=None, *args, **kwargs):
        folder = task_folder()
        if folder is not None and folder.is_dir():
            paths = [] if include_path is None else (
                list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
            )
            if str(folder) not in map(str, paths):
                include_path = [folder, *paths]  # later paths override: the user's win
        original_init(self, verbosity, include_path, *args, **kwargs)

    manager.TaskManager.__init__ = __init__


_AFTER_IMPORT = {"lm_eval.api.registry": _register_model, "lm_eval.tasks.manager": _add_task_folder}


class _AfterImportHook:
    """A meta path finder that runs a function right after certain modules finish executing."""

    def find_spec(self, name, path=None, target=None):
        if name not in _AFTER_IMPORT:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module):
            run_module(module)
            _AFTER_IMPORT[name](module)

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Places the hook once; modules imported before it get their registration now."""
    if any(isinstance(finder, _AfterImportHook) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImportHook())
    for name, register in _AFTER_IMPORT.items():
        if name in sys.modules:
            register(sys.modules[name])


install()
