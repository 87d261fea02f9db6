"""Overlay pictures: MR slices in grey with their edges in cyan and the US in orange at a moderate
opacity, one labelled row per stage (before / network / corrected), in the three orientations,
in radiological display convention.

The fusion grid's axes are the MR's axes (close to L, P, S): axial slices show patient left on
the right of the picture and anterior at the top; coronal and sagittal slices show superior at
the top. Pictures are composed with numpy and written as PNG by SimpleITK (no plotting library).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.pictures import text_strip

# an orange-to-yellow ramp for the echo, so grey MR and coloured US stay distinguishable
_US_RGB = np.array([[0.0, 0.0, 0.0], [1.0, 0.45, 0.0], [1.0, 1.0, 0.3]])


def _colourise(values: np.ndarray) -> np.ndarray:
    x = np.clip(values, 0, 1) * (len(_US_RGB) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_US_RGB) - 2)
    frac = (x - lo)[..., None]
    return _US_RGB[lo] * (1 - frac) + _US_RGB[lo + 1] * frac


def blend(mr: np.ndarray, us: np.ndarray, fov: np.ndarray, edges: np.ndarray | None = None,
          alpha: float = 0.4) -> np.ndarray:
    """2D slices in [0, 1] -> RGB uint8: the US at a moderate opacity inside its field of view,
    so the MR stays visible under it, and the MR's edges drawn over both in cyan."""
    grey = np.repeat(mr[..., None], 3, axis=-1)
    a = alpha * (fov > 0)[..., None]
    rgb = grey * (1 - a) + _colourise(us) * a
    if edges is not None:
        rgb[edges] = rgb[edges] * 0.2 + np.array([0.0, 0.9, 1.0]) * 0.8
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def mr_edges(mr_slice: np.ndarray, share: float = 0.07) -> np.ndarray:
    """The strongest edges of an MR slice (the top `share` of its gradient magnitude, thinned to
    the local maxima across the edge): organ outlines and vessel walls, one or two pixels wide."""
    gy, gx = np.gradient(mr_slice.astype(np.float32))
    magnitude = np.hypot(gx, gy)
    if not np.any(magnitude > 0):
        return np.zeros(mr_slice.shape, bool)
    strong = magnitude >= np.quantile(magnitude, 1.0 - share)
    # keep a pixel only where its magnitude is not exceeded by a neighbour across the edge
    horizontal = np.abs(gx) >= np.abs(gy)
    padded = np.pad(magnitude, 1, mode="edge")
    left, right = padded[1:-1, :-2], padded[1:-1, 2:]
    up, down = padded[:-2, 1:-1], padded[2:, 1:-1]
    peak = np.where(horizontal, (magnitude >= left) & (magnitude >= right), (magnitude >= up) & (magnitude >= down))
    return strong & peak


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


def overlay_panel(mr: np.ndarray, rows: list[tuple[str, np.ndarray, np.ndarray]],
                  centre_kji: tuple[int, int, int] | None = None) -> np.ndarray:
    """One labelled row per (caption, US volume, its data extent), all on the MR's (k, j, i) grid:
    axial, coronal and sagittal slices through the centre of the first row's data, the MR in grey
    with its edges in cyan, the US in orange over it. RGB uint8."""
    first_extent = rows[0][2]
    if centre_kji is None:
        centre_kji = tuple(int(c) for c in np.array(np.nonzero(first_extent)).mean(axis=1)) if first_extent.any() \
            else tuple(n // 2 for n in mr.shape)
    mr_slices = orthogonal_slices(mr, centre_kji)
    edges = [mr_edges(m) for m in mr_slices]
    out = []
    for caption, us, extent in rows:
        tiles = [blend(m, u, f, e) for m, u, f, e in zip(mr_slices, orthogonal_slices(us, centre_kji),
                                                         orthogonal_slices(extent, centre_kji), edges, strict=True)]
        height = max(t.shape[0] for t in tiles)
        gap = np.full((height, 4, 3), 255, np.uint8)
        row = np.concatenate(sum(([_pad_to(t, height), gap] for t in tiles), [])[:-1], axis=1)
        out += [text_strip(caption, row.shape[1]), row, np.full((4, row.shape[1], 3), 255, np.uint8)]
    return np.concatenate(out[:-1], axis=0)


def write_png(rgb: np.ndarray, path: Path, scale: int = 2) -> Path:
    """Write an RGB uint8 picture, enlarged by pixel repetition for legibility."""
    big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(big, isVector=True), str(path))
    return path
