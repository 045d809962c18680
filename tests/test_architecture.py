"""Project structure: the model library stays framework-free; CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "pytorch_lightning", "optuna", "mlflow", "polars")


def test_model_library_imports_no_framework():
    probe = (
        "import sys, mta_lab.model; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_model_sources_import_only_torch_config_and_stdlib():
    allowed = re.compile(
        r"^(from|import) (__future__|torch|mta_lab\.config|mta_lab\.model|math|logging|dataclasses|collections|typing)\b"
    )
    for path in (ROOT / "mta_lab" / "model").glob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"^(from|import) ", line):
                assert allowed.match(line), f"{path.name}: {line}"


def test_kernels_import_only_torch_triton_and_stdlib():
    """The fused path sits below the model library: it knows tensors, not configs or modules."""
    allowed = re.compile(
        r"^(from|import) (__future__|torch|triton|mta_lab\.kernels|os|collections|dataclasses)\b"
    )
    for path in (ROOT / "mta_lab" / "kernels").glob("*.py"):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(from|import) ", line):
                assert allowed.match(line.strip()), f"{path.name}: {line}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.strip()
        for line in readme.splitlines()
        if "pytest" in line and line.strip().startswith(("python", "pip", "."))
    ]
    assert len(commands) == 1, "the README shows exactly one test command"
    assert commands[0] in (ROOT / ".ci" / "run").read_text()
