"""The registration as transforms that SimpleITK and 3D Slicer read: physical LPS mm, resampling
convention (each maps a point of the fixed MR space to where it is found in the US).

On the fusion grid a voxel position x (i, j, k) is at LPS point p = o + D S x (origin o,
direction D, spacing S of the grid). The network's voxel-space rigid map x' = A x + b is, in mm,
p' = M p + t with M = D S A S^-1 D^T and t = o + D S b - M o; a voxel displacement u_ijk is
u_LPS = D S u_ijk. Three forms are written:
- the rigid transform (`rigid.tfm`);
- one composed displacement field phi(x) - x (`field.nrrd`): exact on the 128 mm grid, zero
  (identity) outside it, as ITK's DisplacementFieldTransform defines it;
- the hierarchy rigid-then-B-spline as one composite transform (`transform.h5`):
  T(p) = R(p + u(p)), exact on the grid and equal to the rigid transform outside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.imaging import LPS_TO_RAS, Volume, write_image_atomic


def _ds(grid: Volume) -> np.ndarray:
    return grid.direction @ np.diag(grid.spacing)


def rigid_to_lps(matrix_ijk: np.ndarray, grid: Volume) -> sitk.AffineTransform:
    """(3, 4) voxel-space rigid matrix on `grid` -> ITK affine in LPS mm."""
    a, b = matrix_ijk[:, :3], matrix_ijk[:, 3]
    ds = _ds(grid)
    m = ds @ a @ np.linalg.inv(ds)
    t = grid.origin + ds @ b - m @ grid.origin
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(m.flatten().tolist())
    transform.SetTranslation(t.tolist())
    return transform


def resampling_to_parent_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """A linear map in our convention (4x4, fixed/MR LPS point -> moving/US LPS point) as the RAS
    to-parent matrix Slicer applies to the moving volume to bring it onto the fixed one."""
    return LPS_TO_RAS @ np.linalg.inv(matrix_lps) @ LPS_TO_RAS


def transform_points(transform: sitk.Transform, points_lps: np.ndarray) -> np.ndarray:
    """Points (N, 3, LPS mm) through an ITK transform (resampling convention: MR -> US)."""
    return np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in points_lps]).reshape(-1, 3)


def affine_lps_to_ijk(transform: sitk.Transform, grid: Volume) -> np.ndarray:
    """A linear LPS transform (affine, Euler, versor...) as a (3, 4) voxel-space matrix on `grid`."""
    points = np.vstack([np.zeros(3), np.eye(3)])  # the transform is recovered from 4 points
    lps = grid.index_to_lps(points)
    mapped = grid.lps_to_index(transform_points(transform, lps))
    b = mapped[0]
    return np.column_stack([(mapped[1:] - b).T, b])


def displacement_to_lps_image(disp_ijk: np.ndarray, grid: Volume) -> sitk.Image:
    """(3, D, H, W) voxel displacements (di, dj, dk) -> ITK vector image of LPS mm on `grid`."""
    u_lps = np.einsum("ab,bkji->kjia", _ds(grid), disp_ijk.astype(np.float64))
    return grid.apply_geometry(sitk.GetImageFromArray(u_lps, isVector=True))


def displacement_to_ras_vectors(disp_ijk: np.ndarray, grid: Volume) -> np.ndarray:
    """(3, k, j, i) voxel displacements (di, dj, dk) on `grid` -> (k, j, i, 3) float32 RAS mm:
    u_ras = F D diag(spacing) u_ijk (F flips L, P). What the service sends and MRML takes."""
    to_ras = (LPS_TO_RAS[:3, :3] @ _ds(grid)).astype(np.float32)
    vectors = to_ras @ disp_ijk.reshape(3, -1).astype(np.float32, copy=False)
    return vectors.T.reshape(*disp_ijk.shape[1:], 3)


def ras_vectors_to_lps_image(vectors_ras: np.ndarray, grid: Volume) -> sitk.Image:
    """(k, j, i, 3) RAS mm displacement vectors on `grid` -> ITK vector image (float64) of LPS mm
    vectors with the grid's LPS geometry: the inverse of `displacement_to_ras_vectors`' output."""
    vectors = np.asarray(vectors_ras, np.float64) * np.array([-1.0, -1.0, 1.0])
    return grid.apply_geometry(sitk.GetImageFromArray(vectors, isVector=True))


def displacement_transform(field_lps: sitk.Image) -> sitk.DisplacementFieldTransform:
    # the constructor takes ownership of (and empties) the image it is given: pass a copy
    return sitk.DisplacementFieldTransform(sitk.Cast(field_lps, sitk.sitkVectorFloat64))


def composite_lps(matrix_ijk: np.ndarray, bspline_ijk: np.ndarray, grid: Volume) -> sitk.CompositeTransform:
    """T(p) = R(p + u(p)). SimpleITK applies a composite's transforms last-added first."""
    return sitk.CompositeTransform([rigid_to_lps(matrix_ijk, grid),
                                    displacement_transform(displacement_to_lps_image(bspline_ijk, grid))])


def write_transforms(out_dir: Path, matrix_ijk: np.ndarray, disp_ijk: np.ndarray, bspline_ijk: np.ndarray,
                     grid: Volume) -> dict[str, Path]:
    """Write rigid.tfm, field.nrrd (composed) and transform.h5 (composite) into `out_dir`."""
    return write_transform_files(out_dir, rigid_to_lps(matrix_ijk, grid), composite_lps(matrix_ijk, bspline_ijk, grid),
                                 displacement_to_lps_image(disp_ijk, grid))


def write_transform_files(out_dir: Path, rigid: sitk.Transform, composite: sitk.Transform,
                          field_lps: sitk.Image) -> dict[str, Path]:
    """rigid.tfm, transform.h5 and field.nrrd (an LPS displacement image, `write_field`), each
    written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"rigid": out_dir / "rigid.tfm", "field": out_dir / "field.nrrd", "composite": out_dir / "transform.h5"}
    for key, transform in {"rigid": rigid, "composite": composite}.items():
        tmp = paths[key].with_name(".partial-" + paths[key].name)
        sitk.WriteTransform(transform, str(tmp))
        tmp.replace(paths[key])
    write_field(field_lps, paths["field"])
    return paths


def write_field(field_lps: sitk.Image, path: Path) -> Path:
    """An LPS displacement image as a file ITK and Slicer read as a displacement field transform,
    in float32: half the size of float64 (~24 instead of ~48 MB on the 128^3 grid) for a rounding
    of ~1e-5 mm, far below what a registration resolves; both convert it to double when they read
    it as a transform (`displacement_transform` casts likewise)."""
    return write_image_atomic(sitk.Cast(field_lps, sitk.sitkVectorFloat32), path)


def transform_to_field(transform: sitk.Transform, grid: Volume) -> sitk.Image:
    """Any transform (LPS, resampling convention) sampled as its displacement T(p) - p on `grid`:
    an LPS vector image (float64) that ITK and Slicer read as a displacement field transform."""
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, list(grid.size_ijk),
                                             grid.origin.tolist(), grid.spacing.tolist(),
                                             grid.direction.flatten().tolist())


def resample_with(transform: sitk.Transform, moving: Volume, reference: Volume, interpolator=sitk.sitkLinear) -> np.ndarray:
    """moving resampled on `reference`'s grid through `transform` (reference LPS -> moving LPS)."""
    out = sitk.Resample(moving.to_sitk(), reference.to_sitk(), transform, interpolator, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)
