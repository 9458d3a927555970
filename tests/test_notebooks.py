"""The lab notebooks: committed clean, well-formed, and each runs under the smoke profile.

Each notebook runs in a fresh kernel through the runner (papermill), exactly as
`python -m qlora_lab run --profile smoke` does; the assertions read what the notebook
recorded with qlora_lab.record, never its printed text. Executed copies land in runs/smoke/.
"""

import json
from pathlib import Path

import nbformat
import pytest

from qlora_lab import runner

LABS = sorted(runner.LABS_DIR.glob("[0-9][0-9]_*.ipynb"))
RUNS = runner.REPO_ROOT / "runs"


def _read(path: Path):
    return nbformat.read(str(path), as_version=4)


def test_there_are_labs():
    assert [p.stem[:2] for p in LABS] == [f"{i:02d}" for i in range(len(LABS))]


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path):
    nb = _read(path)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs (make clean-notebooks)"
    assert "widgets" not in nb.metadata, f"{path.name}: committed widget state"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    cells = _read(path).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith(f"# {path.stem[:2]} ")
    assert "What you will" in cells[0].source or "you will" in cells[0].source
    colab = cells[1]
    assert colab.cell_type == "code" and 'if "google.colab" in sys.modules:' in colab.source
    assert "qlora-lab @ git+https://github.com/qlora-lab/qlora-lab" in colab.source
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and cells.index(params[0]) == 2
    namespace = {}
    exec(params[0].source, namespace)  # the parameters cell is plain Python
    assert namespace["profile"] == "auto" and namespace["overrides"] == {}
    assert set(namespace["PROFILES"]) == set(runner.PROFILE_NAMES)
    keys = [set(v) for v in namespace["PROFILES"].values()]
    assert all(k == keys[0] for k in keys), "every profile defines the same settings"
    setup = cells[3].source
    assert "profile_settings(PROFILES, profile, overrides)" in setup and "env.report()" in setup


# What each notebook must have recorded under the smoke profile.
def check_00(r):
    assert r["model_source"] in ("default", "random") and r["bnb_backend"] == "CPU" and r["cuda"] is False
    assert r["params_total"] == 134_515_008
    assert r["footprint_bytes"] < r["params_total"] * 2 * 0.5  # 4-bit: well under half of bf16
    assert isinstance(r["generation"], str) and r["generation"]


CHECKS = {"00_environment": check_00}


@pytest.mark.notebooks
@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_notebook_runs_under_smoke_profile(path):
    entry = runner.run_notebook(path, "smoke", RUNS / "smoke", progress=False)
    summary = runner.load_summary(RUNS / "smoke", "smoke")
    summary["notebooks"][path.stem] = entry
    runner.write_summary(summary, RUNS / "smoke")
    assert entry["status"] == "ok", runner.format_error(path.stem, entry["error"])
    assert path.stem in CHECKS, f"add a check of {path.stem}'s recorded results to CHECKS"
    CHECKS[path.stem](entry["results"])
