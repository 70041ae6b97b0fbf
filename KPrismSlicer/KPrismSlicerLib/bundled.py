"""Where Slicer's Python finds the `kprism` package: it ships inside the extension, never from pip.

Two layouts, one rule:
- installed extension: ``qt-scripted-modules/kprism/`` beside ``qt-scripted-modules/KPrismSlicerLib/``
  (CMake copies it there);
- source checkout added under *Application settings → Modules → Additional module paths* (the
  ``KPrismSlicer/`` folder): the repository's ``KPrismCore/kprism/``.
The copy shipped with the module goes first on sys.path, so an older kprism installed with pip
into Slicer's Python cannot shadow the one this module was built with.

This file must stay importable on old Pythons (no newer syntax): Slicer 5.8 embeds Python 3.9,
and there it has to say, in one line, that KPrism needs Slicer 5.10 or later.
"""

import importlib.util
import sys
from pathlib import Path

MINIMUM_PYTHON = (3, 10)
SUPPORTED_SLICER = "3D Slicer 5.10 or later"
_LIB_DIR = Path(__file__).resolve().parent


class UnsupportedPython(RuntimeError):
    """Slicer's Python is older than KPrism supports."""


def python_problem(version=None):
    """One line saying why this Python cannot run KPrism, or None when it can."""
    version = tuple(version or sys.version_info[:3])
    if version[:2] >= MINIMUM_PYTHON:
        return None
    found = ".".join(str(part) for part in version[:3])
    wanted = ".".join(str(part) for part in MINIMUM_PYTHON)
    return (f"KPrism needs {SUPPORTED_SLICER} (Python {wanted} or newer); this Slicer runs Python {found}. "
            "Install a newer Slicer from download.slicer.org.")


def package_candidates():
    """Folders that may hold the shipped `kprism` package: beside the module, then the source checkout."""
    return [_LIB_DIR.parent, _LIB_DIR.parent.parent / "KPrismCore"]


def shipped_package_root():
    """The folder holding the `kprism` package this module ships with, or None."""
    for folder in package_candidates():
        if (folder / "kprism" / "__init__.py").is_file():
            return folder
    return None


def ensure_on_path():
    """Make `import kprism` find the shipped package; returns the folder it comes from (None: not shipped).

    Raises UnsupportedPython (one line) on a Python older than 3.10.
    """
    problem = python_problem()
    if problem:
        raise UnsupportedPython(problem)
    root = shipped_package_root()
    if root is None:
        return None
    if "kprism" not in sys.modules:  # an already imported kprism stays: it cannot be swapped mid-session
        entry = str(root)
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
        importlib.invalidate_caches()
    return root


def kprism_found():
    """Whether `import kprism` can succeed (without importing it)."""
    try:
        return importlib.util.find_spec("kprism") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules (tests hide kprism that way)
        return False


MISSING_PACKAGE = ("The kprism package is missing from the KPrism extension (looked in "
                   "qt-scripted-modules/kprism and ../KPrismCore/kprism); reinstall KPrism from the Extensions "
                   "Manager or use a complete source checkout.")
