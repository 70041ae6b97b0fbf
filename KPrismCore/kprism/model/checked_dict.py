"""Building a config dataclass from a JSON dict: unknown keys refused by name, JSON lists back to tuples."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def from_checked_dict(cls: type[T], values: dict[str, Any], what: str) -> T:
    """`cls(**values)` after refusing keys `cls` does not have (`what` names the config in the message)."""
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"Unknown {what} config keys {sorted(unknown)}; known keys: {sorted(known)}.")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
