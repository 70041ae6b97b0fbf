"""The class catalog: which named structures a model's semantic tokens stand for."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

# A fixed palette so the same class keeps its colour between runs and tools.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


class UnknownClassError(ValueError):
    """A class name that the model's catalog does not know."""


@dataclass(frozen=True)
class ClassEntry:
    name: str
    color: tuple[int, int, int]
    description: str = ""


class ClassCatalog:
    """Ordered list of class names; index i is semantic token i of the model."""

    def __init__(self, entries: Iterable[ClassEntry]):
        self.entries = list(entries)
        self._index = {e.name: i for i, e in enumerate(self.entries)}
        if len(self._index) != len(self.entries):
            raise ValueError("Class names in a catalog must be unique.")

    @classmethod
    def from_names(cls, names: Sequence[str]) -> "ClassCatalog":
        return cls(ClassEntry(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(names))

    @classmethod
    def from_list(cls, items: list[dict[str, Any]]) -> "ClassCatalog":
        return cls(ClassEntry(d["name"], tuple(d["color"]), d.get("description", "")) for d in items)

    def to_list(self) -> list[dict[str, Any]]:
        return [asdict(e) for e in self.entries]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def index(self, name: str) -> int:
        """Token index of a class; an unknown name raises an error listing the known ones."""
        if name not in self._index:
            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UnknownClassError(f"Unknown class {name!r}.{hint} Known classes: {', '.join(self.names)}.")
        return self._index[name]

    def entry(self, name: str) -> ClassEntry:
        return self.entries[self.index(name)]
