"""The README's section on what the shipped sweeps show is generated, never typed: it must be what
``scripts/small_scale_results.py`` renders from its stored measurements, and the renderer must put each
sweep's verdicts and the paper's numbers in it without touching the rest of the README."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "small_scale_results.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("small_scale_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured(name: str, rows: list[dict]) -> dict:
    return {"sweep": name, "base": "tiny", "budget": "100 steps",
            "metric": "val/loss", "goal": "minimize", "seeds": 3, "runs": 6, "finished": 6,
            "seconds": {"sweep": 100.0, "report": 25.4}, "rows": rows, "measured": "2026-12-02",
            "commit": "abc1234", "cores": 2}  # fmt: skip


def test_the_readme_section_is_the_rendered_measurements(script):
    import json

    results = json.loads(script.RESULTS.read_text())
    text = (ROOT / "README.md").read_text()
    assert script.BEGIN in text and script.END in text
    section = text[text.index(script.BEGIN) : text.index(script.END) + len(script.END)] + "\n"
    assert section == script.render(results), "run `python scripts/small_scale_results.py --render`"


def test_render_states_verdicts_timing_and_the_paper(script, tmp_path, monkeypatch):
    rows = [
        {"variant": "baseline", "mean": 0.79, "delta": None, "delta_low": None, "delta_high": None,
         "p_holm": None, "verdict": "baseline"},
        {"variant": "mta", "mean": 0.025, "delta": -0.7, "delta_low": -0.75, "delta_high": -0.65,
         "p_holm": 0.0004, "verdict": "better"},
    ]  # fmt: skip
    section = script.render({"toy_block": measured("toy_block", rows)})
    block = section[section.index("### `toy_block`") :].split("### ")[1]
    assert "| mta | 0.025 | -0.7 [-0.75, -0.65] | <0.001 | better |" in block
    assert "sweep and report took 2 min 05 s" in block and "6 runs of `tiny`" in block
    assert "*The paper:* Table 1" in block and "51.6" in block  # toy_block.yaml's paper field
    assert "not measured yet" in section.split("### `kernel_size`")[1].split("### ")[0]

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{script.BEGIN}\nOLD-SECTION-TEXT\n{script.END}\n\n## after\n")
    monkeypatch.setattr(script, "README", readme)
    script.write_readme(section)
    text = readme.read_text()
    assert (
        text.startswith("# title\n\nbefore\n\n")
        and text.endswith("\n## after\n")
        and "OLD-SECTION-TEXT" not in text
    )
    assert text.count(script.BEGIN) == 1
