"""The one adapter between Slicer's MRML nodes and the Libs' arrays, shared by the modules.

Only the Slicer modules (`X/X.py`) and the adapter tests import this file; the Libs never do.
It needs Slicer's MRML classes: inside Slicer, or headless from the `slicer-core` wheel (which
has no `slicer.mrmlScene` global: every function takes the scene it works in).

Geometry: a volume node holds its IJK-to-RAS matrix; `Volume` holds LPS. RAS = diag(-1, -1, 1) LPS.
`arrayFromVolume` is a (k, j, i) view owned by VTK: it is copied before any long work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from deepnav.errors import InputError
from deepnav.imaging import LPS_TO_RAS, Volume


def chosen_path(value) -> Path | None:
    """A `pathlib.Path` parameter bound to a ctkPathLineEdit, or None where nothing is chosen.
    Slicer's Path parameters default to `Path()` and an empty line edit reads back as `Path("")`,
    both `Path(".")` (and truthy), so "." means "not chosen" (for a model path: the shipped model)."""
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)


def _matrix(vtk_matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return _matrix(m)


def volume_from_node(node) -> Volume:
    """A scalar volume node as a Volume (a copy, LPS geometry)."""
    if node is None or node.GetImageData() is None:
        raise InputError("no image in the selected volume")
    return Volume.from_ijk_to_lps(np.array(slicer.util.arrayFromVolume(node)), LPS_TO_RAS @ ijk_to_ras(node))


def update_node_from_volume(node, volume: Volume) -> None:
    """Put a Volume's voxels and geometry into a scalar volume node (deep copy)."""
    slicer.util.updateVolumeFromArray(node, volume.array)
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras()))


def image2d_from_node(node) -> tuple[np.ndarray, float, np.ndarray]:
    """A single-slice volume node as (pixels (rows, cols) float32, in-plane pixel size mm,
    IJK-to-RAS 4x4). Rows run along j, columns along i, as in the image file."""
    if node is None or node.GetImageData() is None:
        raise InputError("no image in the selected volume")
    array = slicer.util.arrayFromVolume(node)
    if array.ndim == 4:
        raise InputError(f"{node.GetName()} is a vector (colour) volume: convert it to a scalar volume first")
    if array.shape[0] != 1:
        raise InputError(f"{node.GetName()} has {array.shape[0]} slices: a 2D image (one slice) is needed")
    spacing = node.GetSpacing()
    if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing[:2]):
        raise InputError(f"{node.GetName()} has non-square pixels ({spacing[0]} x {spacing[1]} mm)")
    return np.array(array[0], dtype=np.float32), float(spacing[0]), ijk_to_ras(node)


def pixels_to_ras(points_xy: np.ndarray, matrix_ijk_to_ras: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) (x = column = i, y = row = j, on slice k = 0) to RAS points (N, 3)."""
    points_xy = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    ijk1 = np.c_[points_xy, np.zeros(len(points_xy)), np.ones(len(points_xy))]
    return (ijk1 @ matrix_ijk_to_ras.T)[:, :3]


def _node(scene, class_name: str, name: str):
    """The scene's node of this class and name (reused so that reruns update in place), or a new one."""
    nodes = scene.GetNodesByClassByName(class_name, name)
    node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
    return node if node is not None else scene.AddNewNodeByClass(class_name, name)


def volume_node(scene, name: str, volume: Volume, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node holding `volume` (voxels and geometry), updated in place on reruns."""
    node = _node(scene, class_name, name)
    update_node_from_volume(node, volume)
    return node


def closed_curve(scene, name: str, points_ras: np.ndarray):
    node = _node(scene, "vtkMRMLMarkupsClosedCurveNode", name)
    slicer.util.updateMarkupsControlPointsFromArray(node, np.asarray(points_ras, dtype=np.float64))
    return node


def line(scene, name: str, start_ras, end_ras):
    node = _node(scene, "vtkMRMLMarkupsLineNode", name)
    slicer.util.updateMarkupsControlPointsFromArray(node, np.array([start_ras, end_ras], dtype=np.float64))
    return node


def labelmap(scene, name: str, mask: np.ndarray, matrix_ijk_to_ras: np.ndarray):
    """A label map node (1 inside `mask`) on the grid given by `matrix_ijk_to_ras`; a 2D mask
    becomes one slice."""
    node = _node(scene, "vtkMRMLLabelMapVolumeNode", name)
    array = np.asarray(mask, dtype=np.uint8)
    slicer.util.updateVolumeFromArray(node, array[None] if array.ndim == 2 else array)
    node.SetIJKToRASMatrix(_vtk_matrix(matrix_ijk_to_ras))
    return node


def table(scene, name: str, rows: list[dict], columns: list[str]):
    """A table node with one row per dict (missing values empty, lists joined by "; "), text or
    numbers per column."""
    node = _node(scene, "vtkMRMLTableNode", name)
    node.RemoveAllColumns()
    data = node.GetTable()
    for column in columns:
        values = [r.get(column) for r in rows]
        numeric = all(isinstance(v, (int, float)) or v is None for v in values)
        array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        array.SetName(column)
        for v in values:
            if numeric:
                array.InsertNextValue(float("nan") if v is None else float(v))
            else:
                array.InsertNextValue("" if v is None else "; ".join(v) if isinstance(v, list) else str(v))
        data.AddColumn(array)
    node.Modified()
    return node


def linear_transform(scene, name: str, matrix_to_parent_ras: np.ndarray):
    """A linear transform node with this RAS to-parent matrix (updated in place on reruns)."""
    node = _node(scene, "vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(_vtk_matrix(matrix_to_parent_ras))
    return node


def grid_transform_from_field(scene, name: str, field_lps: sitk.Image):
    """A grid transform node from a displacement field as a SimpleITK vector image (LPS geometry,
    LPS mm vectors, resampling convention x_moving = x_fixed + u(x_fixed)): converted to RAS once,
    then `grid_transform_from_ras`."""
    vectors = sitk.GetArrayFromImage(field_lps).astype(np.float32)
    vectors[..., :2] *= -1.0  # L, P -> R, A
    grid = Volume(vectors[..., 0], np.array(field_lps.GetSpacing()), np.array(field_lps.GetOrigin()),
                  np.array(field_lps.GetDirection()).reshape(3, 3))
    return grid_transform_from_ras(scene, name, vectors, grid)


def grid_transform_from_ras(scene, name: str, vectors_ras: np.ndarray, grid: Volume):
    """A grid transform node from displacement vectors in RAS mm, (k, j, i, 3) float32, on `grid`
    (its LPS geometry; the array of `grid` is not used), resampling convention x_moving = x_fixed +
    u(x_fixed). That convention is what Slicer calls *from parent* (parent = fixed = MR): put the
    moving image (US) under this node and Slicer shows it resampled onto the MR. The grid is
    interpolated linearly, as SimpleITK's DisplacementFieldTransform does. A rerun (each live
    frame) updates the same node, so whatever is placed under it stays there. The vectors are
    what the fusion service sends (RAS float32): a live frame reaches MRML with one copy."""
    if vectors_ras.shape != grid.array.shape + (3,):
        raise ValueError(f"vectors {vectors_ras.shape} do not match the grid {grid.array.shape} x 3")
    flip = np.array([-1.0, -1.0, 1.0])
    image = vtk.vtkImageData()
    image.SetDimensions(*grid.size_ijk)
    image.SetSpacing(*grid.spacing)
    image.SetOrigin(*(grid.origin * flip))
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(
        np.ascontiguousarray(vectors_ras, dtype=np.float32).reshape(-1, 3), deep=True))
    direction = np.eye(4)
    direction[:3, :3] = np.diag(flip) @ grid.direction
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(image)
    transform.SetGridDirectionMatrix(_vtk_matrix(direction))
    transform.SetInterpolationModeToLinear()
    node = _node(scene, "vtkMRMLGridTransformNode", name)
    node.SetAndObserveTransformFromParent(transform)
    return node


def segmentation_from_labels(scene, name: str, labels: Volume, segments: dict[int, tuple[str, str | None]]):
    """A segmentation node with one segment per label value: {value: (segment name, terminology
    entry or None)} (Slicer's serialized terminology string, e.g. liver; mass). Replaces the
    segments of a node of the same name. Label values not in `segments` are left out."""
    node = _node(scene, "vtkMRMLSegmentationNode", name)
    node.GetSegmentation().RemoveAllSegments()
    kept = np.where(np.isin(labels.array, list(segments)), labels.array, 0).astype(np.uint16)
    if not kept.any():
        return node
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__deepnav_import__")
    try:
        update_node_from_volume(temporary, labels.with_array(kept))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, node):
            raise InputError(f"cannot import the label map into {name}")
    finally:
        scene.RemoveNode(temporary)
    segmentation = node.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(n)
        title, terminology = segments[segment.GetLabelValue()]
        segment.SetName(title)
        if terminology:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), terminology)
    return node


def fiducials(scene, name: str, points_ras: np.ndarray, labels: list[str]):
    """A point list (RAS, world) with a label per point, updated in place on reruns."""
    node = _node(scene, "vtkMRMLMarkupsFiducialNode", name)
    slicer.util.updateMarkupsControlPointsFromArray(node, np.asarray(points_ras, dtype=np.float64).reshape(-1, 3))
    for n, label in enumerate(labels):
        node.SetNthControlPointLabel(n, label)
    return node


def points_from_markups(node, frame_of=None) -> np.ndarray:
    """A markups node's control points (N, 3) in LPS mm: in world coordinates (with the
    markups' parent transforms), or in the local frame of node `frame_of` (a volume that may sit
    under transforms: where the points are in its own, untransformed coordinates)."""
    if node is None or node.GetNumberOfControlPoints() == 0:
        raise InputError(f"no points placed{' in ' + node.GetName() if node is not None else ''}")
    points = np.array([node.GetNthControlPointPositionWorld(n) for n in range(node.GetNumberOfControlPoints())])
    parent = frame_of.GetParentTransformNode() if frame_of is not None else None
    if parent is not None:
        world_to_local = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, world_to_local)
        points = np.array([world_to_local.TransformPoint(p.tolist()) for p in points])
    return points * np.array([-1.0, -1.0, 1.0])


def place_under(node, *transforms) -> None:
    """Put `node` under the chain of transform nodes, innermost first: node -> transforms[0] ->
    transforms[1] -> ... -> world (None entries are skipped)."""
    chain = [node] + [t for t in transforms if t is not None]
    for child, parent in zip(chain[:-1], chain[1:], strict=True):
        child.SetAndObserveTransformNodeID(parent.GetID())
    chain[-1].SetAndObserveTransformNodeID(None)


def labelmap_from_segmentation(segmentation_node, reference_node, segment_id: str | None = None) -> Volume:
    """One segment (the first by default) as a uint8 Volume on the reference volume's grid."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError(f"{segmentation_node.GetName()} has no segment")
    segment_id = segment_id or segmentation.GetNthSegmentID(0)
    # slicer.util.arrayFromSegmentBinaryLabelmap needs the slicer.mrmlScene global; this works in
    # any scene (also headless): export into a temporary label map on the reference grid
    scene = segmentation_node.GetScene()
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__deepnav_export__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, temporary, reference_node):
            raise InputError(f"cannot export segment {segment_id} of {segmentation_node.GetName()}")
        exported = volume_from_node(temporary)
    finally:
        scene.RemoveNode(temporary)
    reference = volume_from_node(reference_node)
    if not exported.same_grid(reference):
        raise InputError(f"{segmentation_node.GetName()} could not be put on {reference_node.GetName()}'s grid")
    return reference.with_array((exported.array > 0).astype(np.uint8))
