"""Rewrite the packaging files that are derived from two sources, so that each fact is set once.

- KPrismCore/pyproject.toml's runtime dependencies → KPrismSlicer/Resources/requirements.txt (what the
  Slicer module installs into Slicer's Python: everything but torch, which the PyTorch extension
  installs, and numpy and SimpleITK, which are Slicer's own).
- KPrism.json's scm_url (the repository URL: the one place to set it at publication) and scm_revision
  → the EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS literals in CMakeLists.txt (the screenshots are
  the pictures in Screenshots/, none until publication). The ExtensionsIndex checker reads these URLs
  from the file's text, so CMake cannot compute them; the homepage CMake does read from KPrism.json.
- CMakeLists.txt's metadata → KPrismSlicer.s4ext, the legacy description format, without URLs.

Usage: python Utilities/sync_packaging.py [--check]   (--check: report differences, write nothing)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "KPrismCore" / "pyproject.toml"
CATALOG_ENTRY = ROOT / "KPrism.json"
TOP_CMAKE = ROOT / "CMakeLists.txt"
REQUIREMENTS = ROOT / "KPrismSlicer" / "Resources" / "requirements.txt"
LEGACY_DESCRIPTION = ROOT / "KPrismSlicer.s4ext"
ICON_PATH = "Resources/KPrismSlicer.png"  # in the repository
SCREENSHOTS = ROOT / "Screenshots"  # taken in Slicer at publication
NOT_INSTALLED_BY_KPRISM = ("torch", "numpy", "simpleitk")  # the PyTorch extension's and Slicer's own

REQUIREMENTS_HEADER = """\
# Generated from KPrismCore/pyproject.toml by `make packaging`; do not edit.
# What the KPrism module installs into Slicer's Python on first use. Not listed on purpose: torch
# (installed by the PyTorch extension for the machine's GPU or CPU) and numpy and SimpleITK (Slicer's
# own builds, never replaced). kprism itself is not installed: it ships inside the extension.
"""


def requirement_name(line: str) -> str:
    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def requirements_text() -> str:
    dependencies = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    kept = [d for d in dependencies if requirement_name(d) not in NOT_INSTALLED_BY_KPRISM]
    return REQUIREMENTS_HEADER + "".join(f"{d}\n" for d in kept)


def raw_url(path: str) -> str:
    """The raw-file URL of `path` in the repository and revision that KPrism.json names."""
    entry = json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    parts = urlsplit(entry["scm_url"])
    if parts.netloc.lower() != "github.com":
        raise SystemExit(f"{CATALOG_ENTRY.name}: scm_url must be a github.com repository, got {entry['scm_url']!r}")
    owner, name = parts.path.strip("/").removesuffix(".git").split("/")[:2]
    return f"https://raw.githubusercontent.com/{owner}/{name}/{entry.get('scm_revision', 'main')}/{path}"


def icon_url() -> str:
    return raw_url(ICON_PATH)


def screenshot_urls() -> str:
    pictures = sorted(p for p in SCREENSHOTS.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"))
    return " ".join(raw_url(p.relative_to(ROOT).as_posix()) for p in pictures)


def _literal_line(variable: str) -> re.Pattern:
    return re.compile(rf'^set\({variable} "[^"]*"\)$', re.MULTILINE)


def top_cmake_text() -> str:
    text = TOP_CMAKE.read_text(encoding="utf-8")
    for variable, value in (("EXTENSION_ICONURL", icon_url()), ("EXTENSION_SCREENSHOTURLS", screenshot_urls())):
        line = _literal_line(variable)
        if len(line.findall(text)) != 1:
            raise SystemExit(f'{TOP_CMAKE.name}: expected one line `set({variable} "…")`')
        text = line.sub(lambda _: f'set({variable} "{value}")', text)
    return text


def cmake_metadata() -> dict[str, str]:
    """The literal EXTENSION_* values of the top CMakeLists.txt (quotes removed)."""
    found = re.findall(r'^set\(EXTENSION_(\w+) +("[^"]*"|[^)]*)\)', TOP_CMAKE.read_text(encoding="utf-8"), re.MULTILINE)
    return {key: value.strip('"') for key, value in found}


def legacy_description_text() -> str:
    meta, entry = cmake_metadata(), json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))
    fields = [
        ("scm", entry.get("scm_type", "git")),
        ("scmrevision", entry.get("scm_revision", "main")),
        ("depends", " ".join(entry.get("build_dependencies", [])) or "NA"),
        ("build_subdirectory", entry.get("build_subdirectory", ".")),
        ("contributors", meta["CONTRIBUTORS"]),
        ("category", entry["category"]),
        ("status", meta["STATUS"]),
        ("description", meta["DESCRIPTION"]),
        ("enabled", "1"),
    ]
    return (
        "# Legacy (Slicer 4) extension description: neither Slicer 5 nor the ExtensionsIndex reads it.\n"
        "# The catalog entry is KPrism.json (its scm_url is the repository URL, set in that one place) and the\n"
        "# metadata lives in CMakeLists.txt; generated from both by `make packaging`, without URLs. Do not edit.\n"
        + "".join(f"{key} {value}\n" for key, value in fields)
    )


def derived_files() -> dict[Path, str]:
    return {REQUIREMENTS: requirements_text(), TOP_CMAKE: top_cmake_text(), LEGACY_DESCRIPTION: legacy_description_text()}


def stale_files() -> list[Path]:
    return [path for path, text in derived_files().items()
            if not path.exists() or path.read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run `make packaging`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in derived_files().items():
        if path in stale:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
