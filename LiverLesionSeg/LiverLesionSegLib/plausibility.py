"""Can a result be believed? A verdict computed from what was found, so that nonsense (a "liver"
running down into the pelvis, "lesions" in bone or fat) is said to be nonsense instead of looking
like any other result.

Each check holds a measured figure against the range an adult liver study falls in; a figure
outside it is a reason, and a result with any reason is not reliable (`lesions.json` says
`"reliable": false` with the reasons, `deepnav liver segment` exits with EXIT_UNRELIABLE, the
Slicer module shows a warning). The ranges are wide on purpose: a reason asks a person to look
at the result, it does not prove it wrong (a huge liver, a fatty liver, a calcified lesion or a
mislabelled phase can all raise one).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the command line imports EXIT_UNRELIABLE for its help: no SimpleITK at start-up
    from deepnav.imaging import Volume

# `deepnav liver segment`'s exit status for a result written but failing these checks (2 is bad
# input, nothing written; 130 cancelled)
EXIT_UNRELIABLE = 3

# Adult liver volume: about 1.0-2.0 L, rarely over 3 L even with hepatomegaly. The lower bound
# is only checked when the series holds the whole liver (a series that cuts it sees a part).
LIVER_VOLUME_ML = (700.0, 3000.0)
# Superior-inferior extent: 12-17 cm typically; a Riedel's lobe can reach 25 cm.
LIVER_MAX_EXTENT_MM = 250.0
# Mean HU of the parenchyma (lesions left out) per phase: unenhanced 40-65 (down to ~0 when fatty),
# a little more in the arterial phase, 90-130 in the portal venous phase, somewhat less delayed.
# A portal venous or delayed liver below its range is most often an unenhanced series given the
# wrong phase name.
LIVER_HU = {"plain": (0.0, 90.0), "arterial": (40.0, 150.0), "venous": (70.0, 180.0), "delayed": (60.0, 160.0)}
# A liver holds vessels (bright with contrast) and may hold some fat, but not a share of fat
# tissue (< -30 HU) or bone (> 300 HU): that is the body wall, the spine or the pelvis.
FAT_HU, BONE_HU = -30.0, 300.0
LIVER_MAX_FAT_OR_BONE = 0.05
# Mean HU of one lesion per phase: from water (cysts, necrosis, ~0-20) to the blood pool it
# enhances up to (haemangioma, hypervascular tumours); below is fat, above unenhanced soft tissue
# in the plain phase is calcification or bone.
LESION_HU = {"plain": (-20.0, 90.0), "arterial": (-20.0, 300.0), "venous": (-20.0, 250.0), "delayed": (-20.0, 220.0)}
# Many lesions or a liver mostly replaced happen (metastases), but are where a network that lost
# the liver ends up too.
MAX_LESIONS = 15
MAX_BURDEN = 0.5  # lesion volume / liver volume (lesions included)
LESIONS_LISTED = 5  # lesion reasons spelt out one by one; the rest are counted


@dataclasses.dataclass
class Plausibility:
    reasons: list[str]  # why the result cannot be trusted as it is; empty: reliable
    figures: dict  # what the checks measured (mL, mm, HU, %)

    @property
    def reliable(self) -> bool:
        return not self.reasons

    def to_json(self) -> dict:
        return {"reliable": self.reliable, "reasons": self.reasons, "plausibility": self.figures}

    @classmethod
    def from_json(cls, record: dict) -> Plausibility:
        return cls(list(record["reasons"]), dict(record["plausibility"]))


def superior_inferior(grid: Volume) -> int:
    """The array axis (k, j, i order) of `grid` nearest to the patient's superior-inferior axis."""
    return 2 - int(np.argmax(np.abs(grid.direction[2])))


def assess(liver: np.ndarray, lesions: np.ndarray, grid: Volume, phases_hu: dict[str, np.ndarray],
           statistics: list[dict]) -> Plausibility:
    """The verdict on one result. `liver`: the liver mask (lesions included), `lesions`: lesion
    ids, both on `grid` (the reference phase's); `phases_hu`: every phase registered onto `grid`
    (HU); `statistics`: the lesion rows (`statistics.lesion_statistics`)."""
    reasons: list[str] = []
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    liver = liver > 0
    volume_ml = float(liver.sum()) * voxel_ml
    figures: dict = {"liver_volume_ml": round(volume_ml, 1)}
    if not liver.any():
        reasons.append("no liver was found")
        return Plausibility(reasons, figures)

    axis = superior_inferior(grid)
    along = np.nonzero(liver.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    thickness = abs(grid.spacing[2 - axis] * grid.direction[2, 2 - axis])  # one slice, along S
    extent = float(_extent_mm(liver, grid)) + thickness
    whole = along[0] > 0 and along[-1] < liver.shape[axis] - 1  # the series does not cut the liver
    figures.update({"liver_extent_mm": round(extent, 1), "liver_whole_in_series": bool(whole)})
    if volume_ml > LIVER_VOLUME_ML[1] or (whole and volume_ml < LIVER_VOLUME_ML[0]):
        reasons.append(f"the liver found is {volume_ml:.0f} mL; an adult liver is "
                       f"{LIVER_VOLUME_ML[0]:.0f}-{LIVER_VOLUME_ML[1]:.0f} mL")
    if extent > LIVER_MAX_EXTENT_MM:
        reasons.append(f"the liver found spans {extent:.0f} mm from top to bottom (slices {along[0]}-{along[-1]} of "
                       f"{liver.shape[axis]}); a liver spans at most {LIVER_MAX_EXTENT_MM:.0f} mm")

    parenchyma = liver & (lesions == 0)
    figures["liver_mean_hu"], figures["liver_fat_or_bone_percent"] = {}, {}
    for phase, hu in phases_hu.items():
        values = hu[parenchyma] if parenchyma.any() else hu[liver]
        mean = float(values.mean())
        share = float(np.mean((values < FAT_HU) | (values > BONE_HU)))
        figures["liver_mean_hu"][phase] = round(mean, 1)
        figures["liver_fat_or_bone_percent"][phase] = round(100 * share, 1)
        low, high = LIVER_HU[phase]
        if not low <= mean <= high:
            hint = " (an unenhanced series named a contrast phase?)" if mean < low and phase != "plain" else ""
            reasons.append(f"the liver's mean in the {phase} phase is {mean:.0f} HU; a {phase} liver is "
                           f"{low:.0f}-{high:.0f} HU{hint}")
        if share > LIVER_MAX_FAT_OR_BONE:
            reasons.append(f"{100 * share:.1f}% of the liver found in the {phase} phase is fat (< {FAT_HU:.0f} HU) "
                           f"or bone (> {BONE_HU:.0f} HU): it is not all liver")

    lesion_reasons = []
    for row in statistics:
        for phase, mean in row["mean_hu"].items():
            low, high = LESION_HU[phase]
            if not low <= mean <= high:
                tissue = "fat" if mean < low else "bone or calcium" if phase == "plain" else "bone, calcium or a vessel"
                lesion_reasons.append(f"lesion {row['lesion']} ({row['volume_ml']:.2f} mL) has a mean of {mean:.0f} HU "
                                      f"in the {phase} phase, outside {low:.0f}..{high:.0f} HU ({tissue}?)")
    reasons += lesion_reasons[:LESIONS_LISTED]
    if len(lesion_reasons) > LESIONS_LISTED:
        reasons.append(f"{len(lesion_reasons) - LESIONS_LISTED} more lesion HU outside their phase's range")

    burden = sum(r["volume_ml"] for r in statistics) / volume_ml
    figures.update({"lesion_count": len(statistics), "lesion_burden_percent": round(100 * burden, 1)})
    if len(statistics) > MAX_LESIONS:
        reasons.append(f"{len(statistics)} lesions found; more than {MAX_LESIONS} needs checking")
    if burden > MAX_BURDEN:
        reasons.append(f"lesions are {100 * burden:.0f}% of the liver's volume; more than {100 * MAX_BURDEN:.0f}% "
                       "needs checking")
    return Plausibility(reasons, figures)


def _extent_mm(mask: np.ndarray, grid: Volume) -> float:
    """The spread of the mask's voxel centres along LPS z (superior-inferior), mm."""
    k, j, i = np.nonzero(mask)
    step = grid.direction[2] * grid.spacing  # z change per step of i, j, k (exact on an oblique grid too)
    z = i * step[0] + j * step[1] + k * step[2]  # the origin's z left out: it cancels in the spread
    return float(z.max() - z.min())


def slab_warning(slab: tuple[int, int, int] | None) -> str | None:
    """The localiser's cut, judged: a slab that is the whole series means it did not find a liver
    of a liver's size there (everything it kept may be called liver)."""
    if slab is None:
        return None
    first, stop, of = slab
    if first == 0 and stop == of:
        return (f"the liver localiser kept the whole series ({of} slices of the working grid): it found no "
                "liver-sized region, so the whole abdomen was searched")
    return None
