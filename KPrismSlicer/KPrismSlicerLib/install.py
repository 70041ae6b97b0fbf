"""Installing KPrism's Python dependencies into Slicer — on first use only, never at import.

- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the CUDA or CPU build that
  suits the machine;
- kprism and its runtime dependencies (``Resources/requirements.txt``, which leaves out torch, numpy
  and SimpleITK) come from ``slicer.packaging.pip_ensure`` with those three skipped, so pip never
  replaces Slicer's own numpy and SimpleITK or pulls another torch; on older Slicer,
  ``slicer.util.pip_install`` installs requirements.txt and then kprism with ``--no-deps``.

Nothing is installed without the user's confirmation.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
# Where kprism comes from: the package index by default; a wheel, folder or git URL via the environment.
KPRISM_REQUIREMENT = os.environ.get("KPRISM_PIP_REQUIREMENT", "kprism>=0.1")
NEVER_REPLACE = ("torch", "numpy", "SimpleITK")
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


def requirements() -> list[str]:
    """The third-party requirements of Resources/requirements.txt (comments and options skipped)."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def missing() -> list[str]:
    """What is not installed yet: 'torch', 'kprism' and unmet lines of requirements.txt."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    absent = [name for name in ("torch", "kprism") if importlib.util.find_spec(name) is None]
    for line in requirements():
        requirement = Requirement(line)
        try:
            if version(requirement.name) not in requirement.specifier:
                absent.append(line)
        except PackageNotFoundError:
            absent.append(line)
    return absent


def is_installed() -> bool:
    return not missing()


def ensure_dependencies(ask: bool = True) -> bool:
    """Install whatever is missing; returns True when KPrism can run (False if the user declined).

    PyTorch asks for confirmation through the PyTorch extension (showing the build it picked); the
    other packages are listed in one confirmation dialog of our own.
    """
    import slicer

    if not missing():
        return True
    if importlib.util.find_spec("torch") is None and not _install_torch(ask):
        return False
    needed = missing()
    if needed and ask and not slicer.util.confirmOkCancelDisplay(
        "KPrism needs these Python packages, which will now be installed into Slicer's Python:\n\n"
        + "\n".join(f"  • {name}" for name in needed)
        + "\n\nSlicer's own numpy and SimpleITK are kept. This can take a few minutes.",
        windowTitle="KPrism: install dependencies",
    ):
        return False
    _install_packages()
    importlib.invalidate_caches()
    still = missing()
    if still:
        raise RuntimeError(f"KPrism dependencies are still missing after installation: {', '.join(still)}.")
    return True


def _install_torch(ask: bool) -> bool:
    try:
        import PyTorchUtils
    except ImportError as error:
        raise RuntimeError(
            "KPrism needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, restart Slicer, "
            "and open KPrism again."
        ) from error
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT)
    return torch is not None


def _install_packages() -> None:
    """requirements.txt and kprism, keeping torch, numpy and SimpleITK out of pip's hands."""
    import slicer

    try:
        from slicer.packaging import pip_ensure
    except ImportError:  # older Slicer: plain pip, kprism without its dependencies
        pip_ensure = None
    if pip_ensure is not None:
        # skip_packages installs each package with --no-deps, walks the dependencies itself and scrubs the
        # skipped ones from the metadata, so pip never pulls another torch or replaces Slicer's numpy/SimpleITK.
        try:
            pip_ensure([*requirements(), KPRISM_REQUIREMENT], skip_packages=list(NEVER_REPLACE), prompt_install=False,
                       requester="KPrism")
            return
        except TypeError:  # a pip_ensure without skip_packages: fall back to the plain steps below
            logging.info("slicer.packaging.pip_ensure has no skip_packages; installing step by step")
    absent = [line for line in requirements() if line in missing()]
    if absent:
        slicer.util.pip_install(absent)
    if importlib.util.find_spec("kprism") is None:
        logging.info("Installing %s without its dependencies", KPRISM_REQUIREMENT)
        slicer.util.pip_install(["--no-deps", KPRISM_REQUIREMENT])
