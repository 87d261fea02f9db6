"""HC18-style data: images, their ellipse-outline annotations, pixel sizes and reference HC.

HC18 (van den Heuvel et al., PLoS ONE 2018; CC BY 4.0): `NNN_HC.png` with `NNN_HC_Annotation.png`
(the sonographer's ellipse outline, 0/255) and `training_set_pixel_size_and_HC.csv`
(`filename,pixel size(mm),head circumference (mm)`). Images of one fetus share the number before
the first `_` (`010_HC.png`, `010_2HC.png`): splits are made by that number, so no fetus is on
both sides.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from deepnav.errors import InputError
from FetalBiometryLib.ellipse import Ellipse, fit_ellipse
from FetalBiometryLib.image_io import read_image_2d

CSV_NAME = "training_set_pixel_size_and_HC.csv"


@dataclasses.dataclass(frozen=True)
class Case:
    image: Path
    annotation: Path | None
    pixel_mm: float
    hc_mm: float | None  # the reference HC (ellipse perimeter), when given

    @property
    def subject(self) -> str:
        return self.image.name.split("_")[0]


def read_pixel_sizes(csv_path: Path) -> dict[str, tuple[float, float | None]]:
    """filename -> (pixel size mm, reference HC mm or None), from an HC18-style CSV."""
    out = {}
    with open(csv_path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip() or row[0].strip().lower() == "filename":
                continue
            try:
                pixel = float(row[1])
                hc = float(row[2]) if len(row) > 2 and row[2].strip() else None
            except (IndexError, ValueError):
                raise InputError(f"{csv_path}: cannot read the pixel size in row {row}") from None
            out[row[0].strip()] = (pixel, hc)
    return out


def csv_pixel_size(table: dict[str, tuple[float, float | None]], csv_path: Path, image: Path
                   ) -> tuple[float | None, str | None]:
    """An image's pixel size from a `read_pixel_sizes` table, or (None, why not): an image the CSV
    does not list is measured only if it carries its own (DICOM)."""
    if image.name in table:
        return table[image.name][0], None
    return None, f"not listed in {csv_path} and the file carries no pixel size of its own"


def find_cases(data_dir: Path) -> list[Case]:
    """Every image with an annotation under `data_dir` (or its `training_set/`), with the CSV's
    pixel size and HC."""
    data_dir = Path(data_dir)
    csv_path = next((p for p in (data_dir / CSV_NAME, data_dir.parent / CSV_NAME) if p.is_file()), None)
    if csv_path is None:
        raise InputError(f"no {CSV_NAME} in {data_dir}")
    table = read_pixel_sizes(csv_path)
    image_dir = data_dir / "training_set" if (data_dir / "training_set").is_dir() else data_dir
    cases = []
    for name, (pixel, hc) in sorted(table.items()):
        image = image_dir / name
        annotation = image.with_name(image.stem + "_Annotation.png")
        if image.is_file() and annotation.is_file():
            cases.append(Case(image, annotation, pixel, hc))
    if not cases:
        raise InputError(f"no annotated images listed in {csv_path} were found in {image_dir}")
    return cases


def split_by_subject(cases: list[Case], val_fraction: float = 0.15, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Train / validation split by fetus (the number before the first `_`), deterministic."""
    subjects = sorted({c.subject for c in cases})
    rng = np.random.default_rng(seed)
    val_subjects = set(rng.permutation(subjects)[: max(1, int(round(val_fraction * len(subjects))))].tolist())
    return [c for c in cases if c.subject not in val_subjects], [c for c in cases if c.subject in val_subjects]


def reference_ellipse(annotation: Path) -> Ellipse:
    """The annotated ellipse: fitted to the outline's pixels (the centre line of a 1-2 px line)."""
    outline = read_image_2d(annotation).pixels > 0
    ys, xs = np.nonzero(outline)
    ellipse = fit_ellipse(np.c_[xs, ys])
    if ellipse is None:
        raise InputError(f"{annotation}: no ellipse outline in the annotation")
    return ellipse
