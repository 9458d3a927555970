"""qlora_lab.runner and qlora_lab.results: profiles, records, failures named by cell."""

import json
import os

import nbformat
import pytest

from qlora_lab import record, runner
from qlora_lab.results import read_results, to_jsonable


def _notebook(path, *cells):
    params = nbformat.v4.new_code_cell('profile = "auto"\noverrides = {}\n'
                                       'PROFILES = {"smoke": {"n": 2}, "cpu": {"n": 3}, "gpu": {"n": 4}}')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params] + [nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_profile_settings():
    profiles = {"smoke": {"steps": 2}, "cpu": {"steps": 200}, "gpu": {"steps": 500}}
    assert runner.profile_settings(profiles, "smoke").steps == 2
    assert runner.profile_settings(profiles, "cpu", {"steps": 7}).steps == 7
    assert runner.profile_settings(profiles, "auto").profile in ("cpu", "gpu")
    os.environ["QLORA_LAB_PROFILE"] = "smoke"
    try:
        assert runner.profile_settings(profiles, "auto").steps == 2
        assert runner.profile_settings(profiles, "cpu").steps == 200  # an explicit profile wins
    finally:
        del os.environ["QLORA_LAB_PROFILE"]
    with pytest.raises(ValueError, match="smoke"):
        runner.profile_settings(profiles, "fast")
    with pytest.raises(ValueError, match="stpes"):
        runner.profile_settings(profiles, "cpu", {"stpes": 3})


def test_to_jsonable():
    import numpy as np
    import torch

    assert to_jsonable({"a": np.float32(0.5), "b": (1, torch.tensor(2)), "c": np.bool_(True)}) == \
        {"a": 0.5, "b": [1, 2], "c": True}
    with pytest.raises(TypeError):
        to_jsonable(object())
    with pytest.raises(ValueError):
        record("not a name!", 1)


def test_run_records_results_and_summary(tmp_path):
    nb = _notebook(tmp_path / "01_ok.ipynb",
                   "from qlora_lab import record\nfrom qlora_lab.runner import profile_settings\n"
                   "P = profile_settings(PROFILES, profile, overrides)",
                   "record('n_steps', P.n)\nrecord('profile_used', P.profile)\nrecord('nested', {'a': [1, 2.5]})",
                   "import tqdm.notebook\nfrom qlora_lab import env\n"
                   "record('widget', [isinstance(b(range(1)), tqdm.notebook.tqdm) for b in (env.progress, env.auto_bar)])")
    headless_before = os.environ.get("QLORA_LAB_HEADLESS")
    summary = runner.run_notebooks([nb], "smoke", tmp_path / "runs", progress=False)
    entry = summary["notebooks"]["01_ok"]
    assert entry["status"] == "ok" and entry["error"] is None and entry["seconds"] > 0
    # in the runner's kernels a bar is text (a widget would be saved frozen at 0 %), where tqdm.auto picks the widget
    assert entry["results"].pop("widget") == [False, True] and os.environ.get("QLORA_LAB_HEADLESS") == headless_before
    assert entry["results"] == {"n_steps": 2, "profile_used": "smoke", "nested": {"a": [1, 2.5]}}
    on_disk = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    assert on_disk["profile"] == "smoke" and on_disk["notebooks"]["01_ok"]["results"]["n_steps"] == 2
    assert "| 01_ok | ok |" in (tmp_path / "runs" / "smoke" / "summary.md").read_text()
    assert read_results(tmp_path / "runs" / "smoke" / "01_ok.ipynb")["profile_used"] == "smoke"


def test_jobs_run_notebooks_at_once_but_the_device_memory_labs_alone(tmp_path, monkeypatch):
    """Three notebooks that each sleep 2 s: with jobs=2 the two ordinary ones overlap, the run-alone one does not."""
    cell = ("import time\nfrom qlora_lab import record\nstart = time.time()\ntime.sleep(2)\n"
            "record('span', [start, time.time()])")
    alone, a, b = (_notebook(tmp_path / f"{name}.ipynb", cell) for name in ("06_alone", "07_a", "08_b"))
    monkeypatch.setattr(runner, "RUN_ALONE", {"06_alone"})
    summary = runner.run_notebooks([a, alone, b], "smoke", tmp_path / "runs", progress=False, jobs=2)
    spans = {name: entry["results"]["span"] for name, entry in summary["notebooks"].items()}
    assert all(entry["status"] == "ok" for entry in summary["notebooks"].values())
    assert spans["07_a"][0] < spans["08_b"][1] and spans["08_b"][0] < spans["07_a"][1]  # overlapped
    assert spans["06_alone"][1] <= min(spans["07_a"][0], spans["08_b"][0])  # ran first, by itself
    with pytest.raises(ValueError, match="jobs"):
        runner.run_notebooks([a], "smoke", tmp_path / "runs", progress=False, jobs=0)


def test_failing_notebook_fails_the_run_and_names_the_cell(tmp_path, capsys):
    nb = _notebook(tmp_path / "02_bad.ipynb",
                   "from qlora_lab import record\nrecord('before_failure', 1)",
                   "x = 1\nraise RuntimeError('the lesson broke here')",
                   "record('after_failure', 2)")
    good = _notebook(tmp_path / "03_fine.ipynb", "from qlora_lab import record\nrecord('fine', True)")
    code = runner.main([str(nb), str(good), "--profile", "smoke", "--out", str(tmp_path / "runs"), "--no-progress"])
    assert code == 1
    summary = json.loads((tmp_path / "runs" / "smoke" / "summary.json").read_text())
    bad = summary["notebooks"]["02_bad"]
    assert bad["status"] == "failed"
    assert bad["error"]["ename"] == "RuntimeError" and "the lesson broke here" in bad["error"]["evalue"]
    assert "raise RuntimeError" in bad["error"]["source"]
    assert bad["results"] == {"before_failure": 1}  # what ran before the failure is kept
    assert summary["notebooks"]["03_fine"]["status"] == "ok"  # the run went on
    err = capsys.readouterr().err
    assert "02_bad failed in cell" in err and "raise RuntimeError('the lesson broke here')" in err


def test_fail_fast_and_unknown_setting(tmp_path):
    nb = _notebook(tmp_path / "04_x.ipynb", "from qlora_lab.runner import profile_settings\n"
                                            "P = profile_settings(PROFILES, profile, overrides)")
    other = _notebook(tmp_path / "05_y.ipynb", "pass")
    code = runner.main([str(nb), str(other), "--profile", "cpu", "--set", "typo=1", "--fail-fast",
                        "--out", str(tmp_path / "runs"), "--no-progress"])
    summary = json.loads((tmp_path / "runs" / "cpu" / "summary.json").read_text())
    assert code == 1 and "typo" in summary["notebooks"]["04_x"]["error"]["evalue"]
    assert "05_y" not in summary["notebooks"]


def test_find_notebooks_defaults_to_labs():
    found = runner.find_notebooks()
    assert found and all(p.parent.name == "labs" for p in found)
    with pytest.raises(FileNotFoundError):
        runner.find_notebooks(["labs/99_missing.ipynb"])
