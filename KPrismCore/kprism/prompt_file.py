"""The prompts.json file of `kprism segment --prompts` (schema in the README), applied to a session.

{"coordinates": "ijk" | "ras" | "lps",
 "points":    [{"position": [x, y] or [x, y, z], "positive": true}],
 "boxes":     [{"min": [...], "max": [...]}],
 "scribbles": [{"mask": "file relative to the JSON", "positive": true}]}

IJK on a 2D image is [column, row]. Boxes are applied first, then scribbles, then points, the
order in which a user usually works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .session import KPrismSession, SegmentationResult

_COORDINATES = ("ijk", "ras", "lps")


@dataclass
class PromptFile:
    coordinates: str = "ijk"
    points: list[dict[str, Any]] = field(default_factory=list)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    scribbles: list[dict[str, Any]] = field(default_factory=list)
    folder: Path = Path(".")

    def is_empty(self) -> bool:
        return not (self.points or self.boxes or self.scribbles)


def load_prompt_file(path: str | Path) -> PromptFile:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Prompt file {path} does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Prompt file {path} is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"Prompt file {path} must hold a JSON object with 'points', 'boxes' and/or 'scribbles'.")
    unknown = set(data) - {"coordinates", "points", "boxes", "scribbles"}
    if unknown:
        raise ValueError(f"Prompt file {path}: unknown keys {sorted(unknown)}; allowed: coordinates, points, boxes, scribbles.")
    coordinates = str(data.get("coordinates", "ijk")).lower()
    if coordinates not in _COORDINATES:
        raise ValueError(f"Prompt file {path}: 'coordinates' must be one of {_COORDINATES}, got {coordinates!r}.")
    prompts = PromptFile(coordinates, data.get("points", []), data.get("boxes", []), data.get("scribbles", []), path.parent)
    for n, point in enumerate(prompts.points):
        _require(path, f"points[{n}]", point, "position")
    for n, box in enumerate(prompts.boxes):
        _require(path, f"boxes[{n}]", box, "min", "max")
    for n, scribble in enumerate(prompts.scribbles):
        _require(path, f"scribbles[{n}]", scribble, "mask")
    return prompts


def _require(path: Path, where: str, item: Any, *keys: str) -> None:
    if not isinstance(item, dict) or any(k not in item for k in keys):
        raise ValueError(f"Prompt file {path}: {where} needs the keys {list(keys)}; got {item!r}.")


def apply_prompts(session: KPrismSession, prompts: PromptFile) -> Optional[SegmentationResult]:
    """Applies every prompt in order; returns the session's result afterwards."""
    from .io import read_mask

    result = session.result()
    for box in prompts.boxes:
        result = session.add_box(box["min"], box["max"], coordinates=prompts.coordinates)  # type: ignore[arg-type]
    for scribble in prompts.scribbles:
        path = prompts.folder / scribble["mask"]
        mask = read_mask(path, reference=session.image)
        if not mask.array.any():
            raise ValueError(f"Scribble {path} marks nothing on the image's grid (empty, or outside the image).")
        result = session.add_scribble(mask.array, positive=bool(scribble.get("positive", True)))
    for point in prompts.points:
        result = session.add_click(point["position"], positive=bool(point.get("positive", True)),
                                   coordinates=prompts.coordinates)  # type: ignore[arg-type]
    return result
