"""The synthetic patient is deterministic, geometrically non-trivial, and its truth is consistent."""

import numpy as np
import pytest
from scipy import ndimage

from deepnav.imaging import read_volume
from deepnav.markups import read_markups
from MRUSFusionLib.patient_files import write_patient
from MRUSFusionLib.phantom import make_patient


def test_same_seed_same_patient_bit_for_bit(patient):
    again = make_patient(3, frames=2)
    assert np.array_equal(again.mr.array, patient.mr.array)
    assert np.array_equal(again.frames[1].image.array, patient.frames[1].image.array)
    np.testing.assert_array_equal(again.frames[1].landmarks_lps, patient.frames[1].landmarks_lps)


def test_geometry_is_non_trivial(patient):
    mr = patient.mr
    assert np.linalg.norm(mr.origin) > 10
    assert len(set(np.round(mr.spacing, 3))) > 1  # anisotropic
    assert not np.allclose(mr.direction, np.eye(3))  # odd seeds: oblique MR
    us = patient.frames[0].image
    assert not np.allclose(np.abs(us.direction), np.eye(3), atol=0.05)  # probe-aligned US grid
    assert make_patient(4, frames=1).mr.direction.tolist() == np.eye(3).tolist()


def test_labels_and_landmarks_agree_with_the_images(patient):
    assert patient.vessels.array.any() and patient.liver.array.any()
    assert patient.liver.same_grid(patient.mr) and patient.vessels.same_grid(patient.mr)
    # MR vessels are bright (contrast), US vessels dark (anechoic): the modality gap
    mr_in = patient.mr.array[patient.vessels.array > 0].mean()
    liver_only = (patient.liver.array > 0) & (patient.vessels.array == 0)
    assert mr_in > 1.2 * patient.mr.array[liver_only].mean()
    frame = patient.frames[1]
    interior = ndimage.binary_erosion(frame.vessels.array > 0, iterations=2)  # inside the bright walls
    us_in = frame.image.array[interior].mean()
    us_tissue = frame.image.array[(frame.fov.array > 0) & (frame.vessels.array == 0)].mean()
    assert us_in < 0.6 * us_tissue


def test_true_landmark_positions_are_consistent_with_the_motion(patient):
    for frame in patient.frames:
        back = frame.motion.us_to_mr(frame.landmarks_lps)
        np.testing.assert_allclose(back, patient.landmarks_lps, atol=1e-6)
    # bifurcations are vessel centres: the US vessel label is set at their true US position
    frame = patient.frames[1]
    names = patient.landmark_names
    bif = np.array([n.startswith("bifurcation") for n in names])
    idx = np.round(frame.vessels.lps_to_index(frame.landmarks_lps[bif])).astype(int)
    inside = np.all((idx >= 0) & (idx < np.array(frame.vessels.size_ijk)), axis=1)
    values = frame.vessels.array[idx[inside, 2], idx[inside, 1], idx[inside, 0]]
    assert inside.sum() >= 3 and values.mean() > 0.7


def test_breathing_grows_over_the_half_cycle(patient):
    amplitudes = [f.motion.breath_amplitude for f in patient.frames]
    assert amplitudes[0] == pytest.approx(0.0) and amplitudes[-1] > 5.0


def test_written_patient_reads_back_with_its_geometry(patient, tmp_path):
    index = write_patient(patient, tmp_path)
    mr = read_volume(tmp_path / index["mr"])
    assert mr.same_grid(patient.mr, tol_mm=1e-4) and np.array_equal(mr.array, patient.mr.array)
    us = read_volume(tmp_path / index["frames"][1]["us"])
    assert us.same_grid(patient.frames[1].image, tol_mm=1e-4)
    points, names = read_markups(tmp_path / index["frames"][1]["landmarks_us"])
    np.testing.assert_allclose(points, patient.frames[1].landmarks_lps, atol=1e-9)
    assert names == patient.landmark_names
