"""The Slicer-facing names the module's code uses, and where: the facts behind KPrismSlicer/SLICER_API.md.

SLICER_API.md lists every Slicer, MRML, Qt and CTK call of the module and its Segment Editor effect with
the place in Slicer's source that defines it (written by hand: that is the check) and the places in our
code that use it (derived: this script rewrites that column, so it never goes stale when code moves).

Usage: python Utilities/slicer_api.py [--check]   (--check: report a stale "used at" column, write nothing)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "KPrismSlicer"
API_FILE = MODULE_DIR / "SLICER_API.md"
MODULE_SOURCES = ["KPrismSlicer.py", "KPrismSlicerLib/*.py"]
SHOWN_PLACES = 3  # a row lists the first few places, then "…"


def used_names() -> dict[str, dict[str, list[str]]]:
    """{kind: {name: ["file:line", …]}} for the Slicer-facing names in the module's code.

    - ``names``: ``slicer.…``, ``qt.…``, ``ctk.…`` attribute chains and imports, ``vtkMRML…`` classes named
      in strings (``AddNewNodeByClass("vtkMRML…")``);
    - ``methods``: VTK/MRML-style calls ``obj.Method(…)`` (capitalised method names);
    - ``effect``: what the effect calls on ``scriptedEffect`` (the C++ effect adaptor).
    A chain's prefixes are documented with it (``slicer.util.foo`` documents ``slicer.util``).
    """
    found: dict[str, dict[str, list[str]]] = {kind: defaultdict(list) for kind in ("names", "methods", "effect")}
    for pattern in MODULE_SOURCES:
        for path in sorted(MODULE_DIR.glob(pattern)):
            where = str(path.relative_to(MODULE_DIR))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                for kind, name in _names_of(node):
                    found[kind][name].append(f"{where}:{node.lineno}")
    names = found["names"]
    found["names"] = {n: p for n, p in names.items() if not any(other.startswith(n + ".") for other in names)}
    return {kind: {name: sorted(set(places), key=_place_order) for name, places in entries.items()}
            for kind, entries in found.items()}


def _names_of(node: ast.AST) -> list[tuple[str, str]]:
    out = []
    if isinstance(node, ast.Attribute):
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in ("slicer", "qt", "ctk"):
            out.append(("names", ".".join([inner.id, *chain])))
        if chain[:1] == ["scriptedEffect"] and len(chain) > 1:
            out.append(("effect", chain[1]))
        elif isinstance(inner, ast.Name) and inner.id == "scriptedEffect":
            out.append(("effect", chain[0]))
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        module = getattr(node, "module", None)
        for alias in node.names:
            name = f"{module}.{alias.name}" if module else alias.name
            if name.split(".")[0] in ("slicer", "qt", "ctk", "SegmentEditorEffects") or name.startswith("qSlicer"):
                out.append(("names", name))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vtkMRML") \
            and node.value.isidentifier():
        out.append(("names", node.value))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr[:1].isupper() \
            and not (isinstance(node.func.value, ast.Name) and node.func.value.id in ("slicer", "qt", "ctk")):
        out.append(("methods", node.func.attr))  # (a class of slicer/qt/ctk called directly is in "names")
    return out


def _place_order(place: str) -> tuple[str, int]:
    file, line = place.rsplit(":", 1)
    return file, int(line)


def _places_by_file(places: list[str]) -> str:
    """``a.py:3, b.py:7 …`` — the first line of each file, at most SHOWN_PLACES files."""
    first: dict[str, str] = {}
    for place in places:
        first.setdefault(place.rsplit(":", 1)[0], place)
    shown = list(first.values())
    return ", ".join(shown[:SHOWN_PLACES]) + (" …" if len(shown) > SHOWN_PLACES else "")


def rewritten_api_file() -> str:
    """SLICER_API.md with each row's last column ("used at") recomputed from the code."""
    usage: dict[str, list[str]] = {}
    for entries in used_names().values():
        for name, places in entries.items():
            usage.setdefault(name, []).extend(places)
    lines = API_FILE.read_text(encoding="utf-8").split("\n")
    for index, line in enumerate(lines):
        match = re.match(r"^\| `([^`]+)` \|(.*)\| ([^|]*) \|$", line)
        if match and match.group(1) in usage:
            places = sorted(set(usage[match.group(1)]), key=_place_order)
            lines[index] = f"| `{match.group(1)}` |{match.group(2)}| {_places_by_file(places)} |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="report a stale 'used at' column, write nothing")
    args = parser.parse_args(argv)
    text = rewritten_api_file()
    if text == API_FILE.read_text(encoding="utf-8"):
        return 0
    if args.check:
        print(f"{API_FILE.relative_to(ROOT)}: the 'used at' column is stale; run python Utilities/slicer_api.py")
        return 1
    API_FILE.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
