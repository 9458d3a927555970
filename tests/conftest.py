"""Shared test setup: a tiny architecture shape for fast model tests, notebooks found once."""

import pytest
import torch

from qlora_lab import models

TINY = models.Arch("llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=4096, tied=True,
                   max_positions=256)


@pytest.fixture
def tiny_shape(monkeypatch):
    """Registers 'tiny' (2 layers, hidden 64, vocab 4096) as a random: shape for this test."""
    monkeypatch.setitem(models.ARCHITECTURES, "tiny", TINY)
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
