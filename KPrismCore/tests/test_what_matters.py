"""The shipped `kprism-medsam` answers what the prompt asks (issue 13, item 3), on the bundled samples.

The chest X-ray and fetal head targets are test-split images no model trained on. Measured on the
shared test splits by `benchmarks/what_matters.py` (results/what_matters.md); these are the same
checks on one image each, so they run on any clone. `kprism-tiny` fails the one-lung check (it
returns both lungs: Dice 0.63 to the one asked for), which is why it is not tested here.
"""

from __future__ import annotations

import numpy as np
import pytest

from kprism.data.interaction import dice
from kprism.data.parts import ordered_parts
from kprism.io import read_image, read_mask
from kprism.samples import sample_path
from kprism.session import KPrismSession


@pytest.fixture(scope="module")
def medsam():
    return KPrismSession("kprism-medsam", threads=2)


def load(folder: str, name: str, structure: str):
    image = read_image(sample_path(folder, f"{name}.png"))
    return image, read_mask(sample_path(folder, f"{name}_{structure}.png")).array > 0


def test_ordered_parts_count_from_the_image_left():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 20:27] = True  # right-hand part, larger
    mask[5:10, 2:6] = True
    mask[0, 15] = True  # a speck below the size share: not a part
    left, right = ordered_parts(mask)
    assert left[5:10, 2:6].all() and left.sum() == 20 and right.sum() == 70
    assert ordered_parts(mask[:, :10]) == []  # one part is no pair


@pytest.mark.parametrize("side", [0, 1])
def test_a_reference_marking_one_lung_returns_that_lung_and_not_the_other(medsam, side):
    ref_image, ref_lungs = load("chest_xray", "MCUCXR_0001_0", "lung")
    image, lungs = load("chest_xray", "MCUCXR_0013_0", "lung")
    ref_parts, parts = ordered_parts(ref_lungs), ordered_parts(lungs)
    medsam.set_image(image)
    mask = medsam.segment_in_context([(ref_image, ref_parts[side].astype(np.uint8))]).mask.astype(bool)
    other = parts[1 - side]
    assert dice(mask, parts[side]) >= 0.90
    assert (mask & other).sum() / other.sum() < 0.10
    whole = medsam.segment_in_context([(ref_image, ref_lungs.astype(np.uint8))]).mask.astype(bool)
    assert dice(whole, lungs) >= 0.90  # the whole-lungs reference still asks for both


# Anatomy of CT/MR volumes asked of 2D pictures. (The main structure of *another* 2D dataset — a fetal head
# or skin lesion asked of a chest X-ray — still returns the image's own main structure; see what_matters.md.)
ABSENT = ["prostate", "liver", "aorta", "kidney_left", "left_atrium", "tumor"]


@pytest.mark.parametrize("engine", ["one_pass", "prompted"])
@pytest.mark.parametrize("folder, name, structure", [("chest_xray", "MCUCXR_0013_0", "lung"),
                                                     ("fetal_head", "hc18_013", "fetal_head")])
def test_a_class_the_image_does_not_show_is_answered_with_nothing_and_its_own_class_is_found(
        medsam, folder, name, structure, engine):
    image, truth = load(folder, name, structure)
    medsam.set_image(image)
    results = medsam.segment_semantic(ABSENT + [structure], engine=engine)
    for asked in ABSENT:
        assert results[asked].mask.mean() < 0.01, asked
    assert dice(results[structure].mask.astype(bool), truth) >= 0.85
