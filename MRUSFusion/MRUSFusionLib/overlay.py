"""Overlay pictures: MR slices in grey with the US in colour on top, before and after
registration, in the three orientations, in radiological display convention.

The fusion grid's axes are the MR's axes (close to L, P, S): axial slices show patient left on
the right of the picture and anterior at the top; coronal and sagittal slices show superior at
the top. Pictures are composed with numpy and written as PNG by SimpleITK (no plotting library).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

# an orange-to-yellow ramp for the echo, so grey MR and coloured US stay distinguishable
_US_RGB = np.array([[0.0, 0.0, 0.0], [1.0, 0.45, 0.0], [1.0, 1.0, 0.3]])


def _colourise(values: np.ndarray) -> np.ndarray:
    x = np.clip(values, 0, 1) * (len(_US_RGB) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_US_RGB) - 2)
    frac = (x - lo)[..., None]
    return _US_RGB[lo] * (1 - frac) + _US_RGB[lo + 1] * frac


def blend(mr: np.ndarray, us: np.ndarray, fov: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """2D slices in [0, 1] -> RGB uint8; the US shown only inside its field of view."""
    grey = np.repeat(mr[..., None], 3, axis=-1)
    a = alpha * (fov > 0)[..., None]
    rgb = grey * (1 - a) + _colourise(us) * a
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def orthogonal_slices(volume: np.ndarray, centre_kji: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through `centre` of a (k, j, i) array, oriented for display."""
    k, j, i = centre_kji
    axial = volume[k]  # rows j (anterior at top), columns i (patient left on the right)
    coronal = volume[:, j, :][::-1]  # rows k flipped: superior at the top
    sagittal = volume[:, :, i][::-1]  # columns j: anterior on the left
    return [axial, coronal, sagittal]


def _pad_to(img: np.ndarray, height: int) -> np.ndarray:
    out = np.zeros((height, img.shape[1], 3), np.uint8)
    out[: img.shape[0]] = img
    return out


def overlay_panel(mr: np.ndarray, us_before: np.ndarray, us_after: np.ndarray, fov: np.ndarray,
                  centre_kji: tuple[int, int, int] | None = None) -> np.ndarray:
    """Rows: before, after registration; columns: axial, coronal, sagittal. RGB uint8."""
    if centre_kji is None:
        centre_kji = tuple(int(c) for c in np.array(np.nonzero(fov)).mean(axis=1)) if fov.any() else \
            tuple(n // 2 for n in mr.shape)
    rows = []
    # after registration the US has moved: its data covers where the warped image is non-zero
    for us, extent in ((us_before, fov), (us_after, (us_after > 0).astype(np.float32))):
        tiles = [blend(m, u, f) for m, u, f in zip(orthogonal_slices(mr, centre_kji),
                                                   orthogonal_slices(us, centre_kji),
                                                   orthogonal_slices(extent, centre_kji), strict=True)]
        height = max(t.shape[0] for t in tiles)
        gap = np.full((height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate(sum(([_pad_to(t, height), gap] for t in tiles), [])[:-1], axis=1))
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([rows[0], gap, rows[1]], axis=0)


def write_png(rgb: np.ndarray, path: Path, scale: int = 2) -> Path:
    """Write an RGB uint8 picture, enlarged by pixel repetition for legibility."""
    big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(big, isVector=True), str(path))
    return path
