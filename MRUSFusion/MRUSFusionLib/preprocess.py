"""From an MR and a US volume (any geometry) to the network's 128^3, 1 mm input pair.

The fusion grid is a 128^3 grid of 1 mm voxels whose axes are the MR's axes (same direction
matrix) and whose centre is the liver's centre (or the MR's, without a liver mask). Both images
are resampled into it with SimpleITK, so the pair keeps an exact LPS geometry (`FusionPair.grid`)
and every result maps back to the original MR and US. The US is assumed coarsely in MR space
(the spec's initial rigid alignment); an optional `initial` transform (fusion-grid LPS -> US LPS)
applies a manual alignment first.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, require_finite, require_same_grid, resample_to_grid

GRID_SIZE = 128
GRID_SPACING_MM = 1.0
MIN_OVERLAP = 0.05  # share of the fusion grid that the US field of view must cover


@dataclasses.dataclass
class FusionPair:
    grid: Volume  # geometry of the 128^3 grid (its array holds the US field-of-view mask)
    fixed: np.ndarray  # MR, float32 (128, 128, 128) in [0, 1]
    moving: np.ndarray  # US, float32 (128, 128, 128) in [0, 1], 0 outside its field of view
    fov: np.ndarray  # float32 1 where the US has data
    fixed_label: np.ndarray | None = None  # float32 vessel labels in the grid
    moving_label: np.ndarray | None = None


def fusion_grid(mr: Volume, liver: Volume | None = None, size: int = GRID_SIZE) -> Volume:
    """The 128^3 1 mm grid in the MR's orientation, centred on the liver (LPS geometry)."""
    if liver is not None and np.any(liver.array):
        k, j, i = np.nonzero(liver.array)
        lo = np.array([i.min(), j.min(), k.min()])
        hi = np.array([i.max(), j.max(), k.max()])
        centre = liver.index_to_lps(((lo + hi) / 2)[None])[0]
    else:
        centre = mr.centre_lps()
    spacing = np.full(3, GRID_SPACING_MM)
    origin = centre - mr.direction @ (spacing * (size - 1) / 2)
    return grid_like((size,) * 3, spacing, origin, mr.direction)


def normalise(values: np.ndarray, mask: np.ndarray | None = None, lo_pct=1.0, hi_pct=99.5) -> np.ndarray:
    """Clip to the [lo, hi] percentiles of the voxels in `mask` (non-zero voxels by default)
    and scale to [0, 1]: robust to outliers and to the different ranges of MR and US."""
    sample = values[mask > 0] if mask is not None else values[values > 0]
    if sample.size == 0:
        return np.zeros_like(values, dtype=np.float32)
    lo, hi = np.percentile(sample, [lo_pct, hi_pct])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def check_inputs(mr: Volume, us: Volume, mr_labels: dict[str, Volume], us_labels: dict[str, Volume]) -> None:
    require_finite(mr, "MR")
    require_finite(us, "US volume")
    for name, label in mr_labels.items():
        require_same_grid(mr, label, name)
    for name, label in us_labels.items():
        require_same_grid(us, label, name)


def prepare_pair(
    mr: Volume,
    us: Volume,
    *,
    liver: Volume | None = None,
    mr_vessels: Volume | None = None,
    us_vessels: Volume | None = None,
    initial: sitk.Transform | None = None,
    grid: Volume | None = None,
    fixed: np.ndarray | None = None,
) -> FusionPair:
    """Resample MR (and labels) and US into the fusion grid and normalise intensities.
    `grid` and `fixed` (from `prepare_fixed`) skip the MR's share of the work when the same
    MR meets many US frames (the streaming service)."""
    mr_labels = {k: v for k, v in {"liver mask": liver, "MR vessel label": mr_vessels}.items() if v is not None}
    us_labels = {"US vessel label": us_vessels} if us_vessels is not None else {}
    check_inputs(mr, us, mr_labels, us_labels)
    grid = grid if grid is not None else fusion_grid(mr, liver)
    # one resampling gives both the US and its field of view: voxels outside the US grid get
    # NaN (the same inside test as nearest-neighbour resampling of an all-ones image, at half
    # the cost); uint8/int16 input is resampled as is, straight to float32
    us_in_grid = resample_to_grid(us, grid, transform=initial, default_value=np.nan).array
    fov = np.isfinite(us_in_grid).astype(np.float32)
    if fov.mean() < MIN_OVERLAP:
        raise InputError(
            f"the US volume covers {100 * fov.mean():.1f}% of the 128 mm registration region "
            "(centred on the liver mask, or the MR without one) "
            f"(at least {100 * MIN_OVERLAP:.0f}% needed): it does not overlap the MR. "
            "Check its position/orientation or give an initial alignment."
        )
    np.nan_to_num(us_in_grid, copy=False, nan=0.0)
    if fixed is None:
        fixed = prepare_fixed(mr, grid)
    pair = FusionPair(
        grid=grid.with_array(fov),
        fixed=fixed,
        moving=normalise(us_in_grid, mask=fov) * fov,
        fov=fov,
    )
    if mr_vessels is not None:
        pair.fixed_label = _label_in_grid(mr_vessels, grid, None, "MR vessel label")
    if us_vessels is not None:
        pair.moving_label = _label_in_grid(us_vessels, grid, initial, "US vessel label")
    return pair


def prepare_fixed(mr: Volume, grid: Volume) -> np.ndarray:
    """The MR resampled into the fusion grid and normalised: the network's fixed input."""
    return normalise(resample_to_grid(mr.with_array(mr.array.astype(np.float32)), grid).array)


def _label_in_grid(label: Volume, grid: Volume, transform, what: str) -> np.ndarray:
    if not np.any(label.array):
        raise InputError(f"{what} is empty: draw at least one vessel")
    binary = label.with_array((label.array > 0).astype(np.float32))
    # linear resampling of the binary map gives a partial-volume (soft) label
    return resample_to_grid(binary, grid, transform=transform).array
