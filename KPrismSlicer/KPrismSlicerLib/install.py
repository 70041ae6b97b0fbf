"""Installing what KPrism needs into Slicer's Python: on first use, after one confirmation, never at import.

- kprism itself is never installed: it ships inside the extension (``bundled``).
- torch comes from the PyTorch extension's installer (``PyTorchUtilsLogic().installTorch``), which picks
  the CUDA build for the machine's NVIDIA driver, else the CPU build.
- The small pure-Python dependencies are the lines of ``Resources/requirements.txt`` (generated from
  KPrismCore/pyproject.toml), installed with ``slicer.packaging.pip_ensure`` (Slicer 5.12+) or
  ``slicer.util.pip_install`` (5.10).
- Slicer's own numpy and SimpleITK, and an installed torch, are never replaced: pip gets a constraints
  file pinning them to the versions already installed.
- Offline: ``KPRISM_WHEELS`` (environment variable) or the Slicer setting ``KPrism/WheelsFolder`` names a
  folder of wheels; then everything, torch included, is installed from there with
  ``pip --no-index --find-links FOLDER`` and nothing is downloaded.

A declined confirmation is remembered for the Slicer session: later runs return False without asking,
until the user presses "Install dependencies" (``ensure_dependencies(even_if_declined=True)``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

from . import bundled

TORCH_REQUIREMENT = "torch>=2.1"
KEEP_INSTALLED = ("numpy", "SimpleITK")  # Slicer's own builds
WHEELS_VARIABLE = "KPRISM_WHEELS"
WHEELS_SETTING = "KPrism/WheelsFolder"
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
DECLINED = ("KPrism's Python packages are not installed (the installation was declined); "
            "press 'Install dependencies' under 'Model and device' to install them.")

_declined_this_session = False


def requirements() -> list[str]:
    """The requirement lines of Resources/requirements.txt (comments and pip options skipped)."""
    lines = [line.split("#")[0].strip() for line in REQUIREMENTS_FILE.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def missing() -> list[str]:
    """The requirements not met yet: torch's first (if any), then unmet lines of requirements.txt."""
    from packaging.requirements import Requirement

    absent = []
    for line in [TORCH_REQUIREMENT, *requirements()]:
        requirement = Requirement(line)
        try:
            if not requirement.specifier.contains(version(requirement.name), prereleases=True):
                absent.append(line)
        except PackageNotFoundError:
            if importlib.util.find_spec(requirement.name.replace("-", "_")) is None:
                absent.append(line)
    return absent


def is_installed() -> bool:
    """Everything KPrism needs can be imported (the shipped kprism included)."""
    return bundled.kprism_found() and not missing()


def was_declined() -> bool:
    return _declined_this_session


def ensure_dependencies(ask: bool = True, even_if_declined: bool = False) -> bool:
    """Install whatever is missing; True when KPrism can run, False when the user declined (now or before).

    One dialog lists everything that will be installed and where it comes from. ``ask=False`` installs
    without asking (scripts). Raises RuntimeError with one line when the installation cannot work or fails.
    """
    global _declined_this_session

    problem = bundled.python_problem()
    if problem:
        raise RuntimeError(problem)
    if not bundled.kprism_found():
        raise RuntimeError(bundled.MISSING_PACKAGE)
    needed = missing()
    if not needed:
        return True
    if _declined_this_session and not even_if_declined:
        return False
    folder = wheel_folder()
    if ask and not _confirm(needed, folder):
        _declined_this_session = True
        return False
    _declined_this_session = False
    constraints = _constraints_file()
    try:
        if needed[0] == TORCH_REQUIREMENT:
            _install_torch(folder, constraints)
        packages = [line for line in needed if line != TORCH_REQUIREMENT]
        if packages:
            _install_packages(packages, folder, constraints)
    finally:
        os.unlink(constraints)
    importlib.invalidate_caches()
    still = missing()
    if still:
        raise RuntimeError(f"KPrism's dependencies are still missing after the installation: {', '.join(still)}; "
                           "see the Python console for pip's messages.")
    return True


def wheel_folder() -> Optional[Path]:
    """The offline wheel folder (KPRISM_WHEELS, else the KPrism/WheelsFolder setting), or None."""
    value = os.environ.get(WHEELS_VARIABLE, "").strip() or _setting(WHEELS_SETTING)
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise RuntimeError(f"The KPrism wheel folder {folder} (from {WHEELS_VARIABLE} or the {WHEELS_SETTING} setting) "
                           "is not a folder; point it at a folder of .whl files or unset it.")
    return folder


def _setting(key: str) -> str:
    try:
        import qt
    except ImportError:  # plain Python: no application settings
        return ""
    return str(qt.QSettings().value(key, "") or "").strip()


def _confirm(needed: list[str], folder: Optional[Path]) -> bool:
    import slicer

    lines = []
    for line in needed:
        if line == TORCH_REQUIREMENT and folder is None:
            line += ("  (PyTorch, through the PyTorch extension: the CUDA build when an NVIDIA GPU is found, "
                     "else the CPU build; a download of 0.2 to 3 GB)")
        lines.append(f"  • {line}")
    source = f"from the wheel folder {folder}, without network access" if folder else "from the Python Package Index"
    return slicer.util.confirmOkCancelDisplay(
        "KPrism needs these Python packages in Slicer's Python; they will be installed " + source + ":\n\n"
        + "\n".join(lines)
        + "\n\nSlicer's own numpy and SimpleITK are kept. This can take a few minutes.",
        windowTitle="KPrism: install dependencies",
    )


def _constraints_file() -> str:
    """A pip constraints file pinning what must not change: Slicer's numpy and SimpleITK, an installed torch."""
    pins = []
    keep = [*KEEP_INSTALLED, *(["torch"] if TORCH_REQUIREMENT not in missing() else [])]  # a too-old torch may go
    for name in keep:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    with tempfile.NamedTemporaryFile("w", suffix="-kprism-constraints.txt", delete=False, encoding="utf-8") as file:
        file.write("\n".join(pins) + "\n")
    return file.name


def _offline_arguments(folder: Path, constraints: str) -> list[str]:
    return ["--no-index", "--find-links", str(folder), "-c", constraints]


def _install_torch(folder: Optional[Path], constraints: str) -> None:
    import slicer

    if folder is not None:
        slicer.util.pip_install([*_offline_arguments(folder, constraints), TORCH_REQUIREMENT])
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(
            "KPrism installs PyTorch through the PyTorch extension, which is missing: install 'PyTorch' from the "
            f"Extensions Manager and restart Slicer (or set {WHEELS_VARIABLE} to a folder of wheels, see the README)."
        ) from None
    requirement = TORCH_REQUIREMENT.removeprefix("torch")
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=requirement) is None:
        raise RuntimeError("The PyTorch extension did not install PyTorch; see the Python console for its messages.")


def _install_packages(packages: list[str], folder: Optional[Path], constraints: str) -> None:
    import slicer

    if folder is not None:
        slicer.util.pip_install([*_offline_arguments(folder, constraints), *packages])
        return
    try:
        from slicer.packaging import pip_ensure  # Slicer 5.12+: progress dialog, restart advice
    except ImportError:
        slicer.util.pip_install(["-c", constraints, *packages])
        return
    logging.info("KPrism: installing %s", ", ".join(packages))
    pip_ensure(packages, constraints=constraints, prompt_install=False, requester="KPrism")
