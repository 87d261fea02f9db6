"""The transforms we write (rigid.tfm, field.nrrd, transform.h5) reproduce the network's warp
when SimpleITK resamples the original-resolution US with them, on oblique, anisotropic grids."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import oblique_volume, smooth_image
from deepnav.imaging import Volume, resample_to_grid, rotation_matrix
from MRUSFusionLib import fields
from MRUSFusionLib.bspline import bspline_matrix, upsample_control_points
from MRUSFusionLib.preprocess import fusion_grid
from MRUSFusionLib.warp import apply_affine_to_positions, identity_grid_ijk, rigid_matrix, warp

N = 40  # a small fusion grid keeps these tests fast; the maths does not depend on the size


@pytest.fixture(scope="module")
def setting():
    mr = oblique_volume(np.zeros((30, 35, 40), np.float32), spacing=(1.5, 1.5, 2.5), angles_deg=(4, -6, 15))
    grid = fusion_grid(mr, size=N)
    # the US: its own oblique, anisotropic grid covering the fusion grid generously
    centre = grid.index_to_lps(np.array([[(N - 1) / 2] * 3]))[0]
    us_dir = rotation_matrix(np.deg2rad([25.0, 10.0, -35.0]))
    spacing = np.array([0.7, 0.9, 1.2])
    size = np.array([100, 80, 60])
    origin = centre - us_dir @ (spacing * (size - 1) / 2)
    us = Volume(smooth_image(tuple(size[::-1]), seed=3) * 200, spacing, origin, us_dir)
    return grid, us


def _case(kind: str):
    rng = np.random.default_rng(5)
    if kind == "translation":
        params, coeffs = [3.0, -2.0, 1.5, 0, 0, 0], None
    elif kind == "rotation":
        params, coeffs = [0, 0, 0, 0.08, -0.05, 0.12], None
    else:
        params, coeffs = [1.0, 2.0, -1.0, 0.03, 0.02, -0.04], rng.normal(0, 1.5, (1, 3, 6, 6, 6))
    centre = torch.full((3,), (N - 1) / 2.0)
    matrix = rigid_matrix(torch.tensor([params], dtype=torch.float32), centre)
    if coeffs is None:
        u = torch.zeros(1, 3, N, N, N)
    else:
        w = bspline_matrix(N, 6, 8)
        u = upsample_control_points(torch.tensor(coeffs, dtype=torch.float32), w, w, w)
    identity = identity_grid_ijk((N, N, N))
    disp = apply_affine_to_positions(matrix, identity + u) - identity
    return matrix[0].numpy(), u[0].numpy(), disp, identity


@pytest.mark.parametrize("kind", ["translation", "rotation", "rigid+bspline"])
def test_written_transforms_move_points_where_the_network_field_does(setting, kind, tmp_path):
    grid, _ = setting
    matrix, u, disp, _ = _case(kind)
    paths = fields.write_transforms(tmp_path, matrix, disp[0].numpy(), u, grid)
    composite = sitk.ReadTransform(str(paths["composite"]))
    field = fields.displacement_transform(sitk.ReadImage(str(paths["field"])))
    rng = np.random.default_rng(0)
    voxels = rng.integers(0, N, (50, 3))  # (i, j, k) voxel centres
    d = disp[0].numpy()[:, voxels[:, 2], voxels[:, 1], voxels[:, 0]].T
    expected = grid.index_to_lps(voxels + d)
    points = grid.index_to_lps(voxels)
    for transform in (composite, field):
        got = np.array([transform.TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(got, expected, atol=1e-3)
    if kind != "rigid+bspline":
        rigid = sitk.ReadTransform(str(paths["rigid"]))
        got = np.array([rigid.TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(got, expected, atol=1e-3)


@pytest.mark.parametrize("kind", ["translation", "rotation", "rigid+bspline"])
def test_simpleitk_resampling_of_the_original_us_matches_the_torch_warp(setting, kind):
    grid, us = setting
    matrix, u, disp, identity = _case(kind)
    moving = torch.from_numpy(resample_to_grid(us, grid).array)[None, None]
    torch_warped = warp(moving, disp)[0, 0].numpy()
    sitk_warped = fields.resample_with(fields.composite_lps(matrix, u, grid), us, grid)
    inner = (slice(6, -6),) * 3  # away from the border where zero padding differs
    a, b = torch_warped[inner], sitk_warped[inner]
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert np.abs(a - b).mean() < 0.01 * np.ptp(b)
    # and the warp did something: it differs from the unwarped image
    assert np.abs(moving[0, 0].numpy()[inner] - b).mean() > 5 * np.abs(a - b).mean()


def test_field_file_is_an_lps_vector_image_on_the_grid(setting, tmp_path):
    grid, _ = setting
    matrix, u, disp, _ = _case("translation")
    fields.write_transforms(tmp_path, matrix, disp[0].numpy(), u, grid)
    image = sitk.ReadImage(str(tmp_path / "field.nrrd"))
    assert image.GetNumberOfComponentsPerPixel() == 3
    assert image.GetPixelID() == sitk.sitkVectorFloat32  # half the bytes of float64
    assert np.allclose(image.GetDirection(), grid.direction.flatten())
    assert np.allclose(image.GetOrigin(), grid.origin)
    # a pure translation of (3, -2, 1.5) voxels of 1 mm along the grid axes, in LPS
    expected = grid.direction @ np.array([3.0, -2.0, 1.5])
    np.testing.assert_allclose(sitk.GetArrayFromImage(image)[5, 6, 7], expected, atol=1e-4)


def test_linear_transform_round_trips_through_voxel_space(setting):
    grid, _ = setting
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.05, (4.0, -5.0, 6.0))
    m = fields.affine_lps_to_ijk(euler, grid)
    back = fields.rigid_to_lps(m, grid)
    for p in [(0.0, 0.0, 0.0), (10.0, -20.0, 5.0)]:
        np.testing.assert_allclose(back.TransformPoint(p), euler.TransformPoint(p), atol=1e-6)
