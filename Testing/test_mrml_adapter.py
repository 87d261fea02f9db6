"""The MRML adapter against Slicer's real MRML classes (the `slicer-core` wheel, headless):
volumes read by Slicer's own storage node match what SimpleITK reads, in RAS; 2D images, markups,
label maps and tables land where the Libs' pixel coordinates say."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import oblique_volume, smooth_image
from deepnav.imaging import linear_to_matrix, rotation_matrix

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):  # the unrelated PyPI package also named `slicer`
    pytest.skip("slicer-core (Slicer's MRML classes) is not installed", allow_module_level=True)

from deepnav import mrml  # noqa: E402
from deepnav.errors import InputError  # noqa: E402
from deepnav.imaging import read_volume, write_volume  # noqa: E402
from MRUSFusionLib import fields  # noqa: E402


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


def smooth_field(grid_volume, amplitude=3.0, seed=0) -> sitk.Image:
    """A smooth LPS displacement field (mm) on an oblique, anisotropic grid."""
    rng = np.random.default_rng(seed)
    shape = grid_volume.array.shape
    components = [amplitude * (smooth_image(shape, seed=seed + c) - 0.5) for c in range(3)]
    field = sitk.GetImageFromArray(np.stack(components, -1).astype(np.float64) + rng.normal(0, 0.01, (*shape, 3)),
                                   isVector=True)
    field.SetSpacing(grid_volume.spacing.tolist())
    field.SetOrigin(grid_volume.origin.tolist())
    field.SetDirection(grid_volume.direction.ravel().tolist())
    return field


def inside_points(grid_volume, n=20, seed=1) -> np.ndarray:
    ijk = np.random.default_rng(seed).uniform(2, np.array(grid_volume.size_ijk) - 3, (n, 3))
    return grid_volume.index_to_lps(ijk)


def test_grid_transform_moves_points_as_simpleitk_does(tmp_path):
    grid_volume = oblique_volume(np.zeros((18, 20, 22), np.float32), spacing=(2.0, 2.5, 3.0))
    field = smooth_field(grid_volume)
    points_lps = inside_points(grid_volume)
    itk = sitk.DisplacementFieldTransform(sitk.Image(field))
    expected_lps = np.array([itk.TransformPoint(p.tolist()) for p in points_lps])
    flip = np.array([-1.0, -1.0, 1.0])

    scene = slicer.vtkMRMLScene()
    node = mrml.grid_transform_from_field(scene, "deformation", field)
    from_parent = node.GetTransformFromParent()
    moved = np.array([from_parent.TransformPoint((p * flip).tolist()) for p in points_lps]) * flip
    np.testing.assert_allclose(moved, expected_lps, atol=1e-4)

    # the same field written as `fusion register` writes it (float32) and read by Slicer's own
    # transform reader moves them alike
    path = fields.write_field(field, tmp_path / "field.nrrd")
    loaded = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "from file")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    loaded.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(loaded)
    grid = loaded.GetTransformFromParent()
    # Slicer interpolates grids read from files cubically; SimpleITK linearly: the same field, told
    # to interpolate alike, moves the points alike
    cubic = np.array([grid.TransformPoint((p * flip).tolist()) for p in points_lps]) * flip
    np.testing.assert_allclose(cubic, expected_lps, atol=0.2)
    grid.SetInterpolationModeToLinear()
    linear = np.array([grid.TransformPoint((p * flip).tolist()) for p in points_lps]) * flip
    np.testing.assert_allclose(linear, expected_lps, atol=1e-4)


def test_linear_transform_and_markups_in_world_lps():
    scene = slicer.vtkMRMLScene()
    to_parent = np.eye(4)
    to_parent[:3, 3] = [10.0, -4.0, 2.5]
    transform = mrml.linear_transform(scene, "rigid", to_parent)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "US fiducials")
    slicer.util.updateMarkupsControlPointsFromArray(points, np.array([[1.0, 2.0, 3.0], [-5.0, 0.5, 8.0]]))
    np.testing.assert_allclose(mrml.points_from_markups(points), [[-1.0, -2.0, 3.0], [5.0, -0.5, 8.0]])
    points.SetAndObserveTransformNodeID(transform.GetID())  # world positions follow the transform
    np.testing.assert_allclose(mrml.points_from_markups(points), [[-11.0, 2.0, 5.5], [-5.0, 3.5, 10.5]])
    with pytest.raises(InputError, match="no points"):
        mrml.points_from_markups(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))


def test_segmentation_to_labelmap_on_the_reference_grid():
    volume = oblique_volume(smooth_image((10, 12, 14)), spacing=(0.9, 1.2, 2.0))
    scene = slicer.vtkMRMLScene()
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "MR")
    mrml.update_node_from_volume(reference, volume)
    label = (volume.array > 0.6).astype(np.uint8)
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "vessels")
    mrml.update_node_from_volume(label_node, volume.with_array(label))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "vessels")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_node, segmentation)
    back = mrml.labelmap_from_segmentation(segmentation, reference)
    assert back.same_grid(volume)
    np.testing.assert_array_equal(back.array, label)


def test_grid_transform_node_is_updated_in_place():
    grid_volume = oblique_volume(np.zeros((12, 14, 16), np.float32), spacing=(2.0, 2.5, 3.0))
    first, second = smooth_field(grid_volume), smooth_field(grid_volume)
    second = sitk.Compose(*[sitk.VectorIndexSelectionCast(second, c) * 2.0 for c in range(3)])
    second.CopyInformation(first)
    scene = slicer.vtkMRMLScene()
    node = mrml.grid_transform_from_field(scene, "deformation", first)
    child = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "US")
    child.SetAndObserveTransformNodeID(node.GetID())
    again = mrml.grid_transform_from_field(scene, "deformation", second)
    assert again is node and child.GetParentTransformNode() is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLGridTransformNode") == 1
    p = inside_points(grid_volume, n=5)
    flip = np.array([-1.0, -1.0, 1.0])
    itk = sitk.DisplacementFieldTransform(sitk.Image(second))
    moved = np.array([node.GetTransformFromParent().TransformPoint((q * flip).tolist()) for q in p]) * flip
    np.testing.assert_allclose(moved, [itk.TransformPoint(q.tolist()) for q in p], atol=1e-4)


def test_live_fusion_outputs_put_the_us_onto_the_mr(patient, shipped_model):
    """What the MRUSFusion module builds from a live result: the US volume node under
    [initial alignment (from fiducials) -> deformation] is shown where the registration maps it.
    The US arrives 12 mm and 8 degrees off; fiducials on four landmarks align it; the MR
    landmarks then map into the US node's own frame exactly as the Lib's transforms map them."""
    from MRUSFusionLib import fields
    from MRUSFusionLib.alignment import prealign, rigid_from_fiducials
    from MRUSFusionLib.registration import register

    frame = patient.frames[0]
    off = np.eye(4)
    off[:3, :3] = rotation_matrix(np.deg2rad([0.0, 8.0, 0.0]))
    off[:3, 3] = [12.0, 0.0, -5.0]
    us = prealign(frame.image, off)  # the US as it arrives: its points moved by off^-1
    us_landmarks = frame.landmarks_lps @ np.linalg.inv(off)[:3, :3].T + np.linalg.inv(off)[:3, 3]
    flip = np.array([-1.0, -1.0, 1.0])

    scene = slicer.vtkMRMLScene()
    us_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "US")
    mrml.update_node_from_volume(us_node, us)
    mr_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "MR fiducials")
    us_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "US fiducials")
    slicer.util.updateMarkupsControlPointsFromArray(mr_points, patient.landmarks_lps[:4] * flip)
    slicer.util.updateMarkupsControlPointsFromArray(us_points, us_landmarks[:4] * flip)
    alignment = rigid_from_fiducials(mrml.points_from_markups(mr_points), mrml.points_from_markups(us_points, us_node))
    assert alignment.fre_mm < 3.0  # the breathing deformation is not rigid

    result = register(shipped_model, patient.mr, prealign(mrml.volume_from_node(us_node), alignment.matrix_lps),
                      liver=patient.liver, correct=False)
    rigid_to_parent = fields.resampling_to_parent_ras(linear_to_matrix(result.rigid_transform()))
    rigid = mrml.linear_transform(scene, "rigid", rigid_to_parent)
    deformation = mrml.grid_transform_from_field(scene, "deformation",
                                                 fields.displacement_to_lps_image(result.disp_ijk, result.grid))
    initial = mrml.linear_transform(scene, "initial alignment", fields.resampling_to_parent_ras(alignment.matrix_lps))
    mrml.place_under(us_node, initial, deformation)
    assert rigid.GetParentTransformNode() is None

    # the US fiducials, now under transforms, are still read in the US's own frame
    us_points.SetAndObserveTransformNodeID(initial.GetID())
    np.testing.assert_allclose(mrml.points_from_markups(us_points, us_node), us_landmarks[:4], atol=1e-4)

    world_to_us = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, initial, world_to_us)
    inside = np.all(np.abs(result.grid.lps_to_index(patient.landmarks_lps) - 63.5) < 60, axis=1)
    mr_landmarks = patient.landmarks_lps[inside]
    in_us_frame = np.array([world_to_us.TransformPoint((p * flip).tolist()) for p in mr_landmarks]) * flip
    expected = fields.transform_points(fields.displacement_transform(
        fields.displacement_to_lps_image(result.disp_ijk, result.grid)), mr_landmarks)
    expected = expected @ alignment.matrix_lps[:3, :3].T + alignment.matrix_lps[:3, 3]
    np.testing.assert_allclose(in_us_frame, expected, atol=0.05)
    # and the alignment did its job: from ~15 mm off to the registration's few millimetres
    error_before = np.linalg.norm(mr_landmarks - us_landmarks[inside], axis=1)
    error_after = np.linalg.norm(in_us_frame - us_landmarks[inside], axis=1)
    assert np.median(error_before) > 10.0 and np.median(error_after) < 8.0


def test_lesion_labels_become_named_segments_and_centres_become_points():
    """LiverLesionSeg's outputs: one segment per lesion (with terminology), exported back exactly."""
    volume = oblique_volume(np.zeros((8, 9, 10), np.float32), spacing=(0.8, 0.8, 2.5))
    labels = np.zeros(volume.array.shape, np.uint16)
    labels[1:3, 1:4, 1:4], labels[5:7, 5:8, 5:9] = 1, 2
    scene = slicer.vtkMRMLScene()
    reference = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    mrml.update_node_from_volume(reference, volume)
    mass = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^49755003^Morphologically Altered "
            "Structure~SCT^4147007^Mass~^^~Anatomic codes - DICOM master list~SCT^10200004^Liver~^^")
    node = mrml.segmentation_from_labels(scene, "lesions", volume.with_array(labels),
                                         {1: ("Lesion 1", mass), 2: ("Lesion 2", None)})
    segmentation = node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(2)] == ["Lesion 1", "Lesion 2"]
    terminology = vtk.reference("")
    assert segmentation.GetNthSegment(0).GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    assert str(terminology) == mass
    for n, expected in enumerate((labels == 1, labels == 2)):
        back = mrml.labelmap_from_segmentation(node, reference, segmentation.GetNthSegmentID(n))
        np.testing.assert_array_equal(back.array, expected.astype(np.uint8))
    again = mrml.segmentation_from_labels(scene, "lesions", volume.with_array(labels), {2: ("Lesion", None)})
    assert again is node and segmentation.GetNumberOfSegments() == 1
    points = mrml.fiducials(scene, "lesion centres", np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), ["1", "2"])
    assert points.GetNthControlPointLabel(1) == "2"
    np.testing.assert_allclose(mrml.points_from_markups(points), [[-1.0, -2.0, 3.0], [-4.0, -5.0, 6.0]])
