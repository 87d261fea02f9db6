"""Training data in the MSD / nnU-Net layout, so that a user can train on real data (LiTS, MSD
Task03, their own) exactly as on our simulated cases:

    DIR/dataset.json                     channel_names {"0": "arterial", "1": "venous", ...}, labels
    DIR/imagesTr/<case>_0000.nii.gz ...  one file per phase (channel), co-registered, same grid
    DIR/labelsTr/<case>.nii.gz           0 background, 1 liver, 2 lesion (LiTS / MSD Task03 labels),
                                         and optionally an "ignore" label (nnU-Net's convention)
                                         where the truth is unknown: training leaves it out

`write_simulated` fills such a folder from the lesion simulator (phases put back on the reference
grid with their known transforms, as a registered dataset is); `read_case` loads one case onto the
1.5 mm working grid.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from deepnav.errors import InputError
from deepnav.imaging import read_volume, write_volume
from LiverLesionSegLib.network import PHASE_CHANNELS
from LiverLesionSegLib.preprocess import resample, working_grid
from LiverLesionSegLib.simulator import Case

LABELS = {"background": 0, "liver": 1, "lesion": 2, "ignore": 3}
IGNORE = LABELS["ignore"]  # in TrainingCase.label, whatever value the dataset gave it


@dataclasses.dataclass
class TrainingCase:
    name: str
    phases_hu: dict[str, np.ndarray]  # on the working grid, float32
    label: np.ndarray  # uint8 0/1/2, IGNORE where unknown, on the working grid


def case_label(case: Case) -> np.ndarray:
    label = np.where(case.lesions.array > 0, 2, case.liver.array).astype(np.uint8)
    if case.unknown is not None:
        label[(case.unknown.array > 0) & (label == 0)] = IGNORE
    return label


def write_simulated(cases: list[Case], out_dir: Path, start: int = 0) -> Path:
    """Write simulated cases as a registered MSD-layout dataset (all cases must share one phase list)."""
    phases = list(cases[0].phases)
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    for n, case in enumerate(cases, start):
        if list(case.phases) != phases:
            raise ValueError("all cases of a dataset must have the same phases")
        name = f"sim_{n:04d}"
        grid = case.lesions
        for c, phase in enumerate(phases):
            registered = resample(case.phases[phase], grid, case.truth[phase])
            write_volume(grid.with_array(np.round(registered).astype(np.int16)), out_dir / "imagesTr" / f"{name}_{c:04d}.nii.gz")
        write_volume(grid.with_array(case_label(case)), out_dir / "labelsTr" / f"{name}.nii.gz")
    manifest = {"name": "DeepNav simulated multi-phase liver lesions",
                "channel_names": {str(c): phase for c, phase in enumerate(phases)}, "labels": LABELS,
                "file_ending": ".nii.gz", "numTraining": len(list((out_dir / "labelsTr").glob("*.nii.gz")))}
    (out_dir / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def read_manifest(folder: Path) -> tuple[dict[int, str], list[str], int | None]:
    """(channel -> phase name, case names, the "ignore" label's value or None) of an MSD-layout
    folder, with clear errors."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise InputError(f"{folder} has no dataset.json: not an MSD / nnU-Net dataset folder")
    manifest = json.loads(path.read_text())
    names = manifest.get("channel_names") or manifest.get("modality") or {}
    channels = {}
    for key, value in names.items():
        phase = str(value).lower().replace("portal venous", "venous").replace("portal", "venous")
        phase = {"pv": "venous", "art": "arterial", "nc": "plain", "ct": "venous"}.get(phase, phase)
        if phase not in PHASE_CHANNELS:
            raise InputError(f"{path}: channel {key} is {value!r}; name channels by phase: {PHASE_CHANNELS}")
        channels[int(key)] = phase
    cases = sorted(p.name[: -len(".nii.gz")] for p in (folder / "labelsTr").glob("*.nii.gz"))
    if not cases:
        raise InputError(f"{folder / 'labelsTr'} has no label files")
    ignore = manifest.get("labels", {}).get("ignore")
    return channels, cases, None if ignore is None else int(ignore)


def read_case(folder: Path, name: str, channels: dict[int, str], ignore: int | None = None) -> TrainingCase:
    """One case on the 1.5 mm working grid of its first channel; labels above lesion (2) count as
    lesion (a dataset's other tumour classes), except `ignore`, which becomes IGNORE."""
    label = read_volume(folder / "labelsTr" / f"{name}.nii.gz", what=f"label of {name}")
    images = {phase: read_volume(folder / "imagesTr" / f"{name}_{c:04d}.nii.gz", what=f"{phase} of {name}")
              for c, phase in channels.items()}
    first = images[channels[min(channels)]]
    for phase, image in images.items():
        if not image.same_grid(first):
            raise InputError(f"{name}: the {phase} image is not on the same grid as the others (register it first)")
    if not label.same_grid(first):
        raise InputError(f"{name}: the label map is not on the image grid")
    grid = working_grid(first)
    values = resample(label, grid, label=True)
    return TrainingCase(name, {phase: resample(image, grid) for phase, image in images.items()},
                        np.where(values == ignore, IGNORE, np.minimum(values, 2)).astype(np.uint8))


def read_dataset(folder: Path, progress: Callable[[float, str], None] | None = None) -> list[TrainingCase]:
    channels, names, ignore = read_manifest(folder)
    cases = []
    for n, name in enumerate(names):
        if progress:
            progress(n / len(names), f"reading {name}")
        cases.append(read_case(folder, name, channels, ignore))
    return cases
