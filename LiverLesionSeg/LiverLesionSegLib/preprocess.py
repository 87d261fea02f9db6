"""From registered phases to the network's input, and back.

- Working grid: 1.5 mm isotropic, in the reference phase's orientation, cropped to the body (the
  non-air region of the reference, the method's "non-zero" crop) plus a margin.
- Resampling: cubic B-spline for images, nearest neighbour for label maps (SimpleITK).
- Intensities: per phase, clipped to the 0.5-99.5 percentile HU range of the training set's
  foreground (liver and lesions) and z-scored with that set's mean and standard deviation. The
  figures are stored in the model file, so inference never needs labels. A missing phase is an
  all-zero channel (zero is the foreground mean after z-scoring).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, matrix_to_affine
from LiverLesionSegLib.network import PHASE_CHANNELS

WORK_SPACING_MM = 1.5
BODY_HU = -500.0
MARGIN_MM = 6.0


def reference_phase(phases) -> str:
    """The frame everything is returned in: arterial (the method's example) if present, else venous."""
    for name in ("arterial", "venous", "delayed", "plain"):
        if name in phases:
            return name
    raise InputError(f"no known phase in {sorted(phases)}; known: {PHASE_CHANNELS}")


def working_grid(reference: Volume, spacing_mm: float = WORK_SPACING_MM) -> Volume:
    """The reference's body (HU > -500) bounding box, at `spacing_mm`, in its orientation."""
    k, j, i = np.nonzero(reference.array > BODY_HU)
    if len(i) == 0:
        raise InputError("the reference phase has no body voxels (HU > -500): is it a CT in Hounsfield units?")
    lo_idx = np.array([i.min(), j.min(), k.min()], float)
    hi_idx = np.array([i.max(), j.max(), k.max()], float)
    extent_mm = (hi_idx - lo_idx) * reference.spacing + 2 * MARGIN_MM
    size = np.maximum(np.ceil(extent_mm / spacing_mm).astype(int) + 1, 16)
    origin = reference.index_to_lps(lo_idx[None])[0] - reference.direction @ np.full(3, MARGIN_MM)
    return grid_like(tuple(size), np.full(3, spacing_mm), origin, reference.direction)


def resample(volume: Volume, grid: Volume, matrix_lps: np.ndarray | None = None, *, label: bool = False) -> np.ndarray:
    """`volume` on `grid` (through `matrix_lps`: grid point -> volume point, e.g. a phase
    registration); cubic for images (outside: -1000 HU), nearest for labels (outside: 0)."""
    transform = matrix_to_affine(matrix_lps if matrix_lps is not None else np.eye(4))
    interpolator = sitk.sitkNearestNeighbor if label else sitk.sitkBSpline
    image = volume.to_sitk() if not label else sitk.Cast(volume.to_sitk(), sitk.sitkUInt8)
    out = sitk.Resample(image, grid.to_sitk(), transform, interpolator, 0.0 if label else -1000.0,
                        sitk.sitkUInt8 if label else sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


@dataclasses.dataclass
class Normalisation:
    """Per phase: the HU clip range and the z-score mean and standard deviation."""

    low: dict[str, float]
    high: dict[str, float]
    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def fit(cls, foreground_hu: dict[str, list[np.ndarray]]) -> Normalisation:
        """From each phase's foreground voxels (liver and lesions) over the training set."""
        low, high, mean, std = {}, {}, {}, {}
        for phase, samples in foreground_hu.items():
            values = np.concatenate([np.asarray(s, np.float64).ravel() for s in samples])
            if values.size == 0:
                continue
            low[phase], high[phase] = (float(v) for v in np.percentile(values, [0.5, 99.5]))
            clipped = np.clip(values, low[phase], high[phase])
            mean[phase], std[phase] = float(clipped.mean()), max(float(clipped.std()), 1.0)
        return cls(low, high, mean, std)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Normalisation:
        return cls(**data)

    def apply(self, phases_hu: dict[str, np.ndarray]) -> np.ndarray:
        """(4, D, H, W) float32 network input from the phases present (HU on the working grid)."""
        shape = next(iter(phases_hu.values())).shape
        out = np.zeros((len(PHASE_CHANNELS), *shape), np.float32)
        for c, phase in enumerate(PHASE_CHANNELS):
            if phase in phases_hu:
                if phase not in self.mean:
                    raise InputError(f"the model was not trained with a {phase} phase")
                values = np.clip(phases_hu[phase], self.low[phase], self.high[phase])
                out[c] = (values - self.mean[phase]) / self.std[phase]
        return out
