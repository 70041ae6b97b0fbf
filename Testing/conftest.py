"""Cross-component tests: the `kprism` command line end to end (and, later, Slicer logic on real MRML)."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Foundation models keep encoder embeddings on disk; tests never write into the user's cache.
os.environ["KPRISM_EMBEDDING_CACHE"] = tempfile.mkdtemp(prefix="kprism-test-embeddings-")

import torch  # noqa: E402

torch.set_num_threads(1)

# Slicer module tests (real MRML from slicer-core): fixtures `scene` and `logic`, see slicer_fixture.py.
from slicer_fixture import logic, scene  # noqa: E402, F401


import pytest  # noqa: E402


@pytest.fixture
def no_model_work(monkeypatch):
    """Any encoder or decoder pass fails the test with WorkStarted: an input must be refused before."""
    from test_reliability import WorkStarted

    from kprism.model import KPrismModel

    def refuse(*args, **kwargs):
        raise WorkStarted("the model ran before the input was checked")

    monkeypatch.setattr(KPrismModel, "encode", refuse)
    monkeypatch.setattr(KPrismModel, "decode", refuse)
