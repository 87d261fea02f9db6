"""Reading one 2D ultrasound image (PNG, JPEG, BMP, DICOM) with SimpleITK.

Greyscale stored as RGB(A) is taken as grey; a truly coloured image (e.g. a Doppler overlay) is
converted to luminance and said so. Multi-frame images (cine loops) are refused: the frame to
measure must be chosen. The pixel size comes from DICOM's Pixel Spacing when present; PNG and
JPEG carry none, so it must be given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import read_sitk

MAX_SIDE = 8192  # pixels; far above any scanner's frame, low enough to bound memory


@dataclasses.dataclass
class Image2D:
    pixels: np.ndarray  # (rows, cols) float32 grey levels as stored (0-255 for 8-bit)
    pixel_mm: float | None  # isotropic pixel size, when the file says it
    notes: list[str] = dataclasses.field(default_factory=list)


def read_image_2d(path: str | Path) -> Image2D:
    path = Path(path)
    image = read_sitk(path)
    notes = []
    size = image.GetSize()
    if image.GetDimension() == 3 and size[2] > 1:
        raise InputError(f"{path.name} has {size[2]} frames: export the single frame to measure")
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 3:
        array = array[0]
    if array.ndim == 3:  # (rows, cols, components)
        rgb = array[..., :3].astype(np.float32)
        if array.shape[-1] >= 3 and not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            notes.append("colour image converted to luminance")
            array = rgb @ np.float32([0.299, 0.587, 0.114])
        else:
            array = rgb[..., 0]
    if array.ndim != 2 or min(array.shape) < 32:
        raise InputError(f"{path.name} is not a 2D image of usable size (shape {array.shape})")
    if max(array.shape) > MAX_SIDE:
        raise InputError(f"{path.name} is {array.shape[1]}x{array.shape[0]} pixels; at most {MAX_SIDE} per side")
    pixel_mm = None
    if image.HasMetaDataKey("0028|0030"):  # DICOM Pixel Spacing: row spacing \ column spacing, mm
        rows_mm, cols_mm = (float(v) for v in image.GetMetaData("0028|0030").split("\\")[:2])
        if abs(rows_mm - cols_mm) > 1e-3 * max(rows_mm, cols_mm):
            raise InputError(f"{path.name} has non-square pixels ({rows_mm} x {cols_mm} mm)")
        pixel_mm = cols_mm
    return Image2D(np.asarray(array, dtype=np.float32), pixel_mm, notes)


def check_pixel_size(pixel_mm: float | None, name: str, missing: str | None = None) -> float:
    """A fetal head image's pixel is a few hundredths to a few tenths of a millimetre. `missing`:
    why there is none, when the caller knows better (e.g. the image is not in the CSV given)."""
    if pixel_mm is None:
        missing = missing or "no pixel size: give --pixel-size MM or --pixel-size-csv (DICOM carries its own)"
        raise InputError(f"{name}: {missing}")
    if not np.isfinite(pixel_mm) or not 0.005 <= pixel_mm <= 2.0:
        raise InputError(f"{name}: pixel size {pixel_mm} mm is absurd for an ultrasound image (0.005-2 mm expected)")
    return float(pixel_mm)
