"""The one way kprism writes a file: whole or not at all, and checked before it replaces anything.

A file is written to a hidden sibling, flushed to disk, optionally read back by `verify`, and only
then renamed over the target in one step. Some writers report success on a short write (ITK's
NIfTI writer on a full disk), so the read-back is what proves a file complete; a failed write or
check leaves an existing target untouched and removes the temporary.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

TEMPORARY_MARK = ".tmp"  # hidden temporaries are named ".<target name>.<hex>.tmp<suffix>"


def temporary_sibling(target: Path, suffix: str = "") -> Path:
    """A hidden, unique name beside `target`; `suffix` keeps the extension a writer dispatches on."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMPORARY_MARK}{suffix}")


def _fsync(path: Path) -> None:
    if path.is_file():
        with path.open("rb+") as stream:
            os.fsync(stream.fileno())


def write_atomically(
    target: str | os.PathLike,
    write: Callable[[Path], None],
    *,
    verify: Optional[Callable[[Path], None]] = None,
    suffix: str = "",
) -> Path:
    """`write(temporary)`, `verify(temporary)` (raises if the file is not what was meant), then rename.

    Any exception (including KeyboardInterrupt) removes the temporary and propagates unchanged;
    the target is replaced only after both steps succeeded.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target, suffix)
    try:
        write(temporary)
        _fsync(temporary)
        if verify is not None:
            verify(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Context-manager form: write to the yielded path; on a clean exit it replaces `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_sibling(target, suffix)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
