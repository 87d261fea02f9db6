"""OpenIGTLink messages of the fusion service, and their conversion to and from our geometry.

Conventions on the wire (what Slicer's OpenIGTLinkIF and PLUS expect):
- IMAGE geometry: we read both coordinate systems the header allows (RAS or LPS) and always
  send RAS, the protocol's default. The matrix is IJK -> world with the image *centre* as
  position (pyigtl converts from our origin-based matrices).
- TRANSFORM: a RAS matrix that Slicer puts on a linear transform node as *to parent*: placing
  the US volume under it moves the US onto the MR (the rigid stage).
- The deformation is a 3-component float32 IMAGE on the registration grid: the displacement in
  RAS mm, resampling convention x_us = x_mr + u(x_mr) (Slicer's "from parent"), rigid included.
- STATUS (which pyigtl lacks) answers a rejected message; a STRING with JSON carries the
  per-frame report (frame id, source timestamp, stage timings, quality figures).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pyigtl
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import LPS_TO_RAS, Volume, linear_to_matrix
from MRUSFusionLib import fields

STATUS_OK = 1
STATUS_ERROR = 2

# the service's answers, one device name each (a client tells them apart by name)
DEVICE_WARPED = "DeepNavWarpedUS"
DEVICE_FIELD = "DeepNavField"
DEVICE_RIGID = "DeepNavRigid"
DEVICE_REPORT = "DeepNavReport"
DEVICE_ECHO = "DeepNavEcho"


class StatusMessage(pyigtl.MessageBase):
    """OpenIGTLink STATUS: code (uint16), subcode (int64), error name (20 chars), text."""

    _HEAD = struct.Struct(">Hq20s")

    def __init__(self, code: int = STATUS_OK, text: str = "", error_name: str = "", subcode: int = 0,
                 timestamp=None, device_name=None):
        super().__init__(timestamp=timestamp, device_name=device_name)
        self._message_type = "STATUS"
        self.code, self.subcode, self.error_name, self.text = code, subcode, error_name, text
        self._valid_message = True

    def content_asstring(self):
        return f"Code: {self.code} ({self.error_name}) {self.text}"

    def _pack_content(self):
        return self._HEAD.pack(self.code, self.subcode, self.error_name.encode("ascii", "replace")[:20]) + \
            self.text.encode("utf-8") + b"\0"

    def _unpack_content(self, content):
        self.code, self.subcode, name = self._HEAD.unpack(bytes(content[: self._HEAD.size]))
        self.error_name = name.rstrip(b"\0").decode("ascii", "replace")
        self.text = bytes(content[self._HEAD.size:]).split(b"\0", 1)[0].decode("utf-8", "replace")


def _world_matrix_lps(message: pyigtl.ImageMessage) -> np.ndarray:
    matrix = np.asarray(message.ijk_to_world_matrix, dtype=np.float64)
    return LPS_TO_RAS @ matrix if message.world_coordinate_system == "ras" else matrix


def image_to_volume(message: pyigtl.ImageMessage, what: str = "US volume") -> Volume:
    """A received scalar 3D IMAGE as a Volume (array (k, j, i) as sent, LPS geometry).
    InputError if it is not one (several components, 2D, degenerate geometry)."""
    image = message.image
    if image.ndim == 4:
        if image.shape[3] != 1:
            raise InputError(f"{what} {message.device_name!r} has {image.shape[3]} components; a scalar volume is needed")
        image = image[..., 0]
    if image.ndim != 3 or min(image.shape) < 2:
        raise InputError(f"{what} {message.device_name!r} is {image.shape[::-1]} (i, j, k): a 3D volume is needed, "
                         "not a 2D image")
    matrix = _world_matrix_lps(message)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if np.any(spacing < 1e-6) or not np.all(np.isfinite(matrix)):
        raise InputError(f"{what} {message.device_name!r} has a degenerate geometry (spacing {spacing})")
    volume = Volume.from_ijk_to_lps(image, matrix)
    if not np.allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-3):
        raise InputError(f"{what} {message.device_name!r} has non-orthogonal axes")
    return volume


def volume_to_image(array: np.ndarray, grid: Volume, device: str, timestamp: float) -> pyigtl.ImageMessage:
    """An array (k, j, i) or (k, j, i, components) on `grid`'s geometry as a RAS IMAGE."""
    return pyigtl.ImageMessage(np.ascontiguousarray(array), ijk_to_world_matrix=grid.ijk_to_ras(),
                               world_coordinate_system="ras", device_name=device, timestamp=timestamp)


def intensity_to_uint8(values: np.ndarray) -> np.ndarray:
    """[0, 1] float intensities as uint8 (a quarter of the bytes; display needs no more)."""
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


def displacement_to_image(disp_ijk: np.ndarray, grid: Volume, device: str, timestamp: float) -> pyigtl.ImageMessage:
    """A network displacement (3, k, j, i) in voxels (di, dj, dk) on `grid` as a 3-component
    RAS IMAGE whose vectors are RAS mm: u_ras = F D diag(spacing) u_ijk (F flips L, P)."""
    return volume_to_image(fields.displacement_to_ras_vectors(disp_ijk, grid), grid, device, timestamp)


def field_image_to_message(field_lps: sitk.Image, grid: Volume, device: str, timestamp: float) -> pyigtl.ImageMessage:
    """An LPS displacement image on `grid` (e.g. `fields.transform_to_field`) as the same
    3-component RAS IMAGE as `displacement_to_image`: vectors in RAS mm, float32."""
    vectors = sitk.GetArrayFromImage(field_lps).astype(np.float32)  # (k, j, i, 3) LPS
    vectors[..., :2] *= -1.0  # L, P -> R, A
    return volume_to_image(vectors, grid, device, timestamp)


def _field_grid(message: pyigtl.ImageMessage) -> Volume:
    """The grid (LPS geometry) of a received displacement IMAGE; InputError if it is not one."""
    if message.image.ndim != 4 or message.image.shape[3] != 3:
        raise InputError(f"{message.device_name!r} is not a 3-component displacement image")
    return Volume.from_ijk_to_lps(message.image[..., 0], _world_matrix_lps(message))


def image_to_ras_field(message: pyigtl.ImageMessage) -> tuple[np.ndarray, Volume]:
    """A received displacement IMAGE as it came: (k, j, i, 3) RAS mm vectors (float32, not copied
    when sent so) and its grid (LPS geometry), what `mrml.grid_transform_from_ras` takes."""
    grid = _field_grid(message)
    return np.asarray(message.image, np.float32), grid


def image_to_field(message: pyigtl.ImageMessage) -> sitk.Image:
    """The inverse of `displacement_to_image`: a SimpleITK LPS displacement field (LPS vectors)."""
    return fields.ras_vectors_to_lps_image(message.image, _field_grid(message))


def rigid_to_parent_ras(rigid_lps: sitk.AffineTransform) -> np.ndarray:
    """Our rigid transform (MR LPS point -> US LPS point, resampling convention) as the RAS
    to-parent matrix Slicer applies to the US volume to bring it onto the MR."""
    return fields.resampling_to_parent_ras(linear_to_matrix(rigid_lps))


def transform_message(matrix_ras: np.ndarray, device: str, timestamp: float) -> pyigtl.TransformMessage:
    return pyigtl.TransformMessage(matrix_ras, device_name=device, timestamp=timestamp)


def report_message(report: dict, device: str, timestamp: float) -> pyigtl.StringMessage:
    return pyigtl.StringMessage(json.dumps(report), device_name=device, timestamp=timestamp)


def error_status(text: str, device: str, timestamp: float, code: int = STATUS_ERROR) -> StatusMessage:
    return StatusMessage(code, text[:1000], error_name="DeepNavError", device_name=device, timestamp=timestamp)
