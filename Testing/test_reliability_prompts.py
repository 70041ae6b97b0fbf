"""prompts.json: one strict schema for the CLI, the Slicer batch and the Python API (issue 10, item 3).

Audit rows P09 (unbounded points), P11 ("false" read as true), P13 (a string position) and P15 (a
folder as scribble mask). The schema is fuzzed: any JSON value, and any damaged copy of a valid
file, either loads to a valid PromptFile or raises PromptFileError with a one-line message.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import WorkStarted, run_kprism, write_ct

from kprism import prompt_file
from kprism.io import read_image
from kprism.prompt_file import (
    MAX_BOXES,
    MAX_POINTS,
    MAX_POINTS_PER_SLICE,
    MAX_SCRIBBLES,
    PromptFile,
    PromptFileError,
    apply_prompts,
    load_prompt_file,
    parse_prompts,
)
from kprism.samples import sample_path
from kprism.session import KPrismSession

README = Path(__file__).resolve().parents[1] / "README.md"
FUZZ_SETTINGS = settings(max_examples=1000, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CT = sample_path("ct", "ts_ct_001crop.nii.gz")  # 122 × 101 × 30 (i, j, k)


def segment(capsys, *args) -> tuple[int, str, str]:
    return run_kprism(capsys, "segment", *args, "--device", "cpu", "--threads", "1")


def write_prompts(folder: Path, content) -> Path:
    path = folder / "prompts.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path




# ----------------------------------------------------------------------------------------------- P11


def test_P11_string_false_is_refused_naming_file_path_and_type(tmp_path, capsys):
    write_ct(tmp_path / "ct.nii.gz")
    prompts = write_prompts(tmp_path, {"points": [{"position": [20, 16, 3], "positive": "false"}]})

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1
    assert f"Prompt file {prompts}: points[0].positive: expected true or false, got the string 'false'" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_P11_json_false_reaches_the_session_as_a_negative_click(tmp_path, monkeypatch):
    prompts = parse_prompts({"points": [{"position": [60, 50, 15], "positive": False},
                                        {"position": [61, 50, 15]}]}, tmp_path / "p.json")
    session = KPrismSession(device="cpu", threads=1)
    session.set_image(read_image(CT))
    sent = []
    original = session.add_click

    def record(point, positive=True, coordinates="ijk"):
        sent.append(positive)
        return original(point, positive=positive, coordinates=coordinates)

    monkeypatch.setattr(session, "add_click", record)
    result = apply_prompts(session, prompts)

    assert sent == [False, True] and all(type(value) is bool for value in sent)
    assert result is not None and result.mask.shape == read_image(CT).spatial_shape


# ----------------------------------------------------------------------------------------------- P13


@pytest.mark.parametrize(("points", "expected"), [
    ([{"position": "60,50,15"}], "points[0].position: expected a list of 2 or 3 numbers, got the string '60,50,15'"),
    ([{"position": [60, 50, 15]}, {"position": ["60", 50, 15]}], 'points[1].position: expected a list of 2 or 3 numbers, got ["60", 50, 15]'),
    ([{"position": [60, 50, 15, 1]}], "points[0].position: expected a list of 2 or 3 numbers, got [60, 50, 15, 1]"),
    ([{"position": [True, 50, 15]}], "points[0].position: expected a list of 2 or 3 numbers, got [true, 50, 15]"),
    ([{"position": [1e400, 50, 15]}], "points[0].position: expected finite numbers, got [Infinity, 50, 15]"),
])
def test_P13_wrongly_typed_positions_name_file_path_and_type(tmp_path, capsys, points, expected):
    write_ct(tmp_path / "ct.nii.gz")
    prompts = write_prompts(tmp_path, {"points": points})

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and f"Prompt file {prompts}: {expected}" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.nii.gz").exists()


def test_P13_json_nan_literal_is_refused(tmp_path):
    path = write_prompts(tmp_path, '{"boxes": [{"min": [0, 0, 0], "max": [NaN, 5, 5]}]}')

    with pytest.raises(PromptFileError, match=re.escape("boxes[0].max: expected finite numbers, got [NaN, 5, 5]")):
        load_prompt_file(path)


def test_P13_unknown_keys_are_named_with_the_allowed_ones(tmp_path):
    path = write_prompts(tmp_path, {"points": [{"pos": [1, 2, 3]}]})

    with pytest.raises(PromptFileError) as error:
        load_prompt_file(path)

    assert str(error.value) == (f"Prompt file {path}: points[0]: unknown key 'pos'; allowed: position, positive; "
                                "points[0]: the key 'position' is missing (expected a list of 2 or 3 numbers).")


# ----------------------------------------------------------------------------------------------- P15


@pytest.mark.parametrize(("mask", "expected"), [
    (".", "scribbles[1].mask: expected a mask file, got the string '.', which is a folder"),
    ("strokes", "scribbles[1].mask: expected a mask file, got the string 'strokes', which is a folder"),
    ("missing.nii.gz", "scribbles[1].mask: expected a mask file relative to the prompt file, got the string 'missing.nii.gz'"),
    ("", "scribbles[1].mask: expected the name of a mask file relative to the prompt file, got the string ''"),
])
def test_P15_scribble_mask_that_is_not_a_file_names_the_scribble(tmp_path, capsys, no_model_work, mask, expected):
    write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "strokes").mkdir()
    (tmp_path / "good.nii.gz").write_bytes(b"exists")
    prompts = write_prompts(tmp_path, {"scribbles": [{"mask": "good.nii.gz"}, {"mask": mask}]})

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and f"Prompt file {prompts}: {expected}" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_P15_unreadable_scribble_is_refused_before_any_model_work_naming_it(tmp_path, capsys, no_model_work):
    write_ct(tmp_path / "ct.nii.gz")
    (tmp_path / "text.nii.gz").write_text("not an image", encoding="utf-8")
    prompts = write_prompts(tmp_path, {"boxes": [{"min": [2, 2, 1], "max": [30, 20, 4]}],
                                       "scribbles": [{"mask": "text.nii.gz"}]})

    code, _, err = segment(capsys, tmp_path / "ct.nii.gz", "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and f"Prompt file {prompts}: scribbles[0] (text.nii.gz): Could not read image" in err
    assert "WorkStarted" not in err  # refused before the box was applied


# ----------------------------------------------------------------------------------------------- P09


def test_P09_ten_thousand_points_are_refused_before_the_image_is_read(tmp_path, capsys, monkeypatch):
    positions = np.random.default_rng(9).integers(0, [122, 101, 30], size=(10_000, 3)).tolist()
    prompts = write_prompts(tmp_path, {"points": [{"position": p, "positive": bool(n % 2)} for n, p in enumerate(positions)]})

    def no_model(*args, **kwargs):
        raise WorkStarted("the model was loaded although the prompt file is refused")

    monkeypatch.setattr(KPrismSession, "__init__", no_model)

    code, _, err = segment(capsys, CT, "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and f"Prompt file {prompts}: points: at most {MAX_POINTS} points per file are accepted, got 10000" in err


@pytest.mark.parametrize(("key", "item", "limit"), [
    ("boxes", {"min": [0, 0, 0], "max": [5, 5, 5]}, MAX_BOXES),
    ("scribbles", {"mask": "stroke.nii.gz"}, MAX_SCRIBBLES),
])
def test_P09_boxes_and_scribbles_are_limited_per_file(tmp_path, key, item, limit):
    (tmp_path / "stroke.nii.gz").write_bytes(b"exists")
    assert len(parse_prompts({key: [item] * limit}, tmp_path / "p.json").model_dump()[key]) == limit

    with pytest.raises(PromptFileError, match=f"{key}: at most {limit} {key} per file are accepted, got {limit + 1}"):
        parse_prompts({key: [item] * (limit + 1)}, tmp_path / "p.json")


def test_P09_more_points_than_the_slice_limit_are_refused_before_any_model_work(tmp_path, capsys, no_model_work):
    rng = np.random.default_rng(0)
    crowded = [{"position": [int(rng.integers(0, 122)), int(rng.integers(0, 101)), 15]} for _ in range(MAX_POINTS_PER_SLICE + 1)]
    spread = [{"position": [60, 50, k % 30]} for k in range(MAX_POINTS_PER_SLICE + 1)]  # at most 7 per slice
    out = tmp_path / "o.nii.gz"

    code, _, err = segment(capsys, CT, "--prompts", write_prompts(tmp_path, {"points": crowded}), "--out", out)
    assert code == 1 and f"{MAX_POINTS_PER_SLICE + 1} points fall on slice" in err and not out.exists()
    assert f"at most {MAX_POINTS_PER_SLICE} points per slice" in err

    # As many points spread over the slices, or exactly the limit on one slice: accepted, the model starts.
    for accepted in (spread, crowded[:-1]):
        code, _, err = segment(capsys, CT, "--prompts", write_prompts(tmp_path, {"points": accepted}), "--out", out)
        assert code != 0 and "WorkStarted" in err and "per slice" not in err


def test_P09_point_outside_is_refused_before_any_model_work_naming_its_path(tmp_path, capsys, no_model_work):
    prompts = write_prompts(tmp_path, {"points": [{"position": [60, 50, 15]}, {"position": [60, 50, 99]}]})

    code, _, err = segment(capsys, CT, "--prompts", prompts, "--out", tmp_path / "o.nii.gz")

    assert code == 1 and f"Prompt file {prompts}: points[1].position: The IJK point" in err and "outside the image" in err


def test_P09_limits_are_the_ones_the_readme_states():
    section = README.read_text(encoding="utf-8").split("### prompts.json", 1)[1].split("\n## ", 1)[0]
    stated = f"at most {MAX_POINTS:,} points per file and {MAX_POINTS_PER_SLICE} per slice"
    assert stated in " ".join(section.split())
    assert f"{MAX_BOXES} boxes and {MAX_SCRIBBLES} scribbles per file" in section


# ----------------------------------------------------------------------------------------------- fuzzing

json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 400), max_value=10 ** 400)
                | st.floats() | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
numbers = st.integers(-300, 300) | st.floats()
positions = st.lists(numbers, max_size=4) | json_values
flags = st.booleans() | json_values
masks = st.sampled_from(["stroke.nii.gz", "./stroke.nii.gz", ".", "sub", "missing.nii.gz", "", "../", "a\0b", "x" * 300]) | json_values
points = st.fixed_dictionaries({"position": positions}, optional={"positive": flags, "label": json_values}) | json_values
boxes = st.fixed_dictionaries({"min": positions, "max": positions}, optional={"positive": flags}) | json_values
scribbles = st.fixed_dictionaries({"mask": masks}, optional={"positive": flags, "pos": json_values}) | json_values
documents = st.fixed_dictionaries({}, optional={
    "coordinates": st.sampled_from(["ijk", "RAS", "lps", "voxel", ""]) | json_values,
    "points": st.lists(points, max_size=4) | json_values,
    "boxes": st.lists(boxes, max_size=3) | json_values,
    "scribbles": st.lists(scribbles, max_size=3) | json_values,
    "point": json_values,
})
VALID = {"coordinates": "ras", "points": [{"position": [-12.5, 40.0, 101.0], "positive": True},
                                          {"position": [-30, 38, 101], "positive": False}],
         "boxes": [{"min": [-60, 10, 95], "max": [10, 70, 110]}], "scribbles": [{"mask": "stroke.nii.gz", "positive": True}]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Where fuzzed prompt files live: one mask file and one folder to name."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "stroke.nii.gz").write_bytes(b"a mask file")
    (root / "sub").mkdir()
    return root


def assert_loaded_or_refused(load, source: Path) -> None:
    """Loading gives a fully valid PromptFile, or a one-line PromptFileError naming the file; nothing else."""
    try:
        prompts = load()
    except PromptFileError as error:
        message = str(error)
        assert message.startswith(("Prompt file ", "Could not read prompt file ")) and str(source) in message
        assert "\n" not in message and "\r" not in message
        return
    assert isinstance(prompts, PromptFile) and prompts.source == source
    assert prompts.coordinates in ("ijk", "ras", "lps")
    assert len(prompts.points) <= MAX_POINTS and len(prompts.boxes) <= MAX_BOXES and len(prompts.scribbles) <= MAX_SCRIBBLES
    positions = [p.position for p in prompts.points] + [c for b in prompts.boxes for c in (b.min, b.max)]
    for position in positions:
        assert 2 <= len(position) <= 3 and all(type(v) is float and math.isfinite(v) for v in position)
    assert all(type(item.positive) is bool for item in [*prompts.points, *prompts.scribbles])
    assert all(s.mask.is_file() for s in prompts.scribbles)
    assert json.loads(prompts.model_dump_json())  # serialisable as it is, for provenance


@FUZZ_SETTINGS
@given(data=documents | json_values)
def test_P11_P13_P15_any_json_value_loads_or_raises_prompt_file_error(folder, data):
    source = folder / "prompts.json"
    assert_loaded_or_refused(lambda: parse_prompts(data, source), source)


@FUZZ_SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(["delete", "insert", "replace"]),
                                st.sampled_from(list('{}[]",:0123456789.-eE tfnrual\\') + ["NaN", "1e999", "\0", "\u00e9", "\n"])),
                      min_size=1, max_size=6))
def test_P11_P13_P15_damaged_copies_of_a_valid_file_load_or_raise_prompt_file_error(folder, edits):
    text = json.dumps(VALID)
    for position, edit, piece in edits:
        at = position % (len(text) + 1)
        if edit == "delete":
            text = text[:at] + text[at + 1:]
        elif edit == "insert":
            text = text[:at] + piece + text[at:]
        else:
            text = text[:at] + piece + text[at + 1:]
    source = folder / "damaged.json"
    source.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_loaded_or_refused(lambda: load_prompt_file(source), source)


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=200))
def test_P13_arbitrary_bytes_load_or_raise_prompt_file_error(folder, raw):
    source = folder / "bytes.json"
    source.write_bytes(raw)
    assert_loaded_or_refused(lambda: load_prompt_file(source), source)


def test_P13_the_valid_example_loads_with_masks_resolved_next_to_the_file(folder):
    source = folder / "valid.json"
    source.write_text(json.dumps(VALID), encoding="utf-8")

    prompts = load_prompt_file(source)

    assert prompts.coordinates == "ras" and [p.positive for p in prompts.points] == [True, False]
    assert prompts.points[1].position == (-30.0, 38.0, 101.0) and prompts.scribbles[0].mask == folder / "stroke.nii.gz"
    assert prompt_file.json_path(("points", 3, "position")) == "points[3].position"
