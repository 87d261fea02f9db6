"""Lesions as separate objects, and the figures a radiologist reports for each: volume (mL),
longest axial diameter (mm, edge to edge, as measured on an axial slice), centre, mean HU per phase.
Everything on the reference phase's grid, in physical units."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from deepnav.imaging import LPS_TO_RAS, Volume

MIN_LESION_MM3 = 15.0  # smaller components are noise (a 3 mm sphere is 14 mm3)


def label_lesions(mask: np.ndarray, grid: Volume) -> np.ndarray:
    """Connected lesions (26-connected) as ids 1..n, largest first; specks below MIN_LESION_MM3 dropped."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return np.zeros(mask.shape, np.uint16)
    sizes = np.bincount(components.ravel())[1:] * float(np.prod(grid.spacing))
    keep = [c + 1 for c in np.argsort(-sizes) if sizes[c] >= MIN_LESION_MM3]
    lookup = np.zeros(count + 1, np.uint16)
    lookup[keep] = np.arange(1, len(keep) + 1)
    return lookup[components]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (the liver is one organ: detached blobs the
    network calls liver, e.g. on the spleen, go, and the lesions in them with them)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count <= 1:
        return mask.astype(bool)
    return components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))


def _longest_axial_diameter(points_lps: np.ndarray, half_pixel: np.ndarray) -> float:
    """Largest edge-to-edge distance within one axial (constant S) slice of the lesion."""
    best = 0.0
    slices = np.round(points_lps[:, 2], 1)
    for z in np.unique(slices):
        xy = points_lps[slices == z, :2]
        corners = (xy[:, None, :] + half_pixel[None, :, :]).reshape(-1, 2)  # each pixel's four corners
        try:
            hull = corners[ConvexHull(corners).vertices]
        except QhullError:  # a line of pixels
            hull = corners
        d = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def lesion_statistics(lesions: np.ndarray, grid: Volume, phases_hu: dict[str, np.ndarray]) -> list[dict]:
    """One row per lesion id. `phases_hu`: each phase registered onto `grid`, HU."""
    rows = []
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    axial = abs(grid.direction[2, 2]) > 0.99  # slices are axial: diameters on the grid's own slices
    step = grid.direction[:2, :2] @ np.diag(grid.spacing[:2]) / 2
    half_pixel = np.array([s1 * step[:, 0] + s2 * step[:, 1] for s1 in (-1, 1) for s2 in (-1, 1)])
    for n in range(1, int(lesions.max()) + 1):
        k, j, i = np.nonzero(lesions == n)
        if len(i) == 0:
            continue
        points = grid.index_to_lps(np.stack([i, j, k], axis=1).astype(np.float64))
        if not axial:  # an oblique grid: group points by their S coordinate at slice thickness
            points[:, 2] = np.round(points[:, 2] / grid.spacing[2]) * grid.spacing[2]
        centre = points.mean(axis=0)
        rows.append({
            "lesion": n,
            "volume_ml": round(len(i) * voxel_ml, 3),
            "longest_axial_diameter_mm": round(_longest_axial_diameter(points, half_pixel), 1),
            "centre_lps_mm": [round(float(c), 1) for c in centre],
            "centre_ras_mm": [round(float(c), 1) for c in (LPS_TO_RAS[:3, :3] @ centre)],
            "mean_hu": {phase: round(float(values[k, j, i].mean()), 1) for phase, values in phases_hu.items()},
        })
    return rows


def table_rows(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """The statistics as flat rows (columns, rows) for a CSV file or a Slicer table."""
    phases = [p for p in ("plain", "arterial", "venous", "delayed") if any(p in r["mean_hu"] for r in rows)]
    columns = ["lesion", "volume_ml", "longest_axial_diameter_mm", "centre_r_mm", "centre_a_mm", "centre_s_mm",
               *[f"mean_hu_{p}" for p in phases]]
    flat = [{"lesion": r["lesion"], "volume_ml": r["volume_ml"], "longest_axial_diameter_mm": r["longest_axial_diameter_mm"],
             **dict(zip(("centre_r_mm", "centre_a_mm", "centre_s_mm"), r["centre_ras_mm"], strict=True)),
             **{f"mean_hu_{p}": r["mean_hu"].get(p) for p in phases}} for r in rows]
    return columns, flat


def write_statistics(rows: list[dict], out_dir: Path, extra: dict | None = None) -> dict[str, Path]:
    """lesions.json (with `extra`: reference phase, registration, timings...) and lesions.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "lesions.json", "csv": out_dir / "lesions.csv"}
    paths["json"].write_text(json.dumps({"lesion_count": len(rows), "lesions": rows, **(extra or {})}, indent=2))
    columns, flat = table_rows(rows)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
    return paths
