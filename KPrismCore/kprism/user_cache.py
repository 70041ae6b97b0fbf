"""Where kprism keeps large derived files (converted encoders, embedding caches): outside any repository.

`KPRISM_CACHE` overrides the place; otherwise `$XDG_CACHE_HOME/kprism`, else `~/.cache/kprism`.
Everything here can be rebuilt from its sources, so it may be deleted at any time.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "KPRISM_CACHE"


def user_cache_dir(*parts: str) -> Path:
    """The kprism cache folder (or a sub-folder of it); not created."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "kprism")
    return Path(root).expanduser().joinpath(*parts)
