"""Lesion figures against analytic references, on anisotropic grids where a voxel is not a mm."""

from __future__ import annotations

import numpy as np
import pytest
from LiverLesionSegLib.statistics import MIN_LESION_MM3, label_lesions, lesion_statistics

from deepnav.imaging import grid_like, rotation_matrix


@pytest.mark.parametrize("angle_deg", [0.0, 30.0])  # the grid's rows and columns turned in the axial plane
def test_the_axial_diameter_runs_edge_to_edge(angle_deg):
    """A box of n_i x n_j voxels covers exactly n_i * s_i by n_j * s_j mm in each slice: its longest
    axial diameter is that rectangle's diagonal. Centre to centre would give (n - 1) * s, 1.2 mm
    shorter here."""
    spacing = (0.7, 0.9, 2.5)
    grid = grid_like((40, 30, 8), spacing, (10.0, -20.0, 5.0), rotation_matrix(np.deg2rad([0.0, 0.0, angle_deg])))
    n_i, n_j = 12, 7
    box = np.zeros(grid.array.shape, bool)
    box[2:6, 5:5 + n_j, 4:4 + n_i] = True  # (k, j, i)
    rows = lesion_statistics(label_lesions(box, grid), grid, {})
    diagonal = np.hypot(n_i * spacing[0], n_j * spacing[1])
    assert rows[0]["longest_axial_diameter_mm"] == pytest.approx(diagonal, abs=0.051)  # reported to 0.1 mm


def test_specks_are_dropped_by_volume_in_mm3_not_by_voxel_count():
    """The same rule on two grids: many small voxels that make a speck, few large ones that make a
    lesion. Counting voxels instead of mm3 inverts both answers."""
    fine = grid_like((20, 20, 20), (0.4, 0.5, 0.6), (0.0, 0.0, 0.0), np.eye(3))  # 0.12 mm3 a voxel
    speck = np.zeros(fine.array.shape, bool)
    speck[5:8, 5:8, 5:8] = True  # 27 voxels, 3.2 mm3
    assert speck.sum() >= MIN_LESION_MM3 > speck.sum() * np.prod(fine.spacing)
    assert label_lesions(speck, fine).max() == 0

    coarse = grid_like((20, 20, 20), (2.0, 2.5, 3.0), (0.0, 0.0, 0.0), np.eye(3))  # 15 mm3 a voxel
    lesion = np.zeros(coarse.array.shape, bool)
    lesion[5, 5, 5:7] = True  # 2 voxels, 30 mm3
    assert lesion.sum() < MIN_LESION_MM3 <= lesion.sum() * np.prod(coarse.spacing)
    assert label_lesions(lesion, coarse).max() == 1
