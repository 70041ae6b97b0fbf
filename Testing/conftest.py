"""Cross-component tests: the `kprism` command line end to end (and, later, Slicer logic on real MRML)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# Slicer module tests (real MRML from slicer-core): fixtures `scene` and `logic`, see slicer_fixture.py.
from slicer_fixture import logic, scene  # noqa: E402, F401
