"""One image to its measurement: checks, de-identification, segmentation, measurement."""

from __future__ import annotations

import dataclasses

import numpy as np

from deepnav.errors import InputError
from FetalBiometryLib.deidentify import deidentify
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
