"""`deepnav liver evaluate`: the shipped model on simulated studies never used in training.

Each study covers the abdominal CT's whole in-plane field of view at 1.5 mm over the slices that
carry organ labels (as a real series does in-plane, so that false positives outside the liver
count; `benchmarks/liver_full_resolution.py` checks a full-length series) and has an arterial and
a portal venous phase (venous misaligned by a known rigid motion); it is segmented twice through
`segment_study`: with both phases, and with the venous phase alone (the method's claim is that
fusing phases helps). Scores:
- lesion Dice per case (all lesion voxels of the case) and global (all cases' voxels pooled);
- lesion-wise recall and precision: a lesion counts as found when a predicted lesion overlaps it
  with Dice >= 0.5 or contains its centroid (and a predicted lesion is correct by the same rule);
- liver Dice; phase registration error (mean over the liver's voxels, mm); runtime per case.
Evaluation seeds start at EVALUATION_SEED_BASE; `deepnav liver simulate` refuses seeds there.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from deepnav.progress import ProgressCallback, print_progress
from deepnav.torch_runtime import machine_description
from LiverLesionSegLib.model_io import LoadedModel
from LiverLesionSegLib.phase_registration import transform_error_mm
from LiverLesionSegLib.pipeline import segment_study
from LiverLesionSegLib.simulator import Case, simulate_case

EVALUATION_SEED_BASE = 1_000_000


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _matches(ids_a: np.ndarray, ids_b: np.ndarray) -> tuple[int, int]:
    """How many objects of `ids_a` are found in `ids_b` (Dice >= 0.5 or centroid inside), of how many."""
    found, count = 0, int(ids_a.max())
    for n in range(1, count + 1):
        obj = ids_a == n
        if not obj.any():
            continue
        centroid = tuple(np.round(np.argwhere(obj).mean(axis=0)).astype(int))
        overlapping = np.unique(ids_b[obj])
        hit = ids_b[centroid] > 0 or any(dice(obj, ids_b == m) >= 0.5 for m in overlapping if m > 0)
        found += bool(hit)
    return found, count


def score_case(case: Case, lesions: np.ndarray, liver: np.ndarray) -> dict:
    """Scores of one segmentation (arrays on the case's grid); voxels where the truth is unknown
    (`case.unknown`: maybe liver, beyond the real CT's organ labels) are left out."""
    truth_ids = case.lesions.array
    if case.unknown is not None:
        unknown = case.unknown.array > 0
        lesions, liver = np.where(unknown, 0, lesions), np.where(unknown, 0, liver)
    found, n_true = _matches(truth_ids, lesions)
    correct, n_pred = _matches(lesions, truth_ids)
    return {"lesion_dice": dice(truth_ids > 0, lesions > 0), "lesions_true": n_true, "lesions_found": found,
            "lesions_predicted": n_pred, "lesions_correct": correct,
            "liver_dice": dice(case.liver.array > 0, liver > 0),
            "tp": int(((truth_ids > 0) & (lesions > 0)).sum()), "volume_sum": int((truth_ids > 0).sum() + (lesions > 0).sum())}


def _summary(rows: list[dict]) -> dict:
    tp, volume = sum(r["tp"] for r in rows), sum(r["volume_sum"] for r in rows)
    found, true = sum(r["lesions_found"] for r in rows), sum(r["lesions_true"] for r in rows)
    correct, predicted = sum(r["lesions_correct"] for r in rows), sum(r["lesions_predicted"] for r in rows)
    return {"lesion_dice_per_case": float(np.median([r["lesion_dice"] for r in rows])),
            "lesion_dice_global": 2 * tp / volume if volume else 1.0,
            "lesion_recall": found / true if true else 1.0,
            "lesion_precision": correct / predicted if predicted else 1.0,
            "liver_dice": float(np.median([r["liver_dice"] for r in rows]))}


def evaluate(model: LoadedModel, abdomen, cases: int, seed: int, progress: ProgressCallback = print_progress) -> dict:
    rows, single = [], []
    for n in range(cases):
        case_seed = EVALUATION_SEED_BASE + seed * 1000 + n
        base = abdomen(case_seed)
        case = simulate_case(base, case_seed, phases=("arterial", "venous"), field="slab")
        t0 = time.perf_counter()
        result = segment_study(model, case.phases)
        runtime = time.perf_counter() - t0
        k, j, i = np.nonzero(case.liver.array)
        points = case.liver.index_to_lps(np.stack([i, j, k], axis=1).astype(float))
        registration_error = transform_error_mm(np.array(result.registration["venous"]["matrix_lps"]),
                                                case.truth["venous"], points)
        row = {"case_seed": case_seed, "runtime_s": runtime, "registration_error_mm": registration_error,
               "lesions": [{"kind": lesion.kind, "diameter_mm": round(lesion.diameter_mm, 1)} for lesion in case.lesion_list],
               **score_case(case, result.lesions.array, result.liver.array)}
        rows.append(row)
        # the venous phase alone, on its own (moved) grid: truth brought there through the known motion
        venous_only = segment_study(model, {"venous": case.phases["venous"]})
        single.append(score_case(_case_in_phase(case, "venous"), venous_only.lesions.array, venous_only.liver.array))
        progress((n + 1) / cases, f"case {n}: lesion Dice {row['lesion_dice']:.3f} (venous alone "
                                  f"{single[-1]['lesion_dice']:.3f}), {row['lesions_found']}/{row['lesions_true']} found, "
                                  f"registration {registration_error:.2f} mm, {runtime:.1f} s")
    summary = {**_summary(rows), "registration_error_mm": float(np.median([r["registration_error_mm"] for r in rows])),
               "runtime_s": float(np.median([r["runtime_s"] for r in rows])), "single_phase": _summary(single)}
    return {"summary": summary, "cases": rows, "single_phase_cases": single,
            "settings": {"cases": cases, "seed": seed, "phases": ["arterial", "venous"], "model": str(model.path)},
            "machine": machine_description()}


def _case_in_phase(case: Case, phase: str) -> Case:
    """The truth labels on the grid of a moved phase (nearest neighbour through the known motion)."""
    from LiverLesionSegLib.preprocess import resample

    grid = case.phases[phase]
    inverse = np.linalg.inv(case.truth[phase])  # phase point -> reference point
    lesions, liver, unknown = (None if v is None else grid.with_array(resample(v, grid, inverse, label=True))
                               for v in (case.lesions, case.liver, case.unknown))
    return Case({phase: grid}, phase, lesions, liver, {phase: np.eye(4)}, case.lesion_list, unknown)


def format_table(report: dict) -> str:
    s, one = report["summary"], report["summary"]["single_phase"]
    lines = [f"{'':28s}{'arterial+venous':>16s}{'venous alone':>14s}"]
    for key in ("lesion_dice_per_case", "lesion_dice_global", "lesion_recall", "lesion_precision", "liver_dice"):
        lines.append(f"{key:28s}{s[key]:16.3f}{one[key]:14.3f}")
    lines.append(f"{'registration error (mm)':28s}{s['registration_error_mm']:16.2f}")
    lines.append(f"{'runtime per case (s)':28s}{s['runtime_s']:16.1f}")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    from deepnav.command_line import write_json  # the commands' one JSON writer ("-": standard output)

    write_json(report, path)
