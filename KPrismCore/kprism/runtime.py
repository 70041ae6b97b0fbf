"""Device choice, thread control and autocast: how the model runs on this machine."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Literal

import torch

Device = Literal["auto", "cpu", "cuda", "mps"]


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; an unavailable explicit choice is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but this torch build or machine has no CUDA GPU; use --device cpu or auto.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("MPS was requested but is not available here; use --device cpu or auto.")
    if device not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unknown device {device!r}; choose auto, cpu, cuda or mps.")
    return torch.device(device)


def default_threads() -> int:
    """Two threads at most: more rarely helps small convolutions and hurts anything else running."""
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Temporarily run torch's CPU kernels on `count` threads."""
    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous:
            torch.set_num_threads(previous)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Half precision on CUDA (about 2× faster there); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
