"""The correction stage (MIND-SSC, discrete search, robust rigid fit, refinement) and the
registration region that follows the data."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import oblique_volume
from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, matrix_to_affine, resample_to_grid, rotation_matrix
from MRUSFusionLib import correction
from MRUSFusionLib.fields import displacement_transform, transform_points
from MRUSFusionLib.preprocess import registration_region
from MRUSFusionLib.registration import correct_registration


def textured(shape, seed=0, blur=1.5) -> np.ndarray:
    """Smoothed noise with blobs: structure at every scale, like tissue, float32 >= 0.01."""
    rng = np.random.default_rng(seed)
    noise = sitk.GetImageFromArray(rng.random(shape).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, blur))
    return (smooth - smooth.min() + 0.01).astype(np.float32)


def rigid_about(angles_deg, shift_mm, centre) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(np.deg2rad(angles_deg))
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ centre + shift_mm
    return m


def moved_copy(volume: Volume, move: np.ndarray) -> Volume:
    """The same voxels placed by `move`: a voxel at p now lies at move(p). The truth of a
    registration fixed=volume -> moving=result is p -> move(p)."""
    return Volume.from_ijk_to_lps(volume.array, move @ volume.ijk_to_lps())


def test_mind_ssc_ignores_affine_intensity_changes():
    image = torch.from_numpy(textured((24, 28, 32)))[None, None]
    a = correction.mind_ssc(image)
    b = correction.mind_ssc(3.0 - 2.5 * image)  # a contrast inversion and rescaling, as between modalities
    assert a.shape == (1, 12, 24, 28, 32)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert a.std() > 0.05  # and it is not a constant


def test_refinement_sampler_reads_what_grid_sample_reads_with_half_voxel_central_differences():
    """The refinement's samplers give grid_sample's trilinear values (zeros outside its box) and,
    as their gradient, the difference of the values half a voxel either side (the interpolant's
    own derivative jumps at the voxel faces, where the refinement starts)."""
    rng = np.random.default_rng(3)
    image = torch.from_numpy(rng.random((2, 10, 12, 14)).astype(np.float32))[None]  # (1, C, k, j, i)

    def grid_sample(pos):  # voxel (i, j, k) -> grid_sample's [-1, 1] (align_corners)
        grid = (pos * torch.tensor([2.0 / 13, 2.0 / 11, 2.0 / 9]) - 1.0).view(1, 1, 1, -1, 3)
        return torch.nn.functional.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                               align_corners=True).view(2, -1)

    rows = correction.Rows(image[:, :1], image[:, 1:])  # channels side by side, as the features and their support
    pos = torch.from_numpy(rng.uniform([-2, -2, -2], [15, 13, 11], (300, 3)).astype(np.float32))
    pos[:50] = pos[:50].round()  # on voxels, and on faces
    pos[50:100, 0] = pos[50:100, 0].floor() + 0.5
    moving = pos.clone().requires_grad_()
    weights = torch.tensor([[0.7], [-1.3]])
    sampled = correction._TrilinearWithGradient.apply(moving, rows)
    np.testing.assert_allclose(sampled.detach().numpy(), grid_sample(pos).numpy(), atol=1e-5)
    np.testing.assert_allclose(correction.trilinear(pos, rows).numpy(), grid_sample(pos).numpy(), atol=1e-5)
    (weights * sampled).sum().backward()
    for axis in range(3):
        half = torch.zeros(3)
        half[axis] = 0.5
        expected = (weights * (grid_sample(pos + half) - grid_sample(pos - half))).sum(0)
        np.testing.assert_allclose(moving.grad[:, axis].numpy(), expected.numpy(), atol=1e-5)
    box = rows.within(torch.tensor([3, 2, 1]), torch.tensor([9, 8, 7]))  # a box reads zeros outside it
    cropped = torch.zeros_like(image)
    cropped[:, :, 1:7, 2:8, 3:9] = image[:, :, 1:7, 2:8, 3:9]
    image = cropped
    np.testing.assert_allclose(correction._TrilinearWithGradient.apply(pos, box).numpy(), grid_sample(pos).numpy(), atol=1e-5)
    np.testing.assert_allclose(correction.trilinear(pos, box).numpy(), grid_sample(pos).numpy(), atol=1e-5)


def test_lts_rigid_fit_ignores_a_third_of_wild_correspondences():
    rng = np.random.default_rng(0)
    p = rng.uniform(-40, 40, (300, 3))
    truth = rigid_about((4.0, -3.0, 6.0), (2.0, -5.0, 3.0), np.zeros(3))
    q = p @ truth[:3, :3].T + truth[:3, 3] + rng.normal(0, 0.2, p.shape)
    wild = rng.choice(300, 100, replace=False)
    q[wild] += rng.uniform(-20, 20, (100, 3))
    def worst_error(matrix):  # over the 80 mm cube the points span, mm
        return np.linalg.norm(p @ (matrix[:, :3] - truth[:3, :3]).T + matrix[:, 3] - truth[:3, 3], axis=1).max()

    matrix, residual = correction.lts_rigid(p, q)
    assert worst_error(matrix) < 0.15
    assert np.median(residual[wild]) > 5 and np.median(np.delete(residual, wild)) < 0.5
    assert worst_error(correction.kabsch(p, q)) > 1.0  # least squares alone is pulled away


def small_pair(move: np.ndarray, spacing=0.8, shape=(72, 72, 72), seed=1):
    fixed = oblique_volume(textured(shape, seed), spacing=(spacing,) * 3, angles_deg=(5.0, -8.0, 12.0))
    return fixed, moved_copy(fixed, move)


def test_correction_recovers_a_known_rigid_move_through_the_transform_it_returns():
    fixed, _ = small_pair(np.eye(4))
    centre = fixed.centre_lps()
    move = rigid_about((5.0, -4.0, 3.0), (4.0, -3.0, 5.0), centre)
    moving = moved_copy(fixed, move)
    region = registration_region(fixed, moving)
    c = correct_registration(fixed, moving, region)
    points = fixed.index_to_lps(np.array([[20, 20, 20], [36, 36, 36], [50, 24, 40], [30, 50, 22]], float))
    truth = points @ move[:3, :3].T + move[:3, 3]
    got = transform_points(sitk.CompositeTransform([*c.start_transforms, matrix_to_affine(c.matrix_lps)]), points)
    initial = np.linalg.norm(points - truth, axis=1)
    error = np.linalg.norm(got - truth, axis=1)
    assert initial.min() > 4.0
    assert error.max() < 0.5, error
    assert c.report["start"] == "coarse" and not c.report["flags"]
    assert c.report["mind_ssc_after"] < c.report["mind_ssc_before"]


def test_the_mr_side_is_made_once_per_region_and_reused_frames_get_the_answers_made_afresh():
    """Frames on one grid (a held probe) share their registration region: the MR's features are
    made for the first and reused for the next, which get exactly the answer computed afresh; a
    frame elsewhere makes them again."""
    from MRUSFusionLib.registration import MRSideCache

    fixed, _ = small_pair(np.eye(4))
    centre = fixed.centre_lps()
    first = moved_copy(fixed, rigid_about((4.0, -3.0, 2.0), (3.0, -2.0, 4.0), centre))
    second_move = matrix_to_affine(np.linalg.inv(rigid_about((-2.0, 3.0, 1.0), (-2.0, 3.0, -1.0), centre)))
    # the same grid and data support (a fan fixed to the probe), the tissue in it moved
    second = first.with_array(np.maximum(resample_to_grid(first, first, transform=second_move).array, 0.01))
    elsewhere = moved_copy(fixed, rigid_about((0.0, 0.0, 0.0), (9.0, 0.0, 0.0), centre))
    cache = MRSideCache()
    quick = correction.CorrectionSettings(refine_candidates=1, refine_steps=10)  # what is cached, not accuracy, is tested
    for us, hits, misses in ((first, 0, 1), (second, 1, 1), (elsewhere, 1, 2)):
        region = registration_region(fixed, us)
        cached = correct_registration(fixed, us, region, mr_side=cache, settings=quick)
        assert (cache.hits, cache.misses) == (hits, misses)
        if us is not second:
            continue
        afresh = correct_registration(fixed, us, region, settings=quick)
        np.testing.assert_array_equal(cached.matrix_lps, afresh.matrix_lps)
        assert json.dumps(cached.report) == json.dumps(afresh.report)  # (NaN == NaN in JSON)


@pytest.mark.parametrize("shift_mm, near_limit", [((16.0, -15.0, 12.0), False), ((-19.0, 17.0, 18.0), True)])
def test_correction_captures_a_25_mm_move_of_a_us_smaller_than_the_mr(shift_mm, near_limit):
    """A liver moves 20-25 mm over half a breath. The 'US' here is a 48 mm cube of the 'MR''s
    tissue (zeros around it, as outside a fan), seen after a 25 mm, 6 degree move; the MR spans
    90 mm. The global translation search and the fixed image padded by the search's reach bring
    it back (scored on the MR's points alone, a true 25 mm shift pushed half the cube's points
    out of the US, and their penalty kept the correction at the start). A 31 mm move is still
    brought back, and the report says it came near the edge of the 32 mm search."""
    mr = Volume(textured((90, 90, 90), seed=3, blur=2.0), np.ones(3), np.array([-45.0, -45.0, -45.0]), np.eye(3))
    centre = np.zeros(3)
    move = rigid_about((4.0, -3.0, 3.0), shift_mm, centre)  # 25 (31) mm at the centre
    cube = Volume(np.zeros((48, 48, 48), np.float32), np.ones(3), np.array([-24.0, -24.0, -24.0]), np.eye(3))
    # the US: the MR's tissue at move^-1(q) for each US point q (tissue at p now lies at move(p))
    us = resample_to_grid(mr, cube, transform=matrix_to_affine(np.linalg.inv(move)))
    region = registration_region(mr, us)
    c = correct_registration(mr, us, region)
    points = np.array([[-20.0, -15.0, -10.0], [10.0, 5.0, -20.0], [0.0, 0.0, 0.0], [15.0, -10.0, 12.0]])  # MR LPS
    points = points @ np.linalg.inv(move)[:3, :3].T + np.linalg.inv(move)[:3, 3]  # ... whose tissue the US shows
    truth = points @ move[:3, :3].T + move[:3, 3]
    got = transform_points(sitk.CompositeTransform([*c.start_transforms, matrix_to_affine(c.matrix_lps)]), points)
    assert np.linalg.norm(points - truth, axis=1).min() > 20.0
    assert np.linalg.norm(got - truth, axis=1).max() < 1.0, np.linalg.norm(got - truth, axis=1)
    assert abs(c.report["correction_mm"] - np.linalg.norm(shift_mm)) < 3.0 and c.report["capture_range_mm"] == 32.0
    assert ("near_capture_range_32mm" in c.report["flags"]) == near_limit


def test_correction_flags_a_wrong_network_answer_and_never_ends_worse_than_its_start():
    """A 'network' answer 12 mm off scores worse than the images as they lie (which are right):
    the report says so, and the correction ends at the truth."""
    fixed, moving = small_pair(np.eye(4))
    region = registration_region(fixed, moving)
    wrong = sitk.AffineTransform(3)
    wrong.SetTranslation((12.0, 0.0, 0.0))
    c = correct_registration(fixed, moving, region, network=[wrong])
    assert c.report["mind_ssc_coarse"] < c.report["mind_ssc_network"]
    assert "network_worse_than_coarse" in c.report["flags"]
    assert any(flag.startswith("disagrees_with_network") for flag in c.report["flags"])
    points = fixed.index_to_lps(np.array([[20, 20, 20], [50, 40, 30]], float))
    got = transform_points(sitk.CompositeTransform([*c.start_transforms, matrix_to_affine(c.matrix_lps)]), points)
    assert np.linalg.norm(got - points, axis=1).max() < 0.3  # the truth is the identity
    assert c.report["mind_ssc_after"] <= c.report["mind_ssc_before"]


def test_region_follows_a_small_us_at_half_a_millimetre():
    mr = grid_like((200, 200, 160), (1.0, 1.0, 1.2), (-100.0, -100.0, -90.0), np.eye(3))
    us = oblique_volume(np.zeros((120, 110, 100), np.float32), spacing=(0.4, 0.4, 0.4))
    us.array[10:-10, 10:-10, 10:-10] = 1.0  # the data inside a zero border (a scan converter's fan)
    us = Volume.from_ijk_to_lps(us.array, rigid_about((0, 0, 0), (20.0, -10.0, 5.0), np.zeros(3)) @ us.ijk_to_lps())
    region = registration_region(mr, us)
    assert region.size_ijk == (128, 128, 128)
    assert region.spacing[0] == pytest.approx(0.5)
    np.testing.assert_allclose(region.direction, mr.direction)
    # every data voxel of the US is inside the region
    k, j, i = np.nonzero(us.array)
    inside = region.lps_to_index(us.index_to_lps(np.stack([i, j, k], 1)[::97].astype(float)))
    assert inside.min() >= 0 and inside.max() <= 127


def test_region_covers_a_160_mm_liver_sweep_at_about_1_3_mm():
    mr = grid_like((180, 150, 120), (1.5, 1.5, 2.5), (-135.0, -110.0, -150.0), np.eye(3))
    us = grid_like((160, 160, 130), (1.0, 1.0, 1.0), (-80.0, -80.0, -60.0), np.eye(3))
    us.array[:] = 1.0
    region = registration_region(mr, us)
    assert 1.25 <= region.spacing[0] <= 1.35
    liver = mr.with_array(np.zeros(mr.array.shape, np.uint8))
    liver.array[20:60, 30:100, 40:120] = 1  # 60 x 105 x 100 mm
    assert registration_region(mr, us, liver).spacing[0] < region.spacing[0]  # the liver narrows it


def test_a_us_beside_the_mr_is_refused_with_the_overlap():
    mr = grid_like((100, 100, 100), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    us = grid_like((60, 60, 60), (0.5, 0.5, 0.5), (95.0, 20.0, 20.0), np.eye(3))
    us.array[:] = 1.0
    with pytest.raises(InputError, match=r"overlaps the MR over \[4\.0, 29\.5, 29\.5\] mm"):
        registration_region(mr, us)
    empty = us.with_array(np.zeros_like(us.array))
    with pytest.raises(InputError, match="holds no data"):
        registration_region(mr, empty)


def test_written_transforms_carry_the_correction_exactly(shipped_model, tmp_path):
    """register() with the correction: transform.h5, rigid.tfm and field.nrrd read back by SimpleITK
    map MR points where the result says, and recover a known move of a textured pair."""
    from MRUSFusionLib.registration import register

    fixed, _ = small_pair(np.eye(4), spacing=1.0, shape=(96, 96, 96), seed=3)
    move = rigid_about((3.0, 4.0, -3.0), (-3.0, 4.0, 2.0), fixed.centre_lps())
    result = register(shipped_model, fixed, moved_copy(fixed, move))
    assert result.correction is not None and result.stage == "corrected"
    paths = result.write(tmp_path)
    points = fixed.index_to_lps(np.array([[30, 30, 30], [48, 48, 48], [60, 40, 55]], float))
    expected = transform_points(result.transform(), points)
    truth = points @ move[:3, :3].T + move[:3, 3]
    assert np.linalg.norm(expected - truth, axis=1).max() < 0.75
    field = displacement_transform(sitk.ReadImage(str(paths["field"])))
    for transform in (sitk.ReadTransform(str(paths["composite"])), field):
        np.testing.assert_allclose(transform_points(transform, points), expected, atol=1e-3)
    region = result.correction.region
    assert sitk.ReadImage(str(paths["warped_us"])).GetSpacing() == pytest.approx(tuple(region.spacing))
