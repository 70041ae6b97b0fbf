"""The canonical LPS view: exact round trips and index mapping for any direction."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kprism.image import Geometry
from kprism.orientation import CanonicalView


def permuted_directions():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            matrix = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(perm, signs)):
                matrix[row, column] = sign
            yield matrix


@pytest.mark.parametrize("direction", list(permuted_directions())[::3])
def test_canonical_view_points_i_left_j_posterior_k_superior(direction):
    geometry = Geometry((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), tuple(direction.ravel()))
    shape = (4, 5, 6)
    view = CanonicalView.of(geometry, shape)
    array = np.arange(np.prod(shape)).reshape(shape)
    canonical = view.to_canonical(array)
    np.testing.assert_array_equal(view.from_canonical(canonical), array)
    # Moving +1 along canonical array axis 2 (index i') must move towards patient left (+x in LPS).
    for source_index in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        c = view.index_to_canonical(np.array(source_index, float))
        assert canonical[tuple(c.astype(int))] == array[source_index]
        np.testing.assert_array_equal(view.index_from_canonical(c), source_index)
        neighbour = c + [0, 0, 1]
        if neighbour[2] < canonical.shape[2]:
            src = view.index_from_canonical(neighbour).astype(int)
            step = geometry.index_to_lps(src[::-1]) - geometry.index_to_lps(np.array(source_index)[::-1])
            assert step[0] > 0 and abs(step[1]) < 1e-9 and abs(step[2]) < 1e-9


def test_two_d_images_are_kept_as_stored():
    view = CanonicalView.of(Geometry.identity(2), (3, 4))
    array = np.arange(12).reshape(3, 4)
    assert view.to_canonical(array) is not None and np.array_equal(view.to_canonical(array), array)
