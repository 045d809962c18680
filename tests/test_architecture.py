"""Project structure: the model library stays framework-free; CI runs the README's test command."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "optuna", "mlflow", "polars")


def _frameworks_loaded_by(module: str) -> list[str]:
    probe = (
        f"import sys, {module}; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({(*FRAMEWORKS, 'torch')!r})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return ast.literal_eval(result.stdout)


def test_model_library_imports_no_framework():
    assert _frameworks_loaded_by("mta_lab.model") == ["torch"]


def test_configs_and_sweep_files_are_read_without_torch_or_a_framework():
    """Parsing a sweep (what --dry-run and status do first) must not pay for torch, Lightning or MLflow."""
    assert _frameworks_loaded_by("mta_lab.config") == []
    assert _frameworks_loaded_by("mta_lab.sweep.spec") == []


def _imports(package: str, nested: bool) -> list[tuple[str, str]]:
    """(file name, import statement) of every module of ``mta_lab/<package>``: top-level imports, or
    also those inside functions and ``try`` blocks with ``nested``."""
    start = r"^\s*(from|import) " if nested else r"^(from|import) "
    return [
        (path.name, line.strip())
        for path in (ROOT / "mta_lab" / package).glob("*.py")
        for line in path.read_text().splitlines()
        if re.match(start, line)
    ]


def test_model_sources_import_only_torch_config_kernels_and_stdlib():
    """The model library knows tensors, configs and the kernels below it; no framework, no tracking."""
    allowed = re.compile(
        r"^(from|import) (__future__|torch|mta_lab\.(config|kernels|model)|math|logging|dataclasses|enum|"
        r"collections|typing)\b"
    )
    for name, line in _imports("model", nested=False):
        assert allowed.match(line), f"{name}: {line}"


def test_kernels_import_only_torch_triton_and_stdlib():
    """The kernels sit below the model library: they know tensors, not configs or modules."""
    allowed = re.compile(
        r"^(from|import) (__future__|torch|triton|mta_lab\.kernels|os|collections|dataclasses|functools|logging)\b"
    )
    for name, line in _imports("kernels", nested=True):
        assert allowed.match(line), f"{name}: {line}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.strip()
        for line in readme.splitlines()
        if "pytest" in line and line.strip().startswith(("python", "pip", "."))
    ]
    assert len(commands) == 1, "the README shows exactly one test command"
    assert commands[0] in (ROOT / ".ci" / "run").read_text()


LAYERS = (
    "config",
    "secrets",
    "infra",
    "kernels",
    "model",
    "data",
    "hf",
    "tasks",
    "assembly",
    "train",
    "bench",
    "sweep",
    "analysis",
    "cli",
)
"""mta_lab's rooms from the bottom up: each may import only those below it, never one above."""


def test_every_import_between_packages_points_down():
    rooms = {
        path.stem if path.parent.name == "mta_lab" else path.parent.name
        for path in (ROOT / "mta_lab").glob("*/")
    }
    rooms |= {
        path.stem for path in (ROOT / "mta_lab").glob("*.py") if path.stem not in ("__init__", "__main__")
    }
    assert rooms - {"__pycache__"} == set(LAYERS), "a new package needs its place in LAYERS"
    upward = []
    for path in (ROOT / "mta_lab").rglob("*.py"):
        inside = path.relative_to(ROOT / "mta_lab").parts
        room = inside[0].removesuffix(".py")
        for line in path.read_text().splitlines():
            found = re.match(r"^\s*(?:from|import) mta_lab\.(\w+)", line)
            if found and found.group(1) != room and LAYERS.index(found.group(1)) > LAYERS.index(room):
                upward.append(f"{'/'.join(inside)}: {line.strip()}")
    assert upward == []


def test_no_package_uses_another_packages_private_names():
    """A leading underscore is private to its package: other packages use what it exports."""
    offenders = []
    for path in (ROOT / "mta_lab").rglob("*.py"):
        room = path.relative_to(ROOT / "mta_lab").parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mta_lab."):
                source = node.module.split(".")[1]
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                if source != room and private:
                    offenders.append(f"{path.name}: from {node.module} import {', '.join(private)}")
    assert offenders == []
