"""Multi-phase liver CT cases with inserted lesions and exact labels, for training and evaluation.

No public multi-phase CT with lesion labels is available offline, so cases are built from a real
plain abdominal CT (`abdomen.py`) in four steps, all seeded:
1. anatomy variation: the CT and its organ labels are scaled (0.9-1.1 per axis) and rotated (up to
   5 degrees) about the liver and resampled (cubic / nearest) onto the study's grid (`FIELDS`);
2. phases: each contrast phase adds its organ enhancement to the plain HU (aorta bright in the
   arterial phase, portal vein and liver in the portal venous phase, ...) and its own CT noise.
   Only labelled organs enhance: beyond the real CT's 30 labelled slices the vessels and kidneys
   stay plain (the liver there is enhanced from its HU range, see `_unknown_liver_like`);
3. lesions (1-4, 5-60 mm, irregular ellipsoids, textured) of four kinds that enhance differently:
   hypervascular (HCC-like: bright arterial, washout venous/delayed), cyst (water, no enhancement),
   haemangioma (peripheral nodular filling, centripetal over the phases), hypovascular metastasis
   (dark, arterial rim);
4. misalignment: every phase but the reference is moved by a known small rigid transform
   (breathing between acquisitions), and resampled with cubic splines.
Label maps (one id per lesion, liver) are exact, in the reference phase's geometry, except where the
organ labels say the truth is unknown (beyond a cut label stack: `Case.unknown`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from deepnav.imaging import Volume, grid_like, matrix_to_affine, rotation_matrix
from LiverLesionSegLib.abdomen import LABELS, UNKNOWN, Abdomen
from LiverLesionSegLib.phase_registration import rigid_matrix

PHASES = ("plain", "arterial", "venous", "delayed")

# HU added to the plain CT inside each organ, per phase (typical multi-phase liver protocol values)
ENHANCEMENT = {
    "liver": {"arterial": 15, "venous": 55, "delayed": 40},
    "aorta": {"arterial": 260, "venous": 110, "delayed": 70},
    "portal_vein": {"arterial": 60, "venous": 150, "delayed": 90},
    "inferior_vena_cava": {"arterial": 30, "venous": 110, "delayed": 80},
    "kidney_right": {"arterial": 140, "venous": 150, "delayed": 110},
    "kidney_left": {"arterial": 140, "venous": 150, "delayed": 110},
    "spleen": {"arterial": 70, "venous": 70, "delayed": 50},
}
KINDS = ("hypervascular", "cyst", "haemangioma", "metastasis")
BLOOD_POOL_HU = {"plain": 45, "arterial": 200, "venous": 160, "delayed": 130}
HAEMANGIOMA_FILL = {"plain": 0.0, "arterial": 0.25, "venous": 0.65, "delayed": 0.95}
NOISE_HU = 10.0


@dataclasses.dataclass
class Lesion:
    label: int
    kind: str
    centre_lps: np.ndarray
    diameter_mm: float  # of the ellipsoid before its boundary is roughened


@dataclasses.dataclass
class Case:
    phases: dict[str, Volume]  # name -> int16 HU; the reference on `grid`, the others moved
    reference: str
    lesions: Volume  # uint8, 0 background, one id per lesion, on the reference grid
    liver: Volume  # uint8 liver (lesions included), reference grid
    truth: dict[str, np.ndarray]  # phase -> 4x4 LPS, reference point -> where it is in that phase
    lesion_list: list[Lesion]
    unknown: Volume | None = None  # uint8, 1 where the truth is unknown (may be liver: abdomen.UNKNOWN)


FIELDS = ("liver", "slab", "ct")  # what a simulated study covers: see `_case_grid`
LIVER_MARGIN_MM = 25.0


def _case_grid(abdomen: Abdomen, spacing: tuple[float, float, float], field: str) -> Volume:
    """The study's grid (LPS, axial) at `spacing` over `field`: "liver", the liver's bounding box
    plus LIVER_MARGIN_MM; "slab", the abdominal CT's whole in-plane field of view over the slices
    that carry organ labels (the liver region of a study); "ct", the whole CT (what a full-length
    series shows: without it, a network never sees the pelvis and may call it liver). Boxes are
    taken around all eight corners of an index box, so an oblique CT is covered too."""
    if field not in FIELDS:
        raise ValueError(f"unknown field {field!r}; known: {FIELDS}")
    n = np.array(abdomen.ct.size_ijk) - 1
    if field == "ct":
        corners = abdomen.ct.corners_lps()
    elif field == "slab":
        k = np.nonzero(((abdomen.labels.array > 0) & (abdomen.labels.array != UNKNOWN)).any(axis=(1, 2)))[0]
        corners = abdomen.ct.corners_lps((0, 0, k.min()), (n[0], n[1], k.max()))
    else:
        k, j, i = np.nonzero(abdomen.mask("liver"))
        corners = abdomen.ct.corners_lps((i.min(), j.min(), k.min()), (i.max(), j.max(), k.max()))
    pad = LIVER_MARGIN_MM if field == "liver" else 0.0
    lo, hi = corners.min(axis=0) - pad, corners.max(axis=0) + pad
    size = np.ceil((hi - lo) / np.array(spacing)).astype(int) + 1
    return grid_like(tuple(size), spacing, lo, np.eye(3))


def _vary_anatomy(abdomen: Abdomen, grid: Volume, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The CT (cubic) and organ labels (nearest) on `grid`, scaled and rotated about the liver."""
    k, j, i = np.nonzero(abdomen.mask("liver"))
    centre = abdomen.ct.index_to_lps(np.array([[i.mean(), j.mean(), k.mean()]]))[0]
    transform = sitk.AffineTransform(3)
    transform.SetCenter(centre.tolist())
    matrix = rotation_matrix(np.deg2rad(rng.uniform(-5, 5, 3))) @ np.diag(rng.uniform(0.9, 1.1, 3))
    transform.SetMatrix(matrix.ravel().tolist())
    reference = grid.to_sitk()
    ct = sitk.Resample(abdomen.ct.to_sitk(), reference, transform, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    labels = sitk.Resample(abdomen.labels.to_sitk(), reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(labels)


def _smooth_noise(shape, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Correlated Gaussian noise of unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _place_lesions(liver: np.ndarray, grid: Volume, rng: np.random.Generator, count: int, kinds: tuple[str, ...]
                   ) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Lesion ids (uint8) and a depth map (0 at a lesion's boundary, 1 at its centre), inside the liver."""
    spacing = grid.spacing[::-1]  # k, j, i
    inside = ndimage.distance_transform_edt(liver, sampling=spacing)
    ids = np.zeros(liver.shape, np.uint8)
    depth = np.zeros(liver.shape, np.float32)
    lesions: list[Lesion] = []
    for _ in range(count * 10):
        if len(lesions) == count:
            break
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(60.0))))
        radius = min(diameter / 2, 0.8 * float(inside.max()))
        candidates = np.argwhere((inside >= 0.6 * radius) & (ids == 0))
        if len(candidates) == 0:
            continue
        centre = candidates[rng.integers(len(candidates))]
        radii = radius * rng.uniform(0.75, 1.25, 3)
        axes = rotation_matrix(rng.uniform(0, np.pi, 3))
        half = np.ceil(1.4 * radii.max() / spacing).astype(int) + 2
        lo, hi = np.maximum(centre - half, 0), np.minimum(centre + half + 1, liver.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        offsets = np.stack(np.meshgrid(*(np.arange(a, b) - c for a, b, c in zip(lo, hi, centre, strict=True)),
                                       indexing="ij"), axis=-1) * spacing
        local = offsets @ axes  # into the ellipsoid's axes
        rough = 0.12 * _smooth_noise(local.shape[:3], rng, sigma=max(1.0, radius / spacing.mean() / 3))
        d = 1.0 - np.linalg.norm(local / radii, axis=-1) + rough
        mask = (d > 0) & liver[box] & (ids[box] == 0)
        if mask.sum() < 4 or np.any(ids[box][d > -0.2] > 0):  # keep lesions apart
            continue
        label = len(lesions) + 1
        ids[box][mask] = label
        depth[box][mask] = np.clip(d[mask] / max(float(d.max()), 1e-6), 0, 1)
        centre_lps = grid.index_to_lps(centre[::-1][None].astype(float))[0]
        lesions.append(Lesion(label, kinds[int(rng.integers(len(kinds)))], centre_lps, 2 * radius))
    return ids, depth, lesions


def _lesion_hu(kind: str, phase: str, liver_hu: np.ndarray, depth: np.ndarray, texture: np.ndarray) -> np.ndarray:
    """HU inside one lesion in one phase (`liver_hu`: the enhanced parenchyma it replaces)."""
    if kind == "cyst":
        return 10.0 + 4.0 * texture
    if kind == "hypervascular":
        offset = {"plain": -10, "arterial": 50, "venous": -20, "delayed": -25}[phase]
        return liver_hu + offset + 12.0 * texture
    if kind == "haemangioma":
        filled = (1.0 - depth) + 0.15 * texture < HAEMANGIOMA_FILL[phase]  # from the rim inwards
        return np.where(filled, BLOOD_POOL_HU[phase], 45.0) + 6.0 * texture
    offset = {"plain": -20, "arterial": -30, "venous": -45, "delayed": -35}[phase]  # metastasis
    rim = 40.0 if phase == "arterial" else 0.0
    return liver_hu + offset + np.where(depth < 0.1, rim, 0.0) + 10.0 * texture


def _unknown_liver_like(plain: np.ndarray, organs: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """The voxels of the UNKNOWN region (maybe liver, unlabelled) whose plain HU is in the labelled
    liver's 5-95 percentile range: they get the liver's enhancement. Left plain, the liver beyond a
    cut label stack would look like a large hypodense lesion in every contrast phase, and since
    training ignores that region, the network learnt that darker liver may be lesion (lesion Dice
    0.82 -> about 0.25 on the liver-region studies after training on full-length ones)."""
    unknown = organs == UNKNOWN
    if not unknown.any() or not liver.any():
        return unknown
    low, high = np.percentile(plain[liver], [5, 95])
    return unknown & (plain >= low) & (plain <= high)


def random_rigid(rng: np.random.Generator, centre: np.ndarray, max_deg: float = 3.0, max_mm: float = 6.0) -> np.ndarray:
    """4x4 LPS rigid transform about `centre`, in the registration's parameters."""
    degrees = rng.uniform(-max_deg, max_deg, 3)
    return rigid_matrix(np.concatenate([degrees, rng.uniform(-max_mm, max_mm, 3)]), centre)


def simulate_case(abdomen: Abdomen, seed: int, phases: tuple[str, ...] = ("arterial", "venous"),
                  reference: str | None = None, spacing=(1.5, 1.5, 1.5), lesions: tuple[int, int] = (1, 4),
                  field: str = "liver", motion: tuple[float, float] = (3.0, 6.0),
                  kinds: tuple[str, ...] = KINDS, grid: Volume | None = None) -> Case:
    """One simulated study. `reference` defaults to the first phase given (the method's example
    registers venous to arterial). `motion`: the largest misalignment of the other phases
    (degrees per axis, mm per axis). `kinds`: the lesion kinds drawn from. `grid`: the study's
    grid (LPS) when given, e.g. a full 512x512 scanner field of view; by default `field` (one of
    FIELDS) at `spacing`."""
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; known: {PHASES}")
    reference = reference or phases[0]
    rng = np.random.default_rng(seed)
    grid = grid if grid is not None else _case_grid(abdomen, spacing, field)
    plain, organs = _vary_anatomy(abdomen, grid, rng)
    liver = organs == LABELS["liver"]
    ids, depth, lesion_list = _place_lesions(liver, grid, rng, int(rng.integers(lesions[0], lesions[1] + 1)), kinds)
    texture = _smooth_noise(plain.shape, rng, sigma=1.0)
    regions = {name: organs == LABELS[name] for name in ENHANCEMENT}
    regions["liver"] = liver | _unknown_liver_like(plain, organs, liver)
    soft = {name: ndimage.gaussian_filter(region.astype(np.float32), 0.7) for name, region in regions.items()}
    centre = grid.centre_lps()

    out, truth = {}, {}
    for phase in phases:
        image = plain.copy()
        for name, by_phase in ENHANCEMENT.items():
            image += by_phase.get(phase, 0.0) * soft[name]
        for lesion in lesion_list:
            inside = ids == lesion.label
            image[inside] = _lesion_hu(lesion.kind, phase, image[inside], depth[inside], texture[inside])
        image += NOISE_HU * _smooth_noise(image.shape, rng, sigma=0.6)
        volume = grid.with_array(image)
        matrix = np.eye(4) if phase == reference else random_rigid(rng, centre, *motion)
        if phase != reference:  # the phase as acquired: its point T(x) shows what the reference shows at x
            inverse = matrix_to_affine(np.linalg.inv(matrix))
            moved = sitk.Resample(volume.to_sitk(), volume.to_sitk(), inverse, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
            volume = Volume.from_sitk(moved)
        out[phase] = volume.with_array(np.clip(np.round(volume.array), -1024, 3071).astype(np.int16))
        truth[phase] = matrix
    liver_all = (liver | (ids > 0)).astype(np.uint8)
    unknown = (organs == UNKNOWN).astype(np.uint8)
    return Case(out, reference, grid.with_array(ids), grid.with_array(liver_all), truth, lesion_list,
                grid.with_array(unknown))
