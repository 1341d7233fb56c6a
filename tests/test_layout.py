"""The package's layout (docs/architecture.md): the checkout imports cleanly, imports do nothing
they are not asked for, arrows point one way, and the task YAMLs are their table's rendering."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sb_eval.harness import lm_eval_compat
from sb_eval.tasks import task_files

ROOT = Path(__file__).resolve().parent.parent
# Folder of the checkout -> the package its modules import as ("" for top-level modules).
PACKAGE_FOLDERS = {"sb_eval": "sb_eval", "kernels": "sb_eval.kernels", "ruler": "sb_eval.ruler", "tasks": "sb_eval.tasks", "plugin": ""}
# Which parts of the project each part may import (docs/architecture.md, "Layers"); a part may
# always import its own modules. `sb_eval_hook` is the lm-eval start-up hook (plugin/).
ALLOWED_IMPORTS = {
    "sb_eval": set(),
    "sb_eval.files": set(),
    "sb_eval.options": set(),
    "sb_eval.tokenization": set(),
    "sb_eval.kernels": set(),
    "sb_eval.ruler": {"sb_eval.files"},
    "sb_eval.data": {"sb_eval.ruler", "sb_eval.files"},
    "sb_eval.model": {"sb_eval.kernels", "sb_eval.tokenization", "sb_eval.files"},
    "sb_eval.analysis": {"sb_eval.model", "sb_eval.files"},
    "sb_eval.tasks": {"sb_eval.ruler", "sb_eval.data", "sb_eval.files", "sb_eval.options"},
    "sb_eval.training": {"sb_eval.model", "sb_eval.kernels", "sb_eval.ruler", "sb_eval.data", "sb_eval.tokenization", "sb_eval.files"},
    "sb_eval.reports": {"sb_eval.analysis", "sb_eval.files"},
    "sb_eval.harness": {"sb_eval.model", "sb_eval.analysis", "sb_eval.kernels", "sb_eval.data", "sb_eval.ruler", "sb_eval.tasks",
                        "sb_eval.reports", "sb_eval.files", "sb_eval.options", "sb_eval_hook"},
    "sb_eval.commands": {"sb_eval.harness", "sb_eval.analysis", "sb_eval.reports", "sb_eval.model", "sb_eval.data", "sb_eval.ruler",
                         "sb_eval.files", "sb_eval.options"},
    "sb_eval.cli": {"sb_eval.commands", "sb_eval.model", "sb_eval_hook"},
    "sb_eval_hook": set(),
}
HEAVY = ("torch", "transformers", "lm_eval.api", "datasets", "matplotlib")


def project_modules() -> dict[str, Path]:
    """Every module of the project by the name it imports as."""
    modules = {}
    for folder, package in PACKAGE_FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [part for part in path.relative_to(ROOT / folder).with_suffix("").parts if part != "__init__"]
            name = ".".join(([package] if package else []) + parts)
            if name != "build_with_pth":  # setuptools' build step, not imported at run time
                modules[name] = path
    return modules


def imported_names(name: str, path: Path) -> set[str]:
    """Every module name an import statement in the file mentions (at any depth: imports inside
    functions count), relative imports resolved; `from x import y` gives x and x.y."""
    found = set()
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(package + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: {target for target in imported_names(name, path) if target in modules and target != name}
            for name, path in modules.items()}


def part_of(module: str) -> str:
    """The layer a module belongs to: sb_eval.<sub-package> or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_arrows_point_one_way():
    graph = import_graph()
    assert set(map(part_of, graph)) <= set(ALLOWED_IMPORTS), "a part of the project that docs/architecture.md does not name"
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() for target in targets
        if part_of(target) != part_of(module) and part_of(target) not in ALLOWED_IMPORTS[part_of(module)]
    )
    assert not wrong, "imports against docs/architecture.md's layers:\n" + "\n".join(wrong)


def test_the_lm_eval_start_up_hook_and_ruler_import_only_the_standard_library_and_wonderwords():
    modules = project_modules()
    third_party = {}
    for name, path in modules.items():
        if name == "sb_eval_hook" or part_of(name) == "sb_eval.ruler":
            outside = {n.split(".")[0] for n in imported_names(name, path)} - set(sys.stdlib_module_names) - {"sb_eval", "wonderwords", "lm_eval"}
            if outside:
                third_party[name] = sorted(outside)
    assert not third_party
    # the hook touches lm-eval only inside the functions that run once lm-eval itself is imported
    hook = ast.parse(modules["sb_eval_hook"].read_text())
    assert not [node for node in hook.body if isinstance(node, (ast.Import, ast.ImportFrom)) and node.names[0].name != "sys"]


def python(code: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c code` in `cwd`, as a person would start it there."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def kernels_distribution(tmp_path) -> Path | None:
    """A folder to put on PYTHONPATH that holds a stand-in `kernels` distribution when the real one
    (which transformers depends on) is not installed; None when it is."""
    try:
        import importlib.metadata

        importlib.metadata.version("kernels")
        return None
    except importlib.metadata.PackageNotFoundError:
        pass
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    names = ["CUDAProperties", "Device", "LayerRepository", "Mode", "get_kernel", "kernelize", "register_kernel_mapping",
             "replace_kernel_forward_from_hub", "use_kernel_forward_from_hub", "use_kernelized_func", "LocalLayerRepository"]
    (site / "kernels" / "__init__.py").write_text("".join(f"class {n}: pass\n" for n in names) + '__version__ = "0.12.0"\n')
    info = site / "kernels-0.12.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.12.0\n")
    return site


def test_the_checkout_imports_cleanly_from_its_root(kernels_distribution):
    """Python started in the repository's root: the checkout's kernels/ must not shadow the
    `kernels` distribution that transformers imports, and the package's sub-packages beside
    sb_eval/ are found there too."""
    code = textwrap.dedent("""
        import sb_eval, transformers.integrations.hub_kernels
        import sb_eval.model, sb_eval.harness.stick_breaking_lm, sb_eval.kernels.attention
        import kernels
        print(kernels.__file__)
    """)
    result = python(code, ROOT, kernels_distribution)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()).parent != ROOT / "kernels"
    cli = subprocess.run([sys.executable, "-m", "sb_eval.cli", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert cli.returncode == 0 and "sweep" in cli.stdout, cli.stderr
    script = subprocess.run([sys.executable, "scripts/time_ruler.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert script.returncode == 0, script.stderr[-3000:]


def loaded_after(code: str) -> set[str]:
    result = python(code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))", ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(name for name in modules if name.split(".")[0] in ("torch", "transformers", "datasets", "matplotlib"))


def test_the_generators_load_neither_torch_nor_transformers():
    code = "import sb_eval.ruler.generate, sb_eval.ruler.mqrar, sb_eval.ruler.scoring"
    assert heavy(loaded_after(code)) == []


@pytest.mark.parametrize("command", [[], ["run"], ["data"], ["sweep"], ["distance"], ["attribution"], ["report"], ["checkpoint"]])
def test_help_of_every_command_loads_no_torch(command):
    code = f"from sb_eval.cli import main\ntry:\n    main({command + ['--help']!r})\nexcept SystemExit:\n    pass"
    assert heavy(loaded_after(code)) == []


def test_registration_with_transformers_happens_where_the_model_is_defined():
    assert "stickbreaking" not in json.dumps(sorted(loaded_after("import sb_eval\nfrom transformers import AutoConfig")))
    registered = python(
        "import sb_eval.model.modeling\nfrom transformers import AutoConfig\nprint(AutoConfig.for_model('stickbreaking').model_type)", ROOT
    )
    assert registered.returncode == 0 and registered.stdout.strip() == "stickbreaking", registered.stderr[-2000:]
    unregistered = python("import sb_eval.ruler.generate\nfrom transformers import AutoConfig\nAutoConfig.for_model('stickbreaking')", ROOT)
    assert unregistered.returncode != 0 and "stickbreaking" in unregistered.stderr


def test_a_checkpoint_folder_is_checked_once_per_load(tmp_path, monkeypatch):
    from sb_eval.harness.stick_breaking_lm import StickBreakingLM
    from sb_eval.model import checks
    from sb_eval.model.configuration import tiny_config
    from sb_eval.model.saving import write_random_checkpoint

    folder = write_random_checkpoint(tmp_path / "ckpt", tiny_config(n_layer=1, n_embd=32, n_inner=64))
    reads = []
    read_config = checks.read_config
    monkeypatch.setattr(checks, "read_config", lambda path: reads.append(path) or read_config(path))
    StickBreakingLM(pretrained=str(folder), device="cpu")
    assert reads == [folder]


def test_the_task_yamls_are_the_rendering_of_their_table():
    stale = [name for name, text in task_files.render().items() if (task_files.FOLDER / name).read_text() != text]
    assert not stale, f"{stale} differ from tasks/task_files.py's table: run python -m sb_eval.tasks.task_files"
    rendered = set(task_files.render())
    on_disk = {path.name for path in task_files.FOLDER.glob("*.yaml")}
    assert on_disk == rendered, f"YAMLs no entry of the table renders: {sorted(on_disk - rendered)}"


@pytest.mark.parametrize("version", ["0.4.12", "0.5.0", "1.0.0"])
def test_an_lm_eval_it_was_not_written_for_is_named(version, monkeypatch):
    with pytest.raises(lm_eval_compat.UnsupportedLmEvalError, match=rf"lm-eval {version} is installed.*pip install 'lm_eval\[hf\]>=0\.4\.13,<0\.5\.0'"):
        lm_eval_compat.require_supported_lm_eval(version)
    # sb_hf and the sweep's task index check it before using lm-eval's internals
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "lm_eval" else real_version(name))
    from sb_eval.harness.stick_breaking_lm import StickBreakingLM
    from sb_eval.harness.sweep import TaskLoader

    with pytest.raises(lm_eval_compat.UnsupportedLmEvalError):
        StickBreakingLM(device="cpu")
    with pytest.raises(lm_eval_compat.UnsupportedLmEvalError):
        TaskLoader(["sb_niah_single_1"], [])


def test_the_supported_lm_eval_is_installed():
    lm_eval_compat.require_supported_lm_eval()
