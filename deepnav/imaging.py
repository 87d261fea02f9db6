"""Images that carry their geometry, and the file IO of the whole extension.

A `Volume` is a numpy array in SimpleITK's index order (k, j, i) = (z, y, x) together with
the geometry ITK uses: `spacing` (i, j, k) in mm, `origin` (LPS mm, the centre of voxel 0)
and `direction` (3x3, columns are the LPS directions of the i, j, k axes). The physical LPS
position of the voxel centre (i, j, k) is `origin + direction @ diag(spacing) @ (i, j, k)`.
Slicer's RAS is LPS with x and y negated; `ijk_to_ras` gives the matrix Slicer's volume
nodes hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.image_integrity import check_image_file

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclasses.dataclass
class Volume:
    """A 3D scalar image (k, j, i) with its LPS geometry."""

    array: np.ndarray
    spacing: np.ndarray  # (3,) mm, i/j/k order
    origin: np.ndarray  # (3,) LPS mm
    direction: np.ndarray  # (3, 3), columns = LPS axis directions

    def __post_init__(self):
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if self.array.ndim != 3:
            raise InputError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise InputError(f"voxel spacing must be positive, got {self.spacing}")

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k (SimpleITK's GetSize order)."""
        return tuple(int(n) for n in self.array.shape[::-1])

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix from voxel index to RAS mm, as a Slicer volume node stores it."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Voxel indices (N, 3) in i, j, k order to LPS points (N, 3)."""
        m = self.ijk_to_lps()
        return np.asarray(ijk, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def lps_to_index(self, points_lps: np.ndarray) -> np.ndarray:
        """LPS points (N, 3) to continuous voxel indices (N, 3) in i, j, k order."""
        m = np.linalg.inv(self.ijk_to_lps())
        return np.asarray(points_lps, dtype=np.float64) @ m[:3, :3].T + m[:3, 3]

    def corners_lps(self, lo_ijk=(0, 0, 0), hi_ijk=None) -> np.ndarray:
        """LPS positions (8, 3) of the centres of the eight corner voxels of the index box
        lo_ijk..hi_ijk (inclusive; default the whole grid)."""
        lo = np.asarray(lo_ijk, dtype=float)
        hi = np.array(self.size_ijk, dtype=float) - 1 if hi_ijk is None else np.asarray(hi_ijk, dtype=float)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        return self.index_to_lps(corners)

    def centre_lps(self) -> np.ndarray:
        """LPS position (3,) of the grid's centre (between the corner voxels' centres)."""
        return self.index_to_lps(((np.array(self.size_ijk) - 1) / 2.0)[None])[0]

    def same_grid(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """True when both volumes sample the same voxel centres."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tol_mm)
            and np.allclose(self.origin, other.origin, atol=tol_mm)
            and np.allclose(self.direction, other.direction, atol=1e-5)
        )

    def with_array(self, array: np.ndarray) -> Volume:
        """A volume on the same grid holding other voxels."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy())

    def to_sitk(self) -> sitk.Image:
        return self.apply_geometry(sitk.GetImageFromArray(self.array))

    def apply_geometry(self, image: sitk.Image) -> sitk.Image:
        """Give a SimpleITK image (scalar or vector) of the same size this grid's geometry."""
        image.SetSpacing(self.spacing.tolist())
        image.SetOrigin(self.origin.tolist())
        image.SetDirection(self.direction.flatten().tolist())
        return image

    @classmethod
    def from_ijk_to_lps(cls, array: np.ndarray, matrix: np.ndarray) -> Volume:
        """A volume whose geometry is a 4x4 voxel-index-to-LPS matrix (spacing = column norms)."""
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise InputError(f"voxel spacing must be positive, got {spacing}")
        return cls(array, spacing, matrix[:3, 3], matrix[:3, :3] / spacing)

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components"
            )
        return cls(
            sitk.GetArrayFromImage(image),
            np.array(image.GetSpacing()),
            np.array(image.GetOrigin()),
            np.array(image.GetDirection()).reshape(3, 3),
        )


def read_sitk(path: str | Path, *, what: str = "image") -> sitk.Image:
    """Any image file SimpleITK reads; InputError (one clear line) for a missing or unreadable one,
    or one cut short or damaged (which SimpleITK may read with zeros in place of the missing voxels).
    Every module reads its images through here."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        check_image_file(path, what)
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {path}: {str(exc).strip().splitlines()[-1]}") from None


def read_volume(path: str | Path, *, what: str = "image") -> Volume:
    """Read a 3D scalar image (NRRD, NIfTI, MHA, ...) in LPS; clear errors for bad files."""
    image = read_sitk(path, what=what)
    try:
        return Volume.from_sitk(image)
    except InputError as exc:
        raise InputError(f"{what} {path}: {exc}") from exc


def write_volume(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically: a crash leaves either the old file or the new one, never half."""
    return write_image_atomic(volume.to_sitk(), path, compress=compress)


def write_image_atomic(image: sitk.Image, path: str | Path, *, compress: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix(es) so SimpleITK picks the right writer (".nii.gz", ".nrrd").
    tmp = path.with_name(f".{path.stem.split('.')[0]}.partial{''.join(path.suffixes)}")
    sitk.WriteImage(image, str(tmp), useCompression=compress)
    tmp.replace(path)
    return path


def require_finite(volume: Volume, what: str) -> None:
    """Reject NaN/Inf voxels: they poison every resampling and every loss downstream."""
    if np.issubdtype(volume.array.dtype, np.floating) and not np.all(np.isfinite(volume.array)):
        bad = int(np.count_nonzero(~np.isfinite(volume.array)))
        raise InputError(f"{what} has {bad} NaN/Inf voxels; clean or mask them first")


def require_contrast(volume: Volume, what: str, data_only: bool = False) -> None:
    """Reject an image whose voxels all have one value (with `data_only`, its voxels above 0: a US
    is 0 outside its fan): a blank frame, a probe in air, a wrong series. Nothing in it can be
    registered, and downstream it would fail with a misleading message (no overlap, NaN features)."""
    values = volume.array[volume.array > 0] if data_only else volume.array
    if values.size == 0:
        raise InputError(f"{what} holds no data: every voxel is 0 or below")
    low, high = values.min(), values.max()
    if low == high:
        where = " with data" if data_only else ""
        raise InputError(f"{what} has no contrast: every voxel{where} is {float(low):g}; nothing to register")


def require_same_grid(image: Volume, label: Volume, what: str) -> None:
    """A label map must sample exactly the voxels of its image."""
    if not image.same_grid(label):
        raise InputError(
            f"{what} does not match its image's geometry: size {label.size_ijk} vs {image.size_ijk}, "
            f"spacing {np.round(label.spacing, 4)} vs {np.round(image.spacing, 4)}, "
            f"origin {np.round(label.origin, 3)} vs {np.round(image.origin, 3)}"
        )


def resample_to_grid(
    volume: Volume,
    reference: Volume,
    *,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
    dtype=np.float32,
) -> Volume:
    """Resample `volume` onto `reference`'s grid. `transform` maps reference LPS points to
    `volume` LPS points (ITK's resampling convention); identity when None."""
    out = sitk.Resample(
        volume.to_sitk(),
        reference.to_sitk(),
        transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity),
        interpolator,
        default_value,
        sitk.sitkFloat32 if dtype == np.float32 else sitk.sitkFloat64,
    )
    return reference.with_array(sitk.GetArrayFromImage(out).astype(dtype, copy=False))


def grid_like(size_ijk, spacing, origin, direction, dtype=np.float32) -> Volume:
    """An all-zero volume with the given geometry."""
    size_ijk = [int(n) for n in size_ijk]
    return Volume(np.zeros(size_ijk[::-1], dtype=dtype), spacing, origin, direction)


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation about x, then y, then z (R = Rz @ Ry @ Rx), angles in radians."""
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def linear_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """A linear ITK transform (affine, Euler, versor...) with its centre folded in: the 4x4
    matrix of p -> M (p - c) + c + t."""
    m = np.eye(4)
    m[:3, :3] = np.array(transform.GetMatrix()).reshape(3, 3)
    centre = np.array(transform.GetCenter())
    m[:3, 3] = np.array(transform.GetTranslation()) + centre - m[:3, :3] @ centre
    return m


def matrix_to_affine(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 LPS matrix as an ITK affine (centre at the origin)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform
