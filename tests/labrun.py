"""Run one lab notebook under a profile through the runner, as the tests do; returns its results.

Each lab's test file calls `run_lab("NN_topic")` and asserts on what the notebook recorded
with qlora_lab.record. Executed copies and summary.json land in runs/<profile>/, the same
place `python -m qlora_lab run` writes them, so a failing test leaves the executed notebook
to look at.
"""

from qlora_lab import paths, runner

RUNS = paths.REPO_ROOT / "runs"


def run_lab(stem: str, profile: str = "smoke", overrides: dict | None = None) -> dict:
    """Execute labs/<stem>.ipynb; fail with the failing cell's source and traceback, else return results."""
    path = paths.LABS_DIR / f"{stem}.ipynb"
    entry = runner.run_notebook(path, profile, RUNS / profile, overrides=overrides, progress=False)
    summary = runner.load_summary(RUNS / profile, profile)
    summary["notebooks"][stem] = entry
    runner.write_summary(summary, RUNS / profile)
    assert entry["status"] == "ok", runner.format_error(stem, entry["error"])
    assert entry["results"].get("profile") == profile, f"{stem} did not start with runner.start_lab(...)"
    return entry["results"]


def run_labs(stems: list[str], profile: str, jobs: int = 1) -> dict[str, dict]:
    """Execute several labs (up to `jobs` at once, see runner.run_notebooks); returns their summary entries."""
    notebooks = [paths.LABS_DIR / f"{stem}.ipynb" for stem in stems]
    summary = runner.run_notebooks(notebooks, profile, RUNS, progress=False, jobs=jobs)
    return {stem: summary["notebooks"][stem] for stem in stems}
