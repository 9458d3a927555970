"""Shared test setup: a tiny architecture shape for fast model tests; the GPU suite's notebooks run once."""

import os

import pytest
import torch

from qlora_lab import shapes

TINY = shapes.Arch("llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=4096, tied=True,
                   max_positions=256)


@pytest.fixture
def tiny_shape(monkeypatch):
    """Registers 'tiny' (2 layers, hidden 64, vocab 4096) as a random: shape for this test."""
    monkeypatch.setitem(shapes.ARCHITECTURES, "tiny", TINY)
    return "tiny"


@pytest.fixture(autouse=True)
def _few_threads():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-test` on a GPU machine); this one has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# How many lab notebooks the GPU suite runs at once (labs 01 and 06, which read device-level
# memory, always run alone): small models are launch-bound, so sharing the GPU overlaps well (8: all the others at once).
GPU_JOBS = int(os.environ.get("QLORA_LAB_GPU_JOBS", "8"))


@pytest.fixture(scope="session")
def gpu_lab(request):
    """Runs the gpu profile of every lab whose selected test is marked @pytest.mark.lab("<stem>"),
    all in one go (GPU_JOBS at a time), the first time a test asks; returns stem -> recorded results."""
    from labrun import run_labs

    from qlora_lab import runner

    stems = sorted({marker.args[0] for item in request.session.items if "gpu_lab" in item.fixturenames
                    for marker in item.iter_markers("lab")})
    entries = run_labs(stems, "gpu", jobs=GPU_JOBS)

    def results(stem: str) -> dict:
        entry = entries[stem]
        assert entry["status"] == "ok", runner.format_error(stem, entry["error"])
        assert entry["results"].get("profile") == "gpu", f"{stem} did not start with runner.start_lab"
        return entry["results"]

    return results
