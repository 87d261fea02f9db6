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
import math

import numpy as np
import SimpleITK as sitk

from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, require_contrast, require_finite, require_same_grid, resample_to_grid

GRID_SIZE = 128
GRID_SPACING_MM = 1.0
MIN_OVERLAP = 0.05  # share of the fusion grid that the US field of view must cover
REGION_MIN_SPACING_MM = 0.5  # finest registration region (a 64 mm cube at 128 voxels)
REGION_MARGIN_MM = 2.0  # added around the overlap on every side
REGION_MIN_OVERLAP_MM = 20.0  # the US must overlap the MR over at least this much along every axis


@dataclasses.dataclass
class FusionPair:
    grid: Volume  # geometry of the 128^3 grid (its array holds the US field-of-view mask)
    fixed: np.ndarray  # MR, float32 (128, 128, 128) in [0, 1]
    moving: np.ndarray  # US, float32 (128, 128, 128) in [0, 1], 0 outside its field of view
    fov: np.ndarray  # float32 1 where the US has data
    fixed_label: np.ndarray | None = None  # float32 vessel labels in the grid
    moving_label: np.ndarray | None = None


def fusion_grid(mr: Volume, liver: Volume | None = None, size: int = GRID_SIZE,
                centre_lps: np.ndarray | None = None) -> Volume:
    """The network's 128^3 1 mm grid in the MR's orientation, centred on the liver, else on
    `centre_lps` (the registration region's centre), else on the MR (LPS geometry)."""
    if liver is not None and np.any(liver.array):
        k, j, i = np.nonzero(liver.array)
        lo = np.array([i.min(), j.min(), k.min()])
        hi = np.array([i.max(), j.max(), k.max()])
        centre = liver.index_to_lps(((lo + hi) / 2)[None])[0]
    elif centre_lps is not None:
        centre = np.asarray(centre_lps, dtype=np.float64)
    else:
        centre = mr.centre_lps()
    spacing = np.full(3, GRID_SPACING_MM)
    origin = centre - mr.direction @ (spacing * (size - 1) / 2)
    return grid_like((size,) * 3, spacing, origin, mr.direction)


def support_box_lps(us: Volume, initial: sitk.Transform | None = None) -> np.ndarray:
    """LPS corners (8, 3) of the box around the US voxels that hold data (> 0: a scan converter
    leaves zeros outside the fan), in MR space: through the inverse of `initial` (MR LPS -> US LPS)
    when one is given."""
    data = us.array > 0
    if not data.any():
        raise InputError("the US volume holds no data (every voxel <= 0)")
    ranges = [np.flatnonzero(data.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.array([ranges[2][0], ranges[1][0], ranges[0][0]])  # (i, j, k)
    hi = np.array([ranges[2][-1], ranges[1][-1], ranges[0][-1]])
    corners = us.corners_lps(lo, hi)
    if initial is not None:
        inverse = initial.GetInverse()
        corners = np.array([inverse.TransformPoint(tuple(float(c) for c in p)) for p in corners])
    return corners


def registration_region(mr: Volume, us: Volume, liver: Volume | None = None, initial: sitk.Transform | None = None,
                        size: int = GRID_SIZE) -> Volume:
    """The grid the correction works on and the results are written on: a `size`^3 cube in the
    MR's orientation around the overlap of the US data with the MR (and with the liver mask when
    one is given), isotropic, its spacing the finest (>= 0.5 mm, in 0.1 mm steps) that covers the
    overlap: 0.5 mm for a 50 mm brain US, 1.2-1.3 mm for a 150 mm liver sweep. LPS geometry.
    Boxes are compared in the MR's axes (MR direction D: coordinates D^T p)."""
    to_axes = mr.direction.T
    us_axes = support_box_lps(us, initial) @ to_axes.T
    boxes = [(us_axes.min(0), us_axes.max(0))]
    mr_axes = mr.corners_lps() @ to_axes.T
    boxes.append((mr_axes.min(0), mr_axes.max(0)))
    if liver is not None and np.any(liver.array):
        k, j, i = np.nonzero(liver.array)
        liver_axes = liver.corners_lps((i.min(), j.min(), k.min()), (i.max(), j.max(), k.max())) @ to_axes.T
        boxes.append((liver_axes.min(0), liver_axes.max(0)))
    lo = np.max([b[0] for b in boxes], axis=0)
    hi = np.min([b[1] for b in boxes], axis=0)
    overlap = hi - lo
    if np.any(overlap < REGION_MIN_OVERLAP_MM):
        raise InputError(
            "the US data overlaps the MR" + (" and the liver mask" if len(boxes) > 2 else "")
            + f" over {np.round(np.clip(overlap, 0, None), 1).tolist()} mm along the MR's axes "
            f"(at least {REGION_MIN_OVERLAP_MM:.0f} mm along each needed): check its position/orientation "
            "or give an initial alignment")
    extent = float(overlap.max()) + 2 * REGION_MARGIN_MM
    spacing = max(REGION_MIN_SPACING_MM, math.ceil(extent / (size - 1) * 10 - 1e-9) / 10)
    centre = mr.direction @ ((lo + hi) / 2)
    origin = centre - mr.direction @ np.full(3, spacing * (size - 1) / 2)
    return grid_like((size,) * 3, np.full(3, spacing), origin, mr.direction)


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
    require_contrast(mr, "MR")
    require_contrast(us, "US volume", data_only=True)
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
