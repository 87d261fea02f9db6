"""The 128^3 fusion grid keeps the MR's geometry; bad input stops with a clear message."""

import numpy as np
import pytest

from deepnav.errors import InputError
from deepnav.imaging import Volume
from MRUSFusionLib.preprocess import fusion_grid, prepare_pair


def test_grid_is_128_cubed_1mm_in_mr_orientation_centred_on_the_liver(patient):
    grid = fusion_grid(patient.mr, patient.liver)
    assert grid.array.shape == (128, 128, 128)
    np.testing.assert_allclose(grid.spacing, 1.0)
    np.testing.assert_allclose(grid.direction, patient.mr.direction)
    k, j, i = np.nonzero(patient.liver.array)
    lo, hi = np.array([i.min(), j.min(), k.min()]), np.array([i.max(), j.max(), k.max()])
    liver_centre = patient.liver.index_to_lps(((lo + hi) / 2)[None])[0]
    np.testing.assert_allclose(grid.index_to_lps(np.array([[63.5] * 3]))[0], liver_centre, atol=1e-6)


def test_pair_is_normalised_and_the_us_is_zero_outside_its_field_of_view(patient):
    frame = patient.frames[0]
    pair = prepare_pair(patient.mr, frame.image, liver=patient.liver,
                        mr_vessels=patient.vessels, us_vessels=frame.vessels)
    for a in (pair.fixed, pair.moving):
        assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1
    assert 0.2 < pair.fov.mean() < 1.0
    assert np.all(pair.moving[pair.fov == 0] == 0)
    assert pair.fixed_label.max() > 0.9 and pair.moving_label.max() > 0.9


def test_a_us_volume_that_does_not_overlap_is_refused(patient):
    us = patient.frames[0].image
    far = Volume(us.array, us.spacing, us.origin + np.array([500.0, 0, 0]), us.direction)
    with pytest.raises(InputError, match="does not overlap"):
        prepare_pair(patient.mr, far, liver=patient.liver)


def test_nan_and_constant_images_mismatched_and_empty_labels_are_refused(patient):
    frame = patient.frames[0]
    bad = frame.image.with_array(frame.image.array.astype(np.float32))
    bad.array[10, 10, 10] = np.inf
    with pytest.raises(InputError, match="NaN/Inf"):
        prepare_pair(patient.mr, bad)
    with pytest.raises(InputError, match="MR has no contrast: every voxel is 50"):
        prepare_pair(patient.mr.with_array(np.full(patient.mr.array.shape, 50, patient.mr.array.dtype)), frame.image)
    blank = np.where(frame.image.array > 0, 7, 0).astype(frame.image.array.dtype)  # the fan kept, nothing in it
    with pytest.raises(InputError, match="US volume has no contrast: every voxel with data is 7"):
        prepare_pair(patient.mr, frame.image.with_array(blank))
    with pytest.raises(InputError, match="US volume holds no data"):
        prepare_pair(patient.mr, frame.image.with_array(np.zeros_like(frame.image.array)))
    with pytest.raises(InputError, match="US vessel label does not match"):
        prepare_pair(patient.mr, frame.image, us_vessels=patient.vessels)
    with pytest.raises(InputError, match="empty"):
        prepare_pair(patient.mr, frame.image, mr_vessels=patient.vessels.with_array(np.zeros_like(patient.vessels.array)))
