"""A real abdominal CT with organ labels, the base the lesion simulator builds multi-phase cases on.

`../shared/data/abdomen/example_ct.nii.gz` (TotalSegmentator's test CT, Apache-2.0) is a plain
(non-contrast) abdominal CT at 3 mm with a multi-label segmentation from a model. That label file
covers only 30 of the CT's 112 slices but carries the CT's full origin, so read as is it lies 82
slices too low (liver "HU" from -1000 to +570). `load_abdomen` puts a short label stack where the
labelled liver's HU are most uniform and says so, rather than trusting the header. The liver goes on
for a few centimetres beyond the stack's cut (seen on the CT), where nothing says which voxels are
liver: those slices, under the liver, get the class UNKNOWN, which training ignores and scoring
leaves out, rather than calling them background.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, read_volume

log = logging.getLogger("deepnav.liver.abdomen")

# TotalSegmentator (v2) class numbers of the organs whose enhancement differs between phases
LABELS = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "aorta": 52,
          "inferior_vena_cava": 63, "portal_vein": 64}
UNKNOWN = 255  # ours, not TotalSegmentator's: beyond a cut label stack, may be liver
UNKNOWN_DEPTH_MM = 60.0  # how far beyond the cut the liver may go on (the lowest tip, with room)
UNKNOWN_WIDTH_MM = 15.0  # in-plane margin around the liver's cut face


@dataclasses.dataclass
class Abdomen:
    ct: Volume  # HU, float32, LPS
    labels: Volume  # TotalSegmentator classes on the CT grid, uint8
    z_offset: int  # slices the label stack was moved by to fit the CT

    def mask(self, name: str) -> np.ndarray:
        return self.labels.array == LABELS[name]


def load_abdomen(ct_path: Path, labels_path: Path) -> Abdomen:
    ct = read_volume(ct_path, what="abdominal CT")
    labels = read_volume(labels_path, what="organ labels")
    ct = ct.with_array(ct.array.astype(np.float32))
    if labels.array.shape[1:] != ct.array.shape[1:] or labels.array.shape[0] > ct.array.shape[0]:
        raise InputError(f"labels {labels.array.shape} do not fit the CT {ct.array.shape}")
    liver = labels.array == LABELS["liver"]
    if not liver.any():
        raise InputError(f"{labels_path} has no liver (label {LABELS['liver']})")
    offset = 0
    if labels.array.shape[0] < ct.array.shape[0]:
        # a shorter stack: the position where the liver is most uniform (parenchyma, not air or bone)
        n = labels.array.shape[0]
        spread = [np.std(ct.array[o:o + n][liver]) for o in range(ct.array.shape[0] - n + 1)]
        offset = int(np.argmin(spread))
        log.info("organ labels cover %d of %d slices: placed at slice %d (liver HU spread %.0f)",
                 n, ct.array.shape[0], offset, spread[offset])
    full = np.zeros(ct.array.shape, np.uint8)
    full[offset:offset + labels.array.shape[0]] = labels.array
    _mark_unknown_liver(full, offset, offset + labels.array.shape[0], ct.spacing)
    return Abdomen(ct, ct.with_array(full), offset)


def _mark_unknown_liver(labels: np.ndarray, start: int, stop: int, spacing: np.ndarray) -> None:
    """In place: UNKNOWN on the slices within UNKNOWN_DEPTH_MM beyond a label stack that was cut
    (slices start..stop-1 of a longer CT) with liver on its cut face, under that face widened by
    UNKNOWN_WIDTH_MM: where the liver may go on (the liver narrows away from its widest part)."""
    depth = int(round(UNKNOWN_DEPTH_MM / spacing[2]))
    liver = labels == LABELS["liver"]
    for face, beyond in ((start, range(max(start - depth, 0), start)),
                         (stop - 1, range(stop, min(stop + depth, labels.shape[0])))):
        if not liver[face].any() or not len(beyond):
            continue  # the stack ends outside the liver, or at the CT's end: nothing unknown
        near = ndimage.distance_transform_edt(~liver[face], sampling=(spacing[1], spacing[0])) <= UNKNOWN_WIDTH_MM
        labels[beyond.start:beyond.stop][:, near] = UNKNOWN


def synthetic_abdomen(seed: int = 0, spacing_mm: float = 3.0, below_mm: float = 0.0) -> Abdomen:
    """A plain-CT-like abdomen from simple shapes (body, liver, spleen, kidneys, aorta, IVC, portal
    vein, spine) with the same organ classes: for tests, and where no real CT is at hand.
    `below_mm` extends it inferiorly (body, aorta, IVC and spine go on; a whole-abdomen series)."""
    rng = np.random.default_rng(seed)
    below = int(round(below_mm / spacing_mm))
    size = (110, 90, 60 + below)  # i (R-L), j (A-P), k (I-S) voxels
    origin = np.array([-size[0] / 2, -size[1] / 2, -below]) * spacing_mm
    grid = grid_like(size, np.full(3, spacing_mm), origin, np.eye(3))
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    p = np.stack([i, j, k], axis=-1) * spacing_mm + origin  # LPS mm: x to the left, y to the back, z up

    def ellipsoid(centre, radii):
        return np.sum(((p - np.asarray(centre)) / np.asarray(radii)) ** 2, axis=-1) <= 1.0

    body = (p[..., 0] / 150) ** 2 + (p[..., 1] / 110) ** 2 <= 1.0
    ct = np.where(body, -90.0, -1000.0)  # fat
    labels = np.zeros(ct.shape, np.uint8)
    jitter = rng.uniform(-8, 8, 3)
    organs = [  # (class, HU, shape)
        ("liver", 55.0, ellipsoid(np.array([-60, -10, 100]) + jitter, [75, 70, 65])),
        ("spleen", 45.0, ellipsoid([85, 40, 110], [30, 45, 45])),
        ("kidney_right", 30.0, ellipsoid([-60, 55, 55], [25, 25, 45])),
        ("kidney_left", 30.0, ellipsoid([60, 55, 60], [25, 25, 45])),
        ("aorta", 40.0, (p[..., 0] - 15) ** 2 + (p[..., 1] - 30) ** 2 <= 11**2),
        ("inferior_vena_cava", 40.0, (p[..., 0] + 20) ** 2 + (p[..., 1] - 25) ** 2 <= 12**2),
        ("portal_vein", 40.0, ellipsoid(np.array([-35, 5, 95]) + jitter, [40, 7, 7])),
    ]
    muscle = body & ((p[..., 0] / 135) ** 2 + (p[..., 1] / 95) ** 2 > 1.0)
    ct[muscle] = 50.0
    for name, hu, shape in organs:
        shape &= body
        ct[shape] = hu
        labels[shape] = LABELS[name]
    spine = (p[..., 0] ** 2 + (p[..., 1] - 65) ** 2) <= 18**2
    ct[spine] = 400.0
    ct += rng.normal(0, 8, ct.shape) * body
    return Abdomen(grid.with_array(ct.astype(np.float32)), grid.with_array(labels), 0)
