"""Record a notebook's key results so the runner and the tests can read them back.

Inside a lab: `record("accuracy_after", 0.83)`. The value is shown in the notebook as a
line of text and also stored as a display output with its own MIME type, so the executed
notebook itself carries its results: `read_results(executed_notebook)` gets them back, and
the runner puts them in `runs/<profile>/summary.json`. Tests assert on these values, never
on printed text.

Values must be JSON-like: numbers, strings, bools, None, and lists/dicts of them; numpy
and torch scalars (and one-element tensors) are converted.
"""

import json
import math
import re
import warnings

RESULT_MIME = "application/vnd.qlora-lab.result+json"  # output MIME type that carries {name: value}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_recorded: dict = {}  # this process's records, for code that runs outside a notebook


def to_jsonable(value):
    """Convert numpy/torch scalars and containers to plain JSON values.

    Example: to_jsonable({"a": np.float32(0.5), "b": (1, 2)}) -> {"a": 0.5, "b": [1, 2]}
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(value.tolist())
    if hasattr(value, "item"):
        return to_jsonable(value.item())
    raise TypeError(f"record() takes JSON-like values; got {type(value).__name__}: {value!r}")


def record(name: str, value):
    """Record one named result of this notebook run and show it (returns None, so a notebook
    does not echo the value a second time when record is a cell's last line).

    Example: record("accuracy_after", 0.83)  # shows "recorded accuracy_after = 0.83"
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"a result name is an identifier-like string (letters, digits, _ . -), got {name!r}")
    value = to_jsonable(value)
    json.dumps(value)  # fail here, not in the runner
    _recorded[name] = value
    text = json.dumps(value)
    text = text if len(text) <= 120 else text[:117] + "..."
    try:  # IPython is optional: record() also works in a plain script
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display({RESULT_MIME: {name: value}, "text/plain": f"recorded {name} = {text}"}, raw=True)
    else:
        print(f"recorded {name} = {text}")


def recorded() -> dict:
    """What this process has recorded so far (a copy)."""
    return dict(_recorded)


def read_results(notebook) -> dict:
    """All values recorded in an executed notebook (an nbformat node or a path), later ones winning.

    Example: read_results("runs/smoke/05_qlora_finetune.ipynb")["accuracy_after"] -> 0.9
    """
    if not hasattr(notebook, "cells"):
        import nbformat  # here: `import qlora_lab` (which imports this module) stays cheap and dependency-free

        with warnings.catch_warnings():  # papermill's copies may lack cell ids; irrelevant here
            warnings.simplefilter("ignore")
            notebook = nbformat.read(str(notebook), as_version=4)
    results = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if RESULT_MIME in data:
                payload = data[RESULT_MIME]
                results.update(json.loads(payload) if isinstance(payload, str) else payload)
    return results
