"""One study in, lesions out: read the phases, register them to the reference phase, resample and
normalise, segment with a sliding window, bring the result back to the reference phase's grid,
keep the liver's largest connected component, separate and measure the lesions inside it, and
judge whether the result is plausible (`plausibility.py`). The command line, the evaluation and the
Slicer module all call `segment_study`."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from deepnav.errors import InputError
from deepnav.imaging import Volume, read_volume, require_same_grid, write_volume
from deepnav.progress import CancelToken, ProgressCallback, silent
from LiverLesionSegLib.inference import predict_logits
from LiverLesionSegLib.model_io import LoadedModel
from LiverLesionSegLib.phase_registration import check_ct_hu, register_phase, register_phase_sitk
from LiverLesionSegLib.plausibility import Plausibility, assess, slab_warning, superior_inferior
from LiverLesionSegLib.preprocess import reference_phase, resample, working_grid
from LiverLesionSegLib.simulator import PHASES
from LiverLesionSegLib.statistics import label_lesions, largest_component, lesion_statistics, write_statistics

REGISTRATION = {"pso-powell": register_phase, "sitk": register_phase_sitk}
# A series taller than this along the superior-inferior axis is first cut to the liver's slab: the
# lesion network learnt on 90 mm slabs and, on a whole abdomen, calls bowel or bladder liver
# (MODEL_CARD.md); a liver is rarely over 20 cm tall.
LOCALISE_ABOVE_MM = 220.0
SLAB_MARGIN_MM = 20.0
# ...and within the slab, the lesion network's liver and lesions are kept only this close to the
# localiser's liver: given a whole abdomen in one unenhanced phase, it also called the abdominal
# wall and back muscles beside the liver liver (a real plain CT: 1.6-1.9 L, Dice 0.71-0.78)
NEAR_LIVER_MM = 8.0


@dataclasses.dataclass
class StudyResult:
    reference: str
    lesions: Volume  # uint16 ids (one per lesion, largest first) on the reference phase's grid
    liver: Volume  # uint8 liver (lesions included), reference grid
    statistics: list[dict]
    registration: dict[str, dict]  # phase -> matrix, mutual information, seconds, method
    timings_s: dict[str, float]
    warnings: list[str]
    plausibility: Plausibility
    # where the lesion network ran, on the working grid: (first, last + 1) slice index along its
    # superior-inferior axis and the grid's slice count, or None for the whole grid
    slab: tuple[int, int, int] | None = None

    def write(self, out_dir: Path) -> dict[str, Path]:
        paths = {"lesions": write_volume(self.lesions, out_dir / "lesions.nii.gz"),
                 "liver": write_volume(self.liver, out_dir / "liver.nii.gz")}
        files = write_statistics(self.statistics, out_dir, {
            "reference_phase": self.reference, "registration": self.registration, "timings_s": self.timings_s,
            "warnings": self.warnings, "message": self.message(), **self.plausibility.to_json(),
            "liver_slab": None if self.slab is None else dict(zip(("first", "stop", "of"), self.slab, strict=True))})
        return {**paths, "statistics": files["json"], "table": files["csv"]}

    @classmethod
    def read(cls, out_dir: Path) -> StudyResult:
        """A result as `write` left it (how a caller gets it back from `deepnav liver segment
        --out` run as a child process)."""
        import json

        out_dir = Path(out_dir)
        record = json.loads((out_dir / "lesions.json").read_text())
        slab = record.get("liver_slab")
        return cls(record["reference_phase"], read_volume(out_dir / "lesions.nii.gz", what="lesion labels"),
                   read_volume(out_dir / "liver.nii.gz", what="liver mask"), record["lesions"], record["registration"],
                   record["timings_s"], record["warnings"], Plausibility.from_json(record),
                   None if slab is None else (slab["first"], slab["stop"], slab["of"]))

    def message(self) -> str:
        found = "no lesion found"
        if self.statistics:
            found = f"{len(self.statistics)} lesion(s), {sum(r['volume_ml'] for r in self.statistics):.1f} mL in total"
        if self.plausibility.reliable:
            return found
        return f"NOT RELIABLE ({len(self.plausibility.reasons)} implausible finding(s)): {found}"


def read_phase(path: Path, what: str, series_uid: str | None = None) -> Volume:
    """A phase from an image file or a DICOM folder; a folder with several series needs `series_uid`."""
    path = Path(path)
    if not path.is_dir():
        volume = read_volume(path, what=what)
        return volume.with_array(volume.array.astype(np.float32))
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{path} holds no DICOM series ({what})")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(f"{uid} ({len(reader.GetGDCMSeriesFileNames(str(path), uid))} files)" for uid in series)
        raise InputError(f"{path} holds {len(series)} DICOM series; say which is the {what}: {listing}")
    uid = series_uid or series[0]
    if uid not in series:
        raise InputError(f"series {uid} is not in {path}")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), uid))
    volume = Volume.from_sitk(reader.Execute())
    return volume.with_array(volume.array.astype(np.float32))


def segment_study(model: LoadedModel, phases: dict[str, Volume], *, reference: str | None = None,
                  registration: str = "pso-powell", liver: Volume | None = None,
                  progress: ProgressCallback = silent, cancel: CancelToken | None = None) -> StudyResult:
    """Segment the lesions of a study given as {phase name: volume} (any grids and orientations)."""
    unknown = set(phases) - set(PHASES)
    if unknown or not phases:
        raise InputError(f"phases must be named among {PHASES}; got {sorted(phases)}")
    timings: dict[str, float] = {}
    warnings: list[str] = []
    for name, volume in phases.items():
        check_ct_hu(volume, f"the {name} phase")
    reference = reference or reference_phase(phases)
    if reference not in phases:
        raise InputError(f"the reference phase {reference!r} is not among the phases given")
    if len(phases) == 1:
        warnings.append(f"single phase ({reference}): the network takes 1-4 phases but is less accurate on one "
                        "(simulated studies: the venous phase alone halves the lesion Dice); lesions that are only "
                        "distinct in another phase may be missed")
    ref = phases[reference]
    if liver is not None:
        require_same_grid(ref, liver, "liver mask")

    t0 = time.perf_counter()
    matrices, report = {reference: np.eye(4)}, {}
    others = [p for p in phases if p != reference]
    for n, name in enumerate(others):
        progress(0.3 * n / max(len(others), 1), f"registering the {name} phase to the {reference} phase")
        if cancel is not None:
            cancel.raise_if_cancelled()
        result = REGISTRATION[registration](ref, phases[name])
        if result.mi_after < 0.05:
            raise InputError(f"the {name} phase does not overlap the {reference} phase (mutual information "
                             f"{result.mi_after:.3f} after registration)")
        matrices[name] = result.matrix_lps
        report[name] = {"method": result.method, "matrix_lps": result.matrix_lps.round(6).tolist(),
                        "mutual_information_before": round(result.mi_before, 4),
                        "mutual_information_after": round(result.mi_after, 4), "seconds": round(result.seconds, 2)}
    timings["registration"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grid = working_grid(ref)
    hu = {name: resample(volume, grid, matrices[name]) for name, volume in phases.items()}
    x = model.normalisation.apply(hu)
    timings["preprocess"] = time.perf_counter() - t0

    slab, near, box = None, None, (slice(None),) * 4  # box: the part of x (channels, k, j, i) the network sees
    if model.localiser is not None:
        t0 = time.perf_counter()
        located = localise_liver(model.localiser, hu, grid, cancel=cancel,
                                 progress=lambda f, m: progress(0.3 + 0.2 * f, m))
        timings["localiser"] = time.perf_counter() - t0
        if located is not None:
            slab, near = located
            axis, first, stop = slab
            box = (slice(None),) + tuple(slice(first, stop) if a == axis else slice(None) for a in range(3))
    t0 = time.perf_counter()
    logits = predict_logits(model, x[box], model.device, cancel=cancel,
                            progress=lambda f, m: progress(0.5 + 0.4 * f, m))
    probabilities = np.zeros((logits.shape[0],) + x.shape[1:], np.float32)
    probabilities[0] = 1.0  # outside the liver's slab: background
    probabilities[box] = torch.softmax(logits, dim=0).numpy()
    if near is not None:
        probabilities[1:] *= near  # liver and lesion only near the localiser's liver
    timings["network"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress(0.9, "lesions on the reference grid")
    # back to the reference grid as probabilities (linear), not as labels: no staircase from 1.5 mm
    p_foreground = _to_reference(probabilities[1] + probabilities[2], grid, ref)
    p_lesion = _to_reference(probabilities[2], grid, ref)
    foreground = p_foreground > 0.5
    lesion = foreground & (p_lesion > 0.5 * p_foreground)  # lesion more likely than liver
    del p_foreground, p_lesion
    liver_mask = largest_component(foreground) if liver is None else (liver.array > 0)
    ids = label_lesions(lesion & liver_mask, ref)
    registered = {name: (volume.array if name == reference else resample(volume, ref, matrices[name]))
                  for name, volume in phases.items()}
    rows = lesion_statistics(ids, ref, registered)
    liver_all = liver_mask | (ids > 0)
    timings["lesions"] = time.perf_counter() - t0
    slab_slices = None if slab is None else (slab[1], slab[2], x.shape[1 + slab[0]])
    warnings += [w for w in [slab_warning(slab_slices)] if w]
    verdict = assess(liver_all, ids, ref, registered, rows)
    progress(1.0, f"{len(rows)} lesion(s)" + ("" if verdict.reliable else ", NOT RELIABLE"))
    return StudyResult(reference, ref.with_array(ids), ref.with_array(liver_all.astype(np.uint8)), rows, report,
                       {k: round(v, 3) for k, v in timings.items()}, warnings, verdict, slab_slices)


def localise_liver(localiser: LoadedModel, hu: dict[str, np.ndarray], grid: Volume, *,
                   cancel: CancelToken | None = None, progress: ProgressCallback = silent
                   ) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Where the liver is on the working grid, as the `localiser` finds it (its largest liver
    component): the slab to segment, (array axis in (k, j, i) order, first slice, stop slice),
    the liver's slices along the grid axis nearest to superior-inferior plus SLAB_MARGIN_MM; and
    the voxels within NEAR_LIVER_MM of that liver (bool, the grid's shape). None (the whole grid,
    no bound) for a series no taller than LOCALISE_ABOVE_MM, or where no liver is found. `hu`:
    the phases on `grid` (HU)."""
    axis = superior_inferior(grid)
    ijk_axis = 2 - axis  # the same axis in the grid's (i, j, k) order
    length = grid.array.shape[axis]
    if length * grid.spacing[ijk_axis] <= LOCALISE_ABOVE_MM:
        return None
    progress(0.0, "finding the liver's slab")
    logits = predict_logits(localiser, localiser.normalisation.apply(hu), localiser.device, cancel=cancel,
                            progress=progress)
    probabilities = torch.softmax(logits, dim=0).numpy()
    liver = largest_component(probabilities[1] + probabilities[2] > 0.5)
    slices = np.nonzero(liver.any(axis=tuple(a for a in range(3) if a != axis)))[0]
    if len(slices) == 0:
        return None
    margin = int(np.ceil(SLAB_MARGIN_MM / grid.spacing[ijk_axis]))
    slab = axis, max(int(slices[0]) - margin, 0), min(int(slices[-1]) + margin + 1, length)
    near = ndimage.distance_transform_edt(~liver, sampling=grid.spacing[::-1]) <= NEAR_LIVER_MM
    return slab, near


def _to_reference(values: np.ndarray, grid: Volume, reference: Volume) -> np.ndarray:
    """A float map on the working grid, linearly resampled onto the reference grid (0 outside)."""
    out = sitk.Resample(grid.with_array(values.astype(np.float32)).to_sitk(), reference.to_sitk(), sitk.Transform(),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)
