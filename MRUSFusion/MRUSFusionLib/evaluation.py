"""`deepnav fusion evaluate`: the shipped model against known truth on unseen synthetic patients,
side by side with the classical SimpleITK baseline on the same preprocessed pairs.

Target registration error (TRE) is measured on landmarks (vessel bifurcations, lesion centres)
that lie inside the fusion grid and the US field of view: for an MR landmark x, the registration's
transform (the exported one, in LPS mm) predicts where x lies in the US; the truth is G^-1(x).
Initial TRE uses the identity (the coarse alignment), rigid TRE the rigid stage alone, corrected
TRE the network followed by the correction stage (`registration.correct_registration`).
"""

from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch

from deepnav.progress import ProgressCallback, print_progress
from deepnav.statistics import spread
from deepnav.torch_runtime import machine_description
from MRUSFusionLib.baseline import BaselineSettings, register_classical
from MRUSFusionLib.dataset import TRAINING_SEED_BASE
from MRUSFusionLib.fields import resample_with, transform_points
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.phantom import landmarks_in_view, make_patient
from MRUSFusionLib.preprocess import prepare_pair
from MRUSFusionLib.registration import correct_result, register_pair, run_network
from MRUSFusionLib.training import vessel_dice

CASES_PER_SEED = 100  # patient seed of case i under --seed S is S * 100 + i


def case_seeds(cases: int, seed: int) -> list[int]:
    if cases > CASES_PER_SEED:
        raise ValueError(f"at most {CASES_PER_SEED} cases per seed")
    seeds = [seed * CASES_PER_SEED + i for i in range(cases)]
    if max(seeds) >= TRAINING_SEED_BASE or min(seeds) < 0:
        raise ValueError(f"seed must be in [0, {TRAINING_SEED_BASE // CASES_PER_SEED}): larger seeds are training patients")
    return seeds


def landmark_errors(result, patient, frame) -> dict[str, np.ndarray]:
    """Errors (mm) of the landmarks inside the fusion grid and the US field of view: initial
    (identity), after the rigid stage, after the cascade; through the exported LPS transforms."""
    truth = frame.landmarks_lps
    use = landmarks_in_view(patient, frame, result.grid)
    x = patient.landmarks_lps[use]
    return {"initial": np.linalg.norm(x - truth[use], axis=1),
            "rigid": np.linalg.norm(result.map_points_lps(x, rigid_only=True) - truth[use], axis=1),
            "final": np.linalg.norm(result.map_points_lps(x) - truth[use], axis=1),
            "used": use}


def _dice_through(transform: sitk.Transform, frame, pair) -> float:
    """Vessel Dice after resampling the *original* US label through a transform into the grid."""
    warped = resample_with(transform, frame.vessels.with_array(frame.vessels.array.astype(np.float32)), pair.grid)
    fov = resample_with(transform, frame.fov.with_array(frame.fov.array.astype(np.float32)), pair.grid)
    return vessel_dice(torch.from_numpy(pair.fixed_label), torch.from_numpy(warped), torch.from_numpy(fov))


def evaluate(model: LoadedModel, cases: int, seed: int, *, frames: int = 2, baseline: bool = True,
             baseline_settings: BaselineSettings | None = None, latency_repeats: int = 3, correct: bool = True,
             progress: ProgressCallback = print_progress) -> dict:
    """Run the model, its correction stage (as `register` does by default) and the baseline on
    `cases` unseen synthetic patients; a JSON-able report."""
    training_seeds = set(model.metadata.get("training", {}).get("patient_seeds", []))
    seeds = case_seeds(cases, seed)
    if training_seeds & set(seeds):
        raise ValueError(f"evaluation patients {sorted(training_seeds & set(seeds))} were used in training")
    settings = baseline_settings or BaselineSettings()
    errors = {k: [] for k in ("initial", "rigid", "final", "corrected", "baseline")}
    rows, latencies = [], []
    for n, patient_seed in enumerate(seeds):
        patient = make_patient(patient_seed, frames=frames)
        for f_idx, frame in enumerate(patient.frames):
            pair = prepare_pair(patient.mr, frame.image, liver=patient.liver,
                                mr_vessels=patient.vessels, us_vessels=frame.vessels)
            result = register_pair(model, pair)
            for _ in range(latency_repeats):
                latencies.append(run_network(model, pair)[1])
            err = landmark_errors(result, patient, frame)
            use, truth = err["used"], frame.landmarks_lps
            x = patient.landmarks_lps[use]
            row = {"case": n, "patient_seed": patient_seed, "frame": f_idx, "landmarks": int(use.sum()),
                   "tre_initial_mm": err["initial"], "tre_rigid_mm": err["rigid"], "tre_final_mm": err["final"],
                   "dice_vessels_initial": _dice_through(sitk.Transform(3, sitk.sitkIdentity), frame, pair),
                   "dice_vessels_final": _dice_through(result.transform(), frame, pair),
                   "folding_percent": result.folding_percent(),
                   "network_s": result.timings["network"]}
            if correct:
                t0 = time.perf_counter()
                correct_result(result, patient.mr, frame.image, liver=patient.liver)
                row["correction_s"] = time.perf_counter() - t0
                row["tre_corrected_mm"] = np.linalg.norm(result.map_points_lps(x) - truth[use], axis=1)
                row["dice_vessels_corrected"] = _dice_through(result.transform(), frame, pair)
                row["correction"] = result.correction.report
            if baseline:
                transform, runtime = register_classical(pair, settings)
                row["tre_baseline_mm"] = np.linalg.norm(transform_points(transform, x) - truth[use], axis=1)
                row["dice_vessels_baseline"] = _dice_through(transform, frame, pair)
                row["baseline_runtime_s"] = runtime
            for key in errors:
                if f"tre_{key}_mm" in row:
                    errors[key].extend(row[f"tre_{key}_mm"].tolist())
                    row[f"tre_{key}_mm"] = float(np.median(row[f"tre_{key}_mm"])) if use.any() else None
            rows.append(row)
            progress((n + (f_idx + 1) / frames) / cases,
                     f"case {n + 1}/{cases} frame {f_idx + 1}: TRE {row['tre_initial_mm']} -> {row['tre_final_mm']} mm")
    summary = {
        "tre_initial_mm": spread(errors["initial"]),
        "tre_rigid_mm": spread(errors["rigid"]),
        "tre_final_mm": spread(errors["final"]),
        "dice_vessels_initial": float(np.median([r["dice_vessels_initial"] for r in rows])),
        "dice_vessels_final": float(np.median([r["dice_vessels_final"] for r in rows])),
        "folding_percent": float(max(r["folding_percent"] for r in rows)),
        "latency_s": {**spread(latencies), "what": "preprocessed 128^3 pair to dense field, warm", "device": str(model.device),
                      "precision": model.precision},
    }
    if correct:
        summary["tre_corrected_mm"] = spread(errors["corrected"])
        summary["dice_vessels_corrected"] = float(np.median([r["dice_vessels_corrected"] for r in rows]))
        summary["correction_s"] = {**spread([r["correction_s"] for r in rows]),
                                   "what": "region, MR and US features, search, fit, refinement, warped US"}
        summary["tre_corrected_over_initial"] = summary["tre_corrected_mm"]["median"] / summary["tre_initial_mm"]["median"]
    if baseline:
        summary["baseline"] = {
            "method": settings.describe(),
            "tre_final_mm": spread(errors["baseline"]),
            "dice_vessels_final": float(np.median([r["dice_vessels_baseline"] for r in rows])),
            "runtime_s": spread([r["baseline_runtime_s"] for r in rows]),
        }
        summary["speedup_vs_baseline"] = summary["baseline"]["runtime_s"]["median"] / summary["latency_s"]["median"]
    summary["tre_final_over_initial"] = summary["tre_final_mm"]["median"] / summary["tre_initial_mm"]["median"]
    return {
        "summary": summary,
        "cases": rows,
        "settings": {"cases": cases, "seed": seed, "frames_per_case": frames, "patient_seeds": seeds,
                     "model": str(model.path), "precision": model.precision, "model_metadata": model.metadata},
        "machine": machine_description(),
    }


def format_table(report: dict) -> str:
    s = report["summary"]
    lines = [f"{'':28s}{'median':>10s}{'p90':>10s}",
             f"{'TRE initial (mm)':28s}{s['tre_initial_mm']['median']:10.2f}{s['tre_initial_mm']['p90']:10.2f}",
             f"{'TRE rigid network (mm)':28s}{s['tre_rigid_mm']['median']:10.2f}{s['tre_rigid_mm']['p90']:10.2f}",
             f"{'TRE cascade (mm)':28s}{s['tre_final_mm']['median']:10.2f}{s['tre_final_mm']['p90']:10.2f}"]
    if "tre_corrected_mm" in s:
        lines.append(f"{'TRE corrected (mm)':28s}{s['tre_corrected_mm']['median']:10.2f}{s['tre_corrected_mm']['p90']:10.2f}")
    if "baseline" in s:
        b = s["baseline"]
        lines.append(f"{'TRE SimpleITK baseline (mm)':28s}{b['tre_final_mm']['median']:10.2f}{b['tre_final_mm']['p90']:10.2f}")
    lines += [f"{'vessel Dice initial':28s}{s['dice_vessels_initial']:10.3f}",
              f"{'vessel Dice cascade':28s}{s['dice_vessels_final']:10.3f}"]
    if "baseline" in s:
        lines.append(f"{'vessel Dice baseline':28s}{s['baseline']['dice_vessels_final']:10.3f}")
    if "dice_vessels_corrected" in s:
        lines.append(f"{'vessel Dice corrected':28s}{s['dice_vessels_corrected']:10.3f}")
    lines += [f"{'folding (max %)':28s}{s['folding_percent']:10.4f}",
              f"{'latency cascade (s)':28s}{s['latency_s']['median']:10.3f}{s['latency_s']['p90']:10.3f}"]
    if "correction_s" in s:
        lines.append(f"{'time correction (s)':28s}{s['correction_s']['median']:10.3f}{s['correction_s']['p90']:10.3f}")
    if "baseline" in s:
        runtime = s["baseline"]["runtime_s"]
        lines += [f"{'runtime baseline (s)':28s}{runtime['median']:10.1f}{runtime['p90']:10.1f}",
                  f"{'speed-up vs baseline':28s}{s['speedup_vs_baseline']:10.0f}x",
                  f"baseline: {s['baseline']['method']}"]
    return "\n".join(lines)
