"""kprism.pipeline: the one path from a segmentation request to session calls (issue 11, item 4).

The CLI, the Slicer logic and the batch all build a `SegmentationRequest` and hand it to
`pipeline.run`; these tests pin the rules once: which inputs clash, what is read and checked before
any model work, which session calls a request becomes, and what the provenance says.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from test_reliability import WorkStarted

from kprism.catalog import UnknownClassError
from kprism.io import read_image
from kprism.pipeline import (
    CLI_NAMES,
    BoxPrompt,
    ClickPrompt,
    ReferenceFiles,
    RequestError,
    ScribblePrompt,
    SegmentationRequest,
    run,
)
from kprism.prompt_file import MAX_POINTS_PER_SLICE, PromptFileError, parse_prompts
from kprism.samples import sample_path
from kprism.session import Cancelled, KPrismSession, Reference

XRAY = sample_path("chest_xray", "MCUCXR_0013_0.png")
XRAY_LUNG = sample_path("chest_xray", "MCUCXR_0013_0_lung.png")
CT = sample_path("ct", "ts_ct_001crop.nii.gz")  # 122 × 101 × 30 (i, j, k)


@pytest.fixture(scope="module")
def session() -> KPrismSession:
    return KPrismSession(device="cpu", threads=1)


@pytest.fixture
def xray(session) -> KPrismSession:
    session.set_image(read_image(XRAY, modality="x-ray"))
    return session




def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def lung_point() -> list[float]:
    """A voxel well inside the right lung of the bundled X-ray, as IJK [column, row]."""
    truth = read_image(XRAY_LUNG).array > 0
    rows, columns = np.nonzero(truth)
    inside = np.argmin((rows - rows.mean()) ** 2 + (columns - np.percentile(columns, 25)) ** 2)
    return [float(columns[inside]), float(rows[inside])]


# ----------------------------------------------------------------------------------------------- refusals


CLASH_CASES = [
    (dict(classes=["liver"], references=[ReferenceFiles("a.png", "b.png")]),
     "Use either --classes (semantic) or --reference (in-context), not both.",
     "Use either classes (semantic) or references (in-context), not both."),
    (dict(classes=["liver", "spleen"], init_mask="m.nii.gz"),
     "Prompts and --init-mask refine one structure: give a single class with them.",
     "Prompts and an initial mask refine one structure: give a single class with them."),
    (dict(classes=["liver", "spleen"], prompts=[ClickPrompt((1, 2, 3))]),
     "Prompts and --init-mask refine one structure: give a single class with them.",
     "Prompts and an initial mask refine one structure: give a single class with them."),
    (dict(prompts=[ClickPrompt((1, 2, 3))], cross_axes=True),
     "--cross-axes refines --propagate: give both.",
     "cross_axes refines propagate: give both."),
    (dict(),
     "Nothing to segment: give --classes, --reference, --prompts or --init-mask.",
     "Nothing to segment: give classes, references, prompts or an initial mask."),
    (dict(prompts=[]),
     "Nothing to segment: give --classes, --reference, --prompts or --init-mask.",
     "Nothing to segment: give classes, references, prompts or an initial mask."),
    (dict(classes=["liver", "spleen"], propagate=True),
     "--propagate carries one structure: use it with prompts, --init-mask or a single class.",
     "propagate carries one structure: use it with prompts, an initial mask or a single class."),
]


@pytest.mark.parametrize(("fields", "cli_message", "api_message"), CLASH_CASES)
def test_CR4_clashing_inputs_are_refused_in_the_callers_words(fields, cli_message, api_message):
    with pytest.raises(RequestError) as from_cli:
        SegmentationRequest(**fields, names=CLI_NAMES)
    with pytest.raises(RequestError) as from_api:
        SegmentationRequest(**fields)

    assert str(from_cli.value) == cli_message and str(from_api.value) == api_message


def test_an_empty_prompt_file_is_nothing_to_segment(tmp_path):
    with pytest.raises(RequestError, match="Nothing to segment"):
        SegmentationRequest(prompts=parse_prompts({"points": []}, tmp_path / "p.json"))


@pytest.mark.parametrize(("fields", "message"), [
    (dict(classes=["liver"], engine="fast"), "engine must be 'auto', 'one_pass' or 'prompted', not 'fast'"),
    (dict(classes=["liver"], axis=3), "axis must be 0 (axial), 1 (coronal) or 2 (sagittal); got 3"),
])
def test_unknown_engine_or_axis_is_refused(fields, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SegmentationRequest(**fields)


def test_repeated_classes_are_requested_once_with_a_note():
    with pytest.warns(UserWarning, match="Repeated class names are segmented once: liver"):
        request = SegmentationRequest(classes=["liver", " spleen", "liver", "", "liver "])

    assert request.classes == ["liver", "spleen"]


def test_unknown_class_lists_the_known_ones_before_any_model_work(xray, no_model_work):
    request = SegmentationRequest(classes=["lung", "livr"])

    with pytest.raises(UnknownClassError, match="Unknown class 'livr'. Did you mean liver") as error:
        run(request, xray)

    assert "Known classes:" in str(error.value) and "lung" in str(error.value)


def test_bad_prompts_are_refused_before_any_model_work_naming_them(session, no_model_work, tmp_path):
    session.set_image(read_image(CT))
    outside = SegmentationRequest(prompts=[ClickPrompt((60, 50, 15), where="click A"), ClickPrompt((60, 50, 99), where="click B")])
    with pytest.raises(PromptFileError, match=r"^click B: The IJK point .* outside the image"):
        run(outside, session)

    crowded = [ClickPrompt((float(i % 122), float(i // 122), 15.0)) for i in range(MAX_POINTS_PER_SLICE + 1)]
    with pytest.raises(PromptFileError, match=f"^{MAX_POINTS_PER_SLICE + 1} clicks fall on slice 15; at most "
                                              f"{MAX_POINTS_PER_SLICE} clicks per slice"):
        run(SegmentationRequest(prompts=crowded), session)
    with pytest.raises(PromptFileError, match=f"^{MAX_POINTS_PER_SLICE + 1} points fall on slice 15"):
        run(SegmentationRequest(prompts=crowded, names=CLI_NAMES), session)
    spread_over_views = crowded[:-1] + [ClickPrompt((60.0, 50.0, 15.0), axis=2)]  # the last one on a sagittal slice
    with pytest.raises(WorkStarted):
        run(SegmentationRequest(prompts=spread_over_views), session)

    empty = np.zeros(read_image(CT).spatial_shape, np.uint8)
    with pytest.raises(PromptFileError, match="the scribble: the mask marks nothing on the image"):
        run(SegmentationRequest(prompts=[BoxPrompt((2, 2, 1), (30, 20, 4)), ScribblePrompt(empty, where="the scribble")]),
            session)
    with pytest.raises(PromptFileError, match=r"the mask has shape \(3, 3\); the image has \(30, 101, 122\)"):
        run(SegmentationRequest(prompts=[ScribblePrompt(np.ones((3, 3)), where="the scribble")]), session)


def test_a_missing_reference_file_is_refused_before_any_model_work(xray, no_model_work, tmp_path):
    request = SegmentationRequest(references=[ReferenceFiles(XRAY, tmp_path / "missing.png")])

    with pytest.raises((OSError, ValueError), match="missing.png"):
        run(request, xray)


# ----------------------------------------------------------------------------------------------- session calls


def test_CR4_one_class_then_a_click_is_the_class_result_refined_by_that_click(session):
    """The pipeline makes the session calls a user would: segment the class, then click with its knowledge kept."""
    image = read_image(XRAY, modality="x-ray")
    point = lung_point()
    session.set_image(image)
    outcome = run(SegmentationRequest(classes=["lung"], prompts=[ClickPrompt(point, positive=True)]), session)

    session.set_image(image)
    session.segment_semantic(["lung"])
    by_hand = session.add_click(point, positive=True)

    assert outcome.names == ["lung"] and outcome.labelmap is None
    assert np.array_equal(outcome.results["lung"].probability, by_hand.probability)
    assert outcome.target is not None and outcome.target.knowledge.class_ids.tolist() == [session.catalog.index("lung")]
    assert dice(outcome.labels(), read_image(XRAY_LUNG).array) > 0.85
    assert outcome.provenance == {"classes": ["lung"], "prompts": 1}


def test_CR4_a_prompt_file_and_the_same_prompts_as_steps_give_the_same_result(session, tmp_path):
    image = read_image(CT)
    stroke = np.zeros(image.spatial_shape, np.uint8)
    stroke[15, 40:44, 50:60] = 1
    written = sitk.GetImageFromArray(stroke)
    written.CopyInformation(sitk.ReadImage(str(CT)))
    sitk.WriteImage(written, str(tmp_path / "stroke.nii.gz"))
    prompt_file = parse_prompts({"boxes": [{"min": [40, 30, 14], "max": [80, 70, 16]}],
                                 "scribbles": [{"mask": "stroke.nii.gz", "positive": True}],
                                 "points": [{"position": [60, 50, 15], "positive": False}]}, tmp_path / "prompts.json")
    steps = [BoxPrompt((40, 30, 14), (80, 70, 16)), ScribblePrompt(stroke), ClickPrompt((60, 50, 15), positive=False)]

    session.set_image(image)
    from_file = run(SegmentationRequest(prompts=prompt_file), session)
    session.set_image(image)
    from_steps = run(SegmentationRequest(prompts=steps), session)

    assert from_file.results["segment"].mask.any()
    assert np.array_equal(from_file.results["segment"].probability, from_steps.results["segment"].probability)
    assert from_file.provenance == {"prompts": str(tmp_path / "prompts.json")} and from_steps.provenance == {"prompts": 3}


def test_CR4_several_classes_make_the_sessions_label_map(session):
    session.set_image(read_image(CT))
    outcome = run(SegmentationRequest(classes=["liver", "spleen"]), session)
    by_hand = session.segment_semantic_labels(["liver", "spleen"])

    assert outcome.target is None and outcome.names == ["liver", "spleen"]
    assert np.array_equal(outcome.labels(), by_hand.labels) and (outcome.labels() == 1).any()
    masks = dict(outcome.masks())
    assert np.array_equal(masks["spleen"], (by_hand.labels == 2).astype(np.uint8))
    assert outcome.quality_kind == "mean confidence"  # the bundled model's one-pass class head


def test_an_initial_mask_file_is_read_onto_the_image_and_becomes_the_result(xray, tmp_path):
    truth = read_image(XRAY_LUNG).array > 0
    small = sitk.GetImageFromArray((truth[::2, ::2] * 255).astype(np.uint8))  # half size: scaled onto the image
    sitk.WriteImage(small, str(tmp_path / "rough.png"))

    outcome = run(SegmentationRequest(init_mask=tmp_path / "rough.png", name="lungs"), xray)

    assert outcome.names == ["lungs"] and dice(outcome.labels(), truth) > 0.97
    assert outcome.provenance == {"init_mask": str(tmp_path / "rough.png")}


@pytest.mark.filterwarnings("ignore::kprism.reference_agreement.ReferenceMismatchWarning")
def test_references_from_files_are_read_with_their_label(xray, tmp_path):
    truth = read_image(sample_path("chest_xray", "MCUCXR_0001_0_lung.png")).array > 0
    labels = sitk.GetImageFromArray(np.where(truth, 3, 1).astype(np.uint8))  # label 3 marks the lungs
    sitk.WriteImage(labels, str(tmp_path / "labels.png"))
    request = SegmentationRequest(references=[ReferenceFiles(sample_path("chest_xray", "MCUCXR_0001_0.png"),
                                                             tmp_path / "labels.png", label=3)])

    outcome = run(request, xray)

    assert dice(outcome.labels(), read_image(XRAY_LUNG).array) > 0.8
    assert outcome.provenance["reference_label"] == 3 and outcome.provenance["references"][0][1].endswith("labels.png")


@pytest.mark.filterwarnings("ignore::kprism.reference_agreement.ReferenceMismatchWarning")
def test_the_callers_descriptions_go_into_the_provenance(xray):
    reference = Reference(read_image(sample_path("chest_xray", "MCUCXR_0001_0.png")),
                          read_image(sample_path("chest_xray", "MCUCXR_0001_0_lung.png")).array)
    request = SegmentationRequest(references=[reference], prompts=[ClickPrompt(lung_point())],
                                  provenance={"references": [{"segment": "lungs"}], "prompts": [{"type": "point"}]})

    outcome = run(request, xray)

    assert outcome.provenance == {"references": [{"segment": "lungs"}], "prompts": [{"type": "point"}]}
    json.dumps(outcome.provenance)  # JSON-ready


def test_cancel_stops_the_run_and_nothing_is_returned(session):
    session.set_image(read_image(CT))
    calls = []

    with pytest.raises(Cancelled, match="cancelled"):
        run(SegmentationRequest(classes=["liver"], engine="prompted"), session,
            progress=lambda done, total: calls.append(done), cancel=lambda: len(calls) >= 1)

    assert len(calls) == 1  # stopped after the first batch of slices, not at the end
