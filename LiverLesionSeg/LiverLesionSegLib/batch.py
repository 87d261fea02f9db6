"""`deepnav liver segment --studies FOLDER...`: many studies in one command, each segmented as
`deepnav liver segment --phase ... --out OUT/<study>` would, and under torchrun shared out among the
processes (deepnav.distributed: study i to rank i % N), the summary merged on rank 0.

A study is a folder holding its phases as image files named after the phase (`arterial.nii.gz`,
`venous.nrrd`, ...: plain, arterial, venous, delayed) or DICOM folders so named; a folder holding
no phase but study folders stands for those (sorted by name).
"""

from __future__ import annotations

from pathlib import Path

from deepnav import distributed
from deepnav.errors import InputError
from deepnav.outputs import distinct_names
from deepnav.progress import ProgressCallback, silent
from LiverLesionSegLib.pipeline import PHASES, read_phase, segment_study

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def study_phases(folder: Path) -> dict[str, Path]:
    """{phase: image file or DICOM folder} of a study folder (empty: not a study)."""
    found: dict[str, Path] = {}
    for phase in PHASES:
        candidates = [folder / f"{phase}{suffix}" for suffix in IMAGE_SUFFIXES] + [folder / phase]
        present = [p for p in candidates if p.exists()]
        if len(present) > 1:
            raise InputError(f"{folder}: the {phase} phase is there twice ({', '.join(p.name for p in present)})")
        if present:
            found[phase] = present[0]
    return found


def find_studies(paths: list[Path]) -> list[Path]:
    """The study folders the command line names: each path a study, or a folder of studies."""
    studies: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise InputError(f"{path} is not a folder (--studies takes study folders or folders of them)")
        if study_phases(path):
            studies.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if p.is_dir() and study_phases(p))
        if not inside:
            raise InputError(f"{path} holds no study: a study folder holds its phases named {', '.join(PHASES)} "
                             f"({', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
        studies.extend(inside)
    return studies


def segment_studies(model, studies: list[Path], out: Path, *, reference: str | None = None,
                    registration: str = "pso-powell", progress: ProgressCallback = silent) -> list[dict]:
    """Segment each study into OUT/<its folder's name> (repeated names get _2, _3, ...); returns one
    row per study, in the order given, from every process. A study that cannot be read or segmented
    (InputError) is reported in its row and the others go on."""
    names = distinct_names([study.name for study in studies])
    rows = []
    mine = distributed.shard(range(len(studies)))
    for k, n in enumerate(mine):
        study, name = studies[n], names[n]
        progress(k / max(len(mine), 1), f"study {n + 1}/{len(studies)}: {study}")
        row: dict = {"study": str(study), "out": name}
        try:
            phases = {phase: read_phase(path, f"{phase} phase of {study}") for phase, path in study_phases(study).items()}
            result = segment_study(model, phases, reference=reference, registration=registration)
            result.write(out / name)
            row.update(reliable=result.plausibility.reliable, message=result.message(), reference=result.reference,
                       reasons=result.plausibility.reasons, warnings=result.warnings)
        except InputError as exc:
            row.update(out=None, error=str(exc))
        rows.append(row)
    return distributed.gather(rows)
