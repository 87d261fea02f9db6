"""The MRML adapter against Slicer's real MRML classes (the `slicer-core` wheel, headless):
volumes read by Slicer's own storage node match what SimpleITK reads, in RAS; 2D images, markups,
label maps and tables land where the Libs' pixel coordinates say."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import oblique_volume, smooth_image

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package also named `slicer`
    pytest.skip("slicer-core (Slicer's MRML classes) is not installed", allow_module_level=True)

from deepnav import mrml  # noqa: E402
from deepnav.errors import InputError  # noqa: E402
from deepnav.imaging import read_volume, write_volume  # noqa: E402


def load_with_slicer(scene, path, class_name="vtkMRMLScalarVolumeNode"):
    """Read a file the way Slicer does: a volume node with an archetype storage node."""
    node = scene.AddNewNodeByClass(class_name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


def test_volume_read_by_slicer_matches_simpleitk(tmp_path):
    volume = oblique_volume(smooth_image((9, 11, 13)))
    path = write_volume(volume, tmp_path / "oblique.nrrd")
    scene = slicer.vtkMRMLScene()
    node = load_with_slicer(scene, path)
    from_slicer = mrml.volume_from_node(node)
    from_itk = read_volume(path)
    np.testing.assert_allclose(mrml.ijk_to_ras(node), from_itk.ijk_to_ras(), atol=1e-6)
    np.testing.assert_allclose(from_slicer.origin, from_itk.origin, atol=1e-6)
    np.testing.assert_allclose(from_slicer.direction, from_itk.direction, atol=1e-6)
    np.testing.assert_allclose(from_slicer.spacing, from_itk.spacing, atol=1e-6)
    np.testing.assert_array_equal(from_slicer.array, from_itk.array)


def test_volume_round_trip_through_a_node():
    volume = oblique_volume(smooth_image((5, 6, 7)))
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    mrml.update_node_from_volume(node, volume)
    back = mrml.volume_from_node(node)
    np.testing.assert_allclose(back.ijk_to_lps(), volume.ijk_to_lps(), atol=1e-9)
    np.testing.assert_array_equal(back.array, volume.array)
    back.array[0, 0, 0] = -1  # a copy, not VTK's buffer
    assert slicer.util.arrayFromVolume(node)[0, 0, 0] != -1


def test_2d_image_and_markups_in_pixel_coordinates(tmp_path):
    pixels = (np.random.default_rng(0).uniform(0, 255, (54, 80))).astype(np.uint8)
    image = sitk.GetImageFromArray(pixels)
    image.SetSpacing((0.15, 0.15))
    sitk.WriteImage(image, str(tmp_path / "frame.nrrd"))
    scene = slicer.vtkMRMLScene()
    node = load_with_slicer(scene, tmp_path / "frame.nrrd")
    read, pixel_mm, matrix = mrml.image2d_from_node(node)
    np.testing.assert_array_equal(read, pixels)
    assert pixel_mm == pytest.approx(0.15)
    # a point given in pixel (x, y) lands on that pixel: back through Slicer's own RAS-to-IJK
    xy = np.array([[12.25, 40.5], [70.0, 3.0]])
    curve = mrml.closed_curve(scene, "HC", mrml.pixels_to_ras(xy, matrix))
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    for n, (x, y) in enumerate(xy):
        p = [0.0, 0.0, 0.0]
        curve.GetNthControlPointPosition(n, p)
        ijk = ras_to_ijk.MultiplyPoint([*p, 1.0])
        assert ijk[:3] == pytest.approx((x, y, 0.0), abs=1e-6)
    # rerunning updates the same node instead of piling up new ones
    mrml.closed_curve(scene, "HC", mrml.pixels_to_ras(xy[:1], matrix))
    assert scene.GetNodesByClassByName("vtkMRMLMarkupsClosedCurveNode", "HC").GetNumberOfItems() == 1
    line = mrml.line(scene, "BPD", *mrml.pixels_to_ras(xy, matrix))
    assert line.GetNumberOfControlPoints() == 2


def test_2d_adapter_refuses_what_is_not_a_2d_image():
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "stack")
    slicer.util.updateVolumeFromArray(node, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(InputError, match="3 slices"):
        mrml.image2d_from_node(node)


def test_labelmap_and_table():
    scene = slicer.vtkMRMLScene()
    mask = np.zeros((20, 30), bool)
    mask[5:10, 8:20] = True
    matrix = np.diag([-0.2, -0.2, 1.0, 1.0])
    label = mrml.labelmap(scene, "head", mask, matrix)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(label)[0], mask.astype(np.uint8))
    np.testing.assert_allclose(mrml.ijk_to_ras(label), matrix)
    node = mrml.table(scene, "Measurements", [{"file": "a.png", "hc_mm": 170.5}, {"file": "b.png", "hc_mm": None}],
                      ["file", "hc_mm"])
    data = node.GetTable()
    assert data.GetNumberOfRows() == 2 and data.GetColumnByName("file").GetValue(1) == "b.png"
    assert data.GetColumnByName("hc_mm").GetValue(0) == pytest.approx(170.5)
    assert np.isnan(data.GetColumnByName("hc_mm").GetValue(1))
