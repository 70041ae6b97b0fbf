"""`kprism demo`: the three kinds of knowledge on the bundled sample cases, scored against their truth."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .data.interaction import click_loop, dice
from .evaluate.clickers import SliceClicker, source_slice
from .io import read_image, read_mask, render_panels, write_output
from .samples import sample_path
from .session import KPrismSession, Reference

CT_CLASS = "liver"
CT_CLICKS = 3


def run_demo(out: Path, session: KPrismSession) -> dict[str, float]:
    """Runs semantic, in-context, interactive and combined prompts; writes segmentations and overview.png."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    scores: dict[str, float] = {}
    panels = []

    # 1. Semantic: the class name alone.
    xray = read_image(sample_path("chest_xray", "MCUCXR_0013_0.png"), modality="x-ray")
    lung_truth = read_mask(sample_path("chest_xray", "MCUCXR_0013_0_lung.png"), reference=xray).array > 0
    session.set_image(xray)
    lung = session.segment_semantic(["lung"])["lung"]
    scores["semantic: lung on a chest X-ray"] = dice(lung.mask, lung_truth)
    _write(out / "chest_xray_lung.seg.nrrd", lung.mask, xray, "lung", session)
    panels.append({"image": xray, "labels": lung.mask, "title": f"semantic 'lung'  Dice {scores['semantic: lung on a chest X-ray']:.3f}"})

    # 2. Semantic + one corrective click on the largest error (combined modes).
    refined = click_loop(SliceClicker(session.target, 0, 0), lung_truth, "kprism", 1, start=lung.mask > 0)
    if refined.clicks:
        click = refined.clicks[0]
        scores["semantic + 1 click: lung"] = refined.dice[-1]
        panels.append({"image": xray, "labels": session.result().mask, "points": [(*click.point, click.positive)],
                       "title": f"+1 click  Dice {scores['semantic + 1 click: lung']:.3f}"})

    # 3. In-context: another patient's annotated scan says what to find.
    target = read_image(sample_path("fetal_head", "hc18_013.png"), modality="ultrasound")
    head_truth = read_mask(sample_path("fetal_head", "hc18_013_fetal_head.png"), reference=target).array > 0
    ref_image = read_image(sample_path("fetal_head", "hc18_023.png"), modality="ultrasound")
    ref_mask = read_mask(sample_path("fetal_head", "hc18_023_fetal_head.png"), reference=ref_image).array
    session.set_image(target)
    head = session.segment_in_context([Reference(ref_image, ref_mask)])
    scores["in-context: fetal head (1 reference)"] = dice(head.mask, head_truth)
    _write(out / "fetal_head_in_context.seg.nrrd", head.mask, target, "fetal_head", session)
    panels.append({"image": ref_image, "labels": (ref_mask > 0).astype(np.uint8), "title": "reference (another patient)"})
    panels.append({"image": target, "labels": head.mask,
                   "title": f"in-context  Dice {scores['in-context: fetal head (1 reference)']:.3f}"})

    # 4. Interactive: clicks on one CT slice, each placed on the largest remaining error.
    ct = read_image(sample_path("ct", "ts_ct_001crop.nii.gz"), modality="ct")
    labels = read_mask(sample_path("ct", "ts_ct_001crop_labels.nii.gz"), reference=ct).array
    value = json.loads(sample_path("ct", "labels.json").read_text(encoding="utf-8"))[CT_CLASS]
    organ = labels == value
    k = int(np.argmax(organ.sum(axis=(1, 2))))  # the axial slice (array axis 0) with the most liver
    session.set_image(ct)
    axis, shown_slice = source_slice(session.view, 0, k)  # slice k in the canonical view the overview draws
    clicker = SliceClicker(session.new_target(CT_CLASS), axis, shown_slice, propagate=None)  # each click travels in 3D
    curve = click_loop(clicker, clicker.truth_of(organ), "kprism", CT_CLICKS)
    result = clicker.target.result()
    clicks = [(*c.point, c.positive) for c in curve.clicks]  # (row, column) on the shown slice
    scores[f"interactive: CT {CT_CLASS}, {len(clicks)} clicks (slice Dice)"] = curve.dice[-1]
    _write(out / f"ct_{CT_CLASS}_clicks.seg.nrrd", result.mask, ct, CT_CLASS, session)
    panels.append({"image": ct, "labels": result.mask, "axis": axis, "slice_index": shown_slice, "points": clicks,
                   "title": f"{len(clicks)} clicks on CT {CT_CLASS}  Dice {curve.dice[-1]:.3f}"})

    # 5. Every CT class of the sample at once, from the one-pass class head (when the model has one).
    if session.model.class_head is not None:
        values = {n: v for n, v in json.loads(sample_path("ct", "labels.json").read_text(encoding="utf-8")).items()
                  if v and n in session.catalog}
        organs = session.segment_semantic_labels(list(values))
        found = [dice(organs.labels == i + 1, labels == v) for i, v in enumerate(values.values()) if (labels == v).any()]
        key = f"semantic: {len(values)} CT classes in one pass (mean Dice)"
        scores[key] = float(np.mean(found))
        segments = [{"name": n, "value": i + 1, "color": session.catalog.entry(n).color} for i, n in enumerate(values)]
        write_output(organs.labels.astype(np.uint8), ct.geometry, out / "ct_all_classes.seg.nrrd", segments=segments)
        panels.append({"image": ct, "labels": organs.labels, "slice_index": shown_slice,
                       "colors": {s["value"]: s["color"] for s in segments},
                       "title": f"{len(values)} CT classes, one pass  mean Dice {scores[key]:.3f}"})

    overview = render_panels(panels, out / "overview.png", columns=3)
    elapsed = time.perf_counter() - started
    print("KPrism demo: bundled model on bundled sample cases (Dice against their truth):")
    for name, score in scores.items():
        print(f"  {name:<50s} {score:.3f}")
    print(f"wrote {len(panels)} panels to {overview} and segmentations to {out}/ in {elapsed:.1f} s")
    return scores


def _write(path: Path, mask: np.ndarray, image, name: str, session: KPrismSession) -> None:
    color = session.catalog.entry(name).color if name in session.catalog else (241, 214, 145)
    write_output(mask.astype(np.uint8), image.geometry, path, segments=[{"name": name, "value": 1, "color": color}])
