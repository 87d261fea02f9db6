"""One image to its measurement: checks, de-identification, segmentation, measurement."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from deepnav.errors import InputError
from FetalBiometryLib.deidentify import deidentify
from FetalBiometryLib.image_io import check_pixel_size, read_image_2d
from FetalBiometryLib.measure import Measurement, measure
from FetalBiometryLib.segment import HeadSegmenter

MIN_CONTRAST = 2.0  # grey-level standard deviation below which a frame is blank


@dataclasses.dataclass
class Result:
    measurement: Measurement
    probability: np.ndarray  # fused head probability on the image grid
    pixels: np.ndarray  # the de-identified image
    blanked_pixels: int  # by de-identification


def measure_image(segmenter: HeadSegmenter, pixels: np.ndarray, pixel_mm: float) -> Result:
    if not np.all(np.isfinite(pixels)):
        raise InputError("the image has NaN or infinite pixels")
    if float(np.std(pixels)) < MIN_CONTRAST:
        raise InputError("the image is blank (no contrast): not an ultrasound frame")
    clean, blanked = deidentify(pixels)
    probability = segmenter.probability(clean)
    return Result(measure(probability, pixel_mm), probability, clean, blanked)


def measurement_row(name: str, pixel_mm: float, m: Measurement) -> dict:
    """One image's measurement as reported (JSON of `deepnav fetal measure`, Slicer's table)."""
    if m.hc_mm is None:
        return {"file": name, "pixel_mm": pixel_mm, "hc_mm": None, "reason": m.reason}
    return {"file": name, "pixel_mm": pixel_mm, "hc_mm": m.hc_mm, "bpd_mm": m.bpd_mm, "ofd_mm": m.ofd_mm,
            "ellipse_px": m.ellipse_px.as_dict(), "ellipse_mm": m.ellipse_px.as_dict(pixel_mm),
            "contour_length_mm": m.contour_length_mm, "pixel_count_hc_mm": m.pixel_count_hc_mm,
            "confident": m.confident, "flags": m.flags}


def measure_file(segmenter: HeadSegmenter, path: Path, pixel_mm: float | None = None,
                 no_pixel_size: str | None = None) -> tuple[dict, Result | None]:
    """Read, measure and report one image file; `pixel_mm` when given, else the file's own (DICOM);
    `no_pixel_size`: why none was given (see `hc18.csv_pixel_size`). Bad input gives a row with
    `"hc_mm": None` and the reason, and no result. Rows carry the file's name and its path as given
    (two inputs may share a name)."""
    t0 = time.perf_counter()
    try:
        image = read_image_2d(path)
        pixel_mm = check_pixel_size(pixel_mm if pixel_mm is not None else image.pixel_mm, path.name, no_pixel_size)
        result = measure_image(segmenter, image.pixels, pixel_mm)
    except InputError as exc:
        return {"file": path.name, "path": str(path), "hc_mm": None, "reason": str(exc)}, None
    row = measurement_row(path.name, pixel_mm, result.measurement) | {"path": str(path)}
    row.update(runtime_s=time.perf_counter() - t0, notes=image.notes, deidentified_pixels=result.blanked_pixels)
    return row, result
