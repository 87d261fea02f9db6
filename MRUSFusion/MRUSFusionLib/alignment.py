"""Initial alignment from paired fiducials: the spec's manual point picking before the network.

The user places the same anatomical points (vessel bifurcations, lesion centres) on the MR and
on the US. A least-squares rigid transform between them brings the US close enough for the
networks, which were trained on residual misalignments of a few millimetres.

Convention: the transform maps MR points to US points (LPS mm, resampling convention, as every
transform of MRUSFusionLib), so the US is *pre-aligned* into MR space by changing its geometry,
not by resampling its voxels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import Volume, linear_to_matrix, matrix_to_affine

MIN_SPREAD_MM = 5.0  # the points must span a plane: second singular value of the centred set


@dataclasses.dataclass
class Alignment:
    matrix_lps: np.ndarray  # 4x4, MR point (LPS mm) -> US point (LPS mm)
    residuals_mm: np.ndarray  # per pair, after alignment (fiducial registration error)

    @property
    def fre_mm(self) -> float:
        """Root mean square fiducial registration error."""
        return float(np.sqrt(np.mean(self.residuals_mm**2)))

    def transform(self) -> sitk.AffineTransform:
        return matrix_to_affine(self.matrix_lps)


def rigid_from_fiducials(mr_points_lps: np.ndarray, us_points_lps: np.ndarray) -> Alignment:
    """The rigid transform (MR -> US, LPS mm) that best maps the MR points onto the paired US
    points (least squares, SimpleITK's landmark initializer). Pairs are matched by order."""
    mr = np.asarray(mr_points_lps, dtype=np.float64).reshape(-1, 3)
    us = np.asarray(us_points_lps, dtype=np.float64).reshape(-1, 3)
    if len(mr) != len(us):
        raise InputError(f"{len(mr)} points on the MR but {len(us)} on the US: place them in pairs, in the same order")
    if len(mr) < 3:
        raise InputError(f"{len(mr)} point pairs: at least 3 are needed for a rigid alignment")
    if not (np.all(np.isfinite(mr)) and np.all(np.isfinite(us))):
        raise InputError("a fiducial position is not a number")
    for what, points in (("MR", mr), ("US", us)):
        spread = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
        if spread[1] < MIN_SPREAD_MM:
            raise InputError(f"the {what} points lie (almost) on a line: spread them over the liver")
    initializer = sitk.LandmarkBasedTransformInitializer(
        sitk.VersorRigid3DTransform(), mr.ravel().tolist(), us.ravel().tolist())
    matrix = linear_to_matrix(sitk.VersorRigid3DTransform(initializer))
    residuals = np.linalg.norm(mr @ matrix[:3, :3].T + matrix[:3, 3] - us, axis=1)
    return Alignment(matrix, residuals)


def prealign(us: Volume, matrix_mr_to_us_lps: np.ndarray) -> Volume:
    """The US volume placed in MR space by the alignment: same voxels, geometry T^-1 * M (a US
    voxel at US point p lies at MR point T^-1(p)). Registering it is the same as registering
    the original through T, and the results then map MR points to this pre-aligned volume."""
    return Volume.from_ijk_to_lps(us.array, np.linalg.inv(matrix_mr_to_us_lps) @ us.ijk_to_lps())
