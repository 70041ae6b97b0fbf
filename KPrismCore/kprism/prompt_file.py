"""The prompts.json file of `kprism segment --prompts` and of the Slicer batch (schema in the README).

{"coordinates": "ijk" | "ras" | "lps",
 "points":    [{"position": [x, y] or [x, y, z], "positive": true}],
 "boxes":     [{"min": [...], "max": [...]}],
 "scribbles": [{"mask": "file relative to the JSON", "positive": true}]}

IJK on a 2D image is [column, row]. Boxes are applied first, then scribbles, then points, the
order in which a user usually works.

One parser for every caller: :func:`load_prompt_file` validates the whole file against pydantic
models before anything else happens, and every problem is a :class:`PromptFileError` whose one-line
message names the file, the JSON path (``points[3].position``) and what was expected there.
Work is bounded: each click costs one decoder pass over all the clicks of its slice, so the number
of prompts per file and per slice is capped (the constants below, also in the README).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterable, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo

if TYPE_CHECKING:
    from .session import KPrismSession, SegmentationResult

# A user clicks tens of times. Every click re-decodes all the clicks of its slice, so a slice costs the
# square of its clicks: on the bundled CT (one thread) 50 clicks on one slice take 1.2 s, 200 take 11 s
# and 0.5 GB, 1,000 took 108 s and 3.9 GB. These limits bound the work of one file.
MAX_POINTS = 1000
MAX_POINTS_PER_SLICE = 200
MAX_BOXES = 100  # a 3D box prompts every slice between its corners: one decoder pass each
MAX_SCRIBBLES = 50  # each is a mask file read onto the image grid
MAX_FILE_BYTES = 5_000_000  # 1,000 points take about 60 kB of JSON

_MAX_SHOWN_ERRORS = 3
_MAX_SHOWN_CHARS = 60


class PromptFileError(ValueError):
    """A prompts.json that cannot be used; the message names the file, the JSON path and the problem."""


# ----------------------------------------------------------------------------------------------- schema


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON true is not 1


def _position(value: Any) -> tuple[float, ...]:
    """2 or 3 finite numbers (JSON numbers only: "60,50,15" or ["60"] are refused)."""
    if not isinstance(value, (list, tuple)) or not 2 <= len(value) <= 3 or not all(map(_is_number, value)):
        raise ValueError(f"expected a list of 2 or 3 numbers, got {describe(value)}")
    try:
        numbers = tuple(float(v) for v in value)
    except OverflowError:  # an integer beyond float range
        numbers = (math.inf,)
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError(f"expected finite numbers, got {describe(value)}")
    return numbers


def _mask_file(value: Any, info: ValidationInfo) -> Path:
    """A mask file named relative to the JSON file; it must exist (a folder is not a mask)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError(f"expected the name of a mask file relative to the prompt file, got {describe(value)}")
    path = Path((info.context or {}).get("folder", ".")) / value
    try:
        if path.is_dir():
            raise ValueError(f"expected a mask file, got {describe(str(value))}, which is a folder ({path})")
        if not path.is_file():
            raise ValueError(f"expected a mask file relative to the prompt file, got {describe(str(value))}; there is "
                             f"no file {_short(repr(str(path)))}")
    except OSError as error:  # a name the file system refuses (too long, …)
        raise ValueError(f"expected a mask file, got {describe(str(value))} ({error.strerror or error})") from None
    return path


def _lower_case(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Position = Annotated[tuple[float, ...], BeforeValidator(_position)]


class _Strict(BaseModel):
    # strict: no coercion ("false" is not a boolean), extra keys are errors, values do not change later.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Point(_Strict):
    position: Position
    positive: bool = True


class Box(_Strict):
    min: Position
    max: Position


class Scribble(_Strict):
    mask: Annotated[Path, BeforeValidator(_mask_file)]  # resolved against the JSON file's folder
    positive: bool = True


class PromptFile(_Strict):
    """A validated prompts.json. `source` is the file it came from (None when built in code)."""

    coordinates: Annotated[Literal["ijk", "ras", "lps"], BeforeValidator(_lower_case)] = "ijk"
    points: list[Point] = Field(default_factory=list, max_length=MAX_POINTS)
    boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES)
    scribbles: list[Scribble] = Field(default_factory=list, max_length=MAX_SCRIBBLES)
    _source: Optional[Path] = PrivateAttr(default=None)

    @property
    def source(self) -> Optional[Path]:
        return self._source

    def is_empty(self) -> bool:
        return not (self.points or self.boxes or self.scribbles)


_EXPECTED = {  # what belongs at a key (or in a list under that key), for error messages
    "coordinates": "one of 'ijk', 'ras' or 'lps'",
    "points": 'a list of points like {"position": [x, y, z], "positive": true}',
    "boxes": 'a list of boxes like {"min": [x, y, z], "max": [x, y, z]}',
    "scribbles": 'a list of scribbles like {"mask": "file.nii.gz", "positive": true}',
    "position": "a list of 2 or 3 numbers",
    "min": "a list of 2 or 3 numbers",
    "max": "a list of 2 or 3 numbers",
    "mask": "the name of a mask file relative to the prompt file",
    "positive": "true or false",
}
_ITEM = {"points": ("a point", Point), "boxes": ("a box", Box), "scribbles": ("a scribble", Scribble)}


# ----------------------------------------------------------------------------------------------- loading


def load_prompt_file(path: str | Path) -> PromptFile:
    """Read and validate a prompts.json; scribble masks are resolved relative to it and must exist."""
    path = Path(path)
    return parse_prompts(_read_json(path), path)


def parse_prompts(data: Any, source: str | Path) -> PromptFile:
    """Validate already-decoded JSON as if it were the file `source` (its folder anchors scribbles)."""
    source = Path(source)
    try:
        prompts = PromptFile.model_validate(data, context={"folder": source.parent})
    except ValidationError as error:
        raise PromptFileError(_one_line(f"Prompt file {source}: {_explain_all(error)}.")) from None
    except RecursionError:
        raise PromptFileError(f"Prompt file {source}: nested too deeply to be a prompt file.") from None
    prompts._source = source
    return prompts


def _read_json(path: Path) -> Any:
    try:
        if path.is_dir():
            raise PromptFileError(f"Prompt file {path} is a folder; give the prompts.json file itself.")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise PromptFileError(
                f"Prompt file {path} is {size / 1e6:.1f} MB; prompt files hold at most {MAX_POINTS} points "
                f"and are far smaller (limit {MAX_FILE_BYTES / 1e6:.0f} MB)."
            )
        text = path.read_bytes().decode("utf-8-sig")
        return json.loads(text)
    except FileNotFoundError:
        raise PromptFileError(f"Prompt file {path} does not exist.") from None
    except OSError as error:
        raise PromptFileError(f"Could not read prompt file {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise PromptFileError(f"Prompt file {path} is not UTF-8 text (byte {error.start}).") from None
    except json.JSONDecodeError as error:
        raise PromptFileError(f"Prompt file {path} is not valid JSON: {error}.") from None
    except RecursionError:
        raise PromptFileError(f"Prompt file {path}: nested too deeply to be a prompt file.") from None


# ----------------------------------------------------------------------------------------------- messages


def _explain_all(error: ValidationError) -> str:
    # An unknown key usually explains the missing one next to it (a typo), so it is named first.
    problems = sorted(error.errors(include_url=False), key=lambda e: e["type"] != "extra_forbidden")
    text = "; ".join(_explain(problem) for problem in problems[:_MAX_SHOWN_ERRORS])
    hidden = len(problems) - _MAX_SHOWN_ERRORS
    return text + (f" (and {hidden} more problem{'s' * (hidden > 1)})" if hidden > 0 else "")


def _explain(problem: dict[str, Any]) -> str:
    """One pydantic error → 'points[3].position: expected …, got …'."""
    loc, kind, value = tuple(problem["loc"]), problem["type"], problem.get("input")
    if kind == "extra_forbidden":
        return f"{json_path(loc[:-1])}: unknown key {_short(repr(str(loc[-1])))}; allowed: {', '.join(_model_at(loc[:-1]).model_fields)}"
    if kind == "missing":
        return f"{json_path(loc[:-1])}: the key {_short(repr(str(loc[-1])))} is missing (expected {_expected(loc)})"
    if kind == "value_error":
        return f"{json_path(loc)}: {problem['ctx']['error']}"
    if kind == "too_long":
        limit, count = problem["ctx"]["max_length"], problem["ctx"]["actual_length"]
        return f"{json_path(loc)}: at most {limit} {loc[-1]} per file are accepted, got {count}"
    return f"{json_path(loc)}: expected {_expected(loc)}, got {describe(value)}"


def _expected(loc: tuple) -> str:
    if not loc:
        return "a JSON object with 'points', 'boxes' and/or 'scribbles'"
    if isinstance(loc[-1], int) and len(loc) >= 2 and loc[-2] in _ITEM:
        description, model = _ITEM[loc[-2]]
        return f"{description}, an object with the keys {', '.join(model.model_fields)}"
    return _EXPECTED.get(str(loc[-1]), "another value")


def _model_at(loc: tuple) -> type[BaseModel]:
    """The schema model that validates the object at `loc` (for the list of allowed keys)."""
    return _ITEM[loc[0]][1] if len(loc) == 2 and loc[0] in _ITEM else PromptFile


def json_path(loc: Iterable[Any]) -> str:
    """('points', 3, 'position') → 'points[3].position'; () → 'the top level'."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the top level"


def describe(value: Any) -> str:
    """A JSON value as a reader would name it: "the string '60,50,15'", "an object", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {_short(repr(value))}"
    if _is_number(value):
        return f"the number {_short(repr(value))}"
    if isinstance(value, dict):
        return f"an object with the keys {_short(', '.join(map(str, value)))}" if value else "an empty object"
    if isinstance(value, (list, tuple)):
        try:
            text = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            text = f"a list of {len(value)} items"
        return _short(text) if len(text) <= _MAX_SHOWN_CHARS else f"a list of {len(value)} items"
    return _short(repr(value))


def _one_line(text: str) -> str:
    """Control characters from a file name or a value would break the one-line message."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(text: str) -> str:
    text = _one_line(text)
    return text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 1] + "…"


# ----------------------------------------------------------------------------------------------- applying


def crowded_slice(slice_indices: Iterable[int]) -> Optional[tuple[int, int]]:
    """(slice, number of clicks) of the busiest slice when it holds more than MAX_POINTS_PER_SLICE."""
    counts = Counter(slice_indices)
    if not counts:
        return None
    index, count = counts.most_common(1)[0]
    return (index, count) if count > MAX_POINTS_PER_SLICE else None


def apply_prompts(session: "KPrismSession", prompts: PromptFile) -> Optional["SegmentationResult"]:
    """Applies every prompt in order; returns the session's result afterwards.

    Everything is checked before the first prompt is applied: points and box corners must lie on
    the image, no slice may hold more than MAX_POINTS_PER_SLICE clicks, and every scribble must
    read onto the image grid and mark something there.
    """
    name = f"Prompt file {prompts.source}" if prompts.source else "Prompts"
    _check_positions(session, prompts, name)
    for number, scribble in enumerate(prompts.scribbles):
        _read_scribble(session, scribble, f"{name}: scribbles[{number}]")
    result = session.result()
    for box in prompts.boxes:
        result = session.add_box(box.min, box.max, coordinates=prompts.coordinates)
    for number, scribble in enumerate(prompts.scribbles):
        # Read again rather than kept: scribble masks are image-sized, and up to MAX_SCRIBBLES of them.
        result = session.add_scribble(_read_scribble(session, scribble, f"{name}: scribbles[{number}]"), positive=scribble.positive)
    for point in prompts.points:
        result = session.add_click(point.position, positive=point.positive, coordinates=prompts.coordinates)
    return result


def _check_positions(session: "KPrismSession", prompts: PromptFile, name: str) -> None:
    for number, box in enumerate(prompts.boxes):
        for corner in ("min", "max"):
            _locate(session, getattr(box, corner), prompts.coordinates, f"{name}: boxes[{number}].{corner}")
    slices = [_locate(session, point.position, prompts.coordinates, f"{name}: points[{number}].position")
              for number, point in enumerate(prompts.points)]
    crowded = crowded_slice(slices)
    if crowded is not None:
        raise PromptFileError(
            f"{name}: {crowded[1]} points fall on slice {crowded[0]}; at most {MAX_POINTS_PER_SLICE} points per slice "
            "are accepted (each click re-decodes every click of its slice). Spread them out or use a box or scribble."
        )


def _locate(session: "KPrismSession", position: tuple[float, ...], coordinates: str, where: str) -> int:
    try:
        return session.locate(position, coordinates)[0]  # type: ignore[arg-type]
    except ValueError as error:
        raise PromptFileError(f"{where}: {error}") from None


def _read_scribble(session: "KPrismSession", scribble: Scribble, where: str):
    from .io import read_mask

    try:
        mask = read_mask(scribble.mask, reference=session.image)
    except (ValueError, OSError) as error:
        raise PromptFileError(f"{where} ({scribble.mask.name}): {error}") from None
    if not mask.array.any():
        raise PromptFileError(f"{where}: {scribble.mask} marks nothing on the image's grid (empty, or outside the image).")
    return mask.array
