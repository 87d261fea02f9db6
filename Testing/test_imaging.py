"""Volumes keep their LPS geometry through SimpleITK files; bad files give clear errors."""

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import oblique_volume, smooth_image
from deepnav.errors import InputError
from deepnav.imaging import Volume, read_sitk, read_volume, require_finite, require_same_grid, resample_to_grid, write_volume


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_oblique_anisotropic_volume_round_trips_through_files(tmp_path, suffix):
    vol = oblique_volume(smooth_image((9, 11, 13)))
    back = read_volume(write_volume(vol, tmp_path / f"v{suffix}"))
    assert back.same_grid(vol, tol_mm=1e-4)
    np.testing.assert_allclose(back.array, vol.array, rtol=1e-6)


def test_index_to_lps_matches_simpleitk():
    vol = oblique_volume(np.zeros((4, 5, 6), np.float32))
    image = vol.to_sitk()
    ijk = np.array([[0, 0, 0], [5, 4, 3], [2.5, 1.25, 0.5]])
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk]
    np.testing.assert_allclose(vol.index_to_lps(ijk), expected, atol=1e-9)
    np.testing.assert_allclose(vol.lps_to_index(expected), ijk, atol=1e-9)


def test_ras_matrix_flips_x_and_y_only():
    vol = oblique_volume(np.zeros((2, 2, 2), np.float32))
    lps, ras = vol.ijk_to_lps(), vol.ijk_to_ras()
    np.testing.assert_allclose(ras[:2], -lps[:2])
    np.testing.assert_allclose(ras[2:], lps[2:])


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nope.nrrd", what="MR")
    junk = tmp_path / "junk.nrrd"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot read MR"):
        read_volume(junk, what="MR")


def _voxel_file(path):
    """The file that holds the voxels: the file itself, or a detached header's data file."""
    if path.suffix == ".nhdr":
        name = next(line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("data file"))
        return path.parent / name
    return path


@pytest.mark.parametrize("suffix,compress", [(".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False),
                                             (".mha", True), (".mha", False), (".nhdr", True), (".nhdr", False)])
def test_a_file_cut_short_or_damaged_is_refused_not_zero_filled(tmp_path, suffix, compress):
    # SimpleITK reads a cut NIfTI with zeros for the missing half, and a damaged gzip NRRD or
    # compressed MetaImage with wrong voxels, all without an error
    noise = np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32)
    path = write_volume(oblique_volume(noise), tmp_path / f"v{suffix}", compress=compress)
    np.testing.assert_array_equal(read_volume(path).array, noise)  # whole: read as written
    voxels = _voxel_file(path)
    whole = voxels.read_bytes()
    damaged = {"half": whole[: len(whole) // 2], "one byte short": whole[:-1]}
    if compress:  # one bit flipped a little before the end, inside the compressed data
        flipped = bytearray(whole)
        flipped[-20] ^= 0x10
        damaged["one bit flipped"] = bytes(flipped)
    for how, data in damaged.items():
        voxels.write_bytes(data)
        with pytest.raises(InputError, match=r"MR .* is truncated or corrupt"):
            read_volume(path, what="MR")
            pytest.fail(f"{how} was read")


def test_a_truncated_jpeg_is_refused_not_filled_grey(tmp_path):
    picture = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 255, (64, 80)).astype(np.uint8))
    sitk.WriteImage(picture, str(tmp_path / "frame.jpg"))
    assert read_sitk(tmp_path / "frame.jpg").GetSize() == (80, 64)
    data = (tmp_path / "frame.jpg").read_bytes()
    (tmp_path / "frame.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_sitk(tmp_path / "frame.jpg")


def test_2d_and_vector_images_are_rejected(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="3D"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match="scalar"):
        read_volume(tmp_path / "vec.nrrd")


def test_nan_voxels_and_mismatched_labels_are_rejected():
    vol = oblique_volume(smooth_image((5, 5, 5)))
    bad = vol.with_array(vol.array.copy())
    bad.array[2, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        require_finite(bad, "MR")
    shifted = Volume(vol.array, vol.spacing, vol.origin + 1.0, vol.direction)
    with pytest.raises(InputError, match="does not match"):
        require_same_grid(vol, shifted, "vessel label")


def test_resampling_onto_own_grid_is_identity():
    vol = oblique_volume(smooth_image((7, 8, 9)))
    np.testing.assert_allclose(resample_to_grid(vol, vol).array, vol.array, atol=1e-6)


def test_write_is_atomic_no_partial_file_left(tmp_path):
    vol = oblique_volume(smooth_image((4, 4, 4)))
    write_volume(vol, tmp_path / "a.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd"]
