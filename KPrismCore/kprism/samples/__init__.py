"""Small bundled cases for the demo and the tests (see README.md here for sources and licences)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLES = Path(str(files("kprism") / "samples"))


def sample_path(*parts: str) -> Path:
    path = SAMPLES.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"Bundled sample {path} is missing; reinstall kprism.")
    return path
