"""Shared test setup: a quiet, single-threaded torch and small model fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before torch starts its thread pool: spinning OpenMP threads slow everything else 3-35×.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Foundation models keep encoder embeddings on disk; tests never write into the user's cache.
os.environ["KPRISM_EMBEDDING_CACHE"] = tempfile.mkdtemp(prefix="kprism-test-embeddings-")

import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@pytest.fixture(scope="session")
def tiny_model():
    """An untrained tiny model with three classes (for API and gradient tests, not for accuracy)."""
    from kprism.catalog import ClassCatalog
    from kprism.model import build_model, preset

    torch.manual_seed(0)
    return build_model(preset("tiny", num_classes=3)).eval(), ClassCatalog.from_names(["disk", "square", "ring"])


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip("../shared/datasets is not here (it is in CI); these tests measure on the real datasets")
    return SHARED_DATASETS
