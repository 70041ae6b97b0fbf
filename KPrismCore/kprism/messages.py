"""How kprism's command-line tools speak: one line per error or warning, never a traceback unasked."""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator


def one_line(error: BaseException | Warning | str) -> str:
    """An exception's or warning's text folded onto one line (its type name when it has no text)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


@contextlib.contextmanager
def one_line_warnings(program: str) -> Iterator[None]:
    """Show warnings (repeated classes, untrusted in-context results, …) as "PROGRAM: warning: …", one line each."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{program}: warning: {one_line(message)}", file=sys.stderr, flush=True)

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
