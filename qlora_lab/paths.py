"""Where the lab keeps things, and the one way it writes them.

    REPO_ROOT, LABS_DIR, DATA_DIR   the checkout (when the package runs from one)
    cache_dir()                     converted models, tokenizers, sweeps, lab 05's runs: $QLORA_LAB_CACHE
                                    or ~/.cache/qlora_lab
    atomic_write_text(path, text)   a file that is either the old one or the whole new one, never half
    atomic_dir(path)                the same for a directory: fill a temporary one, rename it into place

An interrupted write (Ctrl-C, a killed kernel, a full disk) leaves at most a stray
`.partial` file or directory that nothing reads, never a half-written result a later run
would trust. Shortcut: no locking; two writers of the same path both succeed and the last
rename wins (for directories, the first one in place is kept).
"""

import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the checkout holding labs/, data/, tests/
LABS_DIR = REPO_ROOT / "labs"  # the lab notebooks
DATA_DIR = REPO_ROOT / "data"  # the shipped task data


def cache_dir() -> Path:
    """Where converted checkpoints, tokenizers and cached runs live.

    Example: cache_dir() -> PosixPath('/home/me/.cache/qlora_lab')  (or $QLORA_LAB_CACHE)
    """
    return Path(os.environ.get("QLORA_LAB_CACHE", Path.home() / ".cache" / "qlora_lab"))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text to path through a temporary file beside it, renamed into place.

    Example: atomic_write_text("runs/summary.json", "{}") -> PosixPath('runs/summary.json')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")  # one per writer
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_stale_partials(directory: str | Path, older_than_s: float = 3600) -> list[Path]:
    """Delete `.partial` files and directories that interrupted writes left in a directory more than
    `older_than_s` seconds ago (a running writer's are younger); returns what was removed.

    Example: remove_stale_partials(cache_dir()) -> [PosixPath('.../.smollm2-135m-instruct-....partial')]
    """
    removed = []
    for stale in Path(directory).glob(".*.partial"):
        if time.time() - stale.stat().st_mtime > older_than_s:
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


@contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary directory beside `path`; on success rename it to `path`.

    If another process put a complete `path` in place meanwhile, theirs is kept. On an
    error the temporary directory is removed and `path` is left as it was.
    Example: with atomic_dir(cache_dir() / "bpe-4096") as tmp: tokenizer.save_pretrained(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:  # `path` exists: another writer finished first
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
