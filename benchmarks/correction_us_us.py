"""The correction stage on real 3D ultrasound: US-US registration with known moves.

Each real US volume of `../shared/data/us3d` (RESECT brain US, PLUS spine-phantom reconstruction)
is moved by known rigid transforms (small: <= 8 degrees and 10 mm; large: up to 25 mm), optionally
deformed by a smooth random B-spline field (<= 3 mm) and given independent multiplicative speckle,
then registered back to the original with `registration.correct_registration` (the MIND-SSC
correction from the coarse alignment, as `deepnav fusion register` runs it when the network's
answer scores worse). Landmark error: 200 points inside the US data, through the transform it
returns. Side by side in the same run: SimpleITK rigid registration (Mattes mutual information,
versor rigid, 3-level pyramid, masks), the classical comparator, and (`--convexadam N`) the
authors' convexAdam package with its published CuRIOUS settings on the same region
(`benchmarks/convexadam_comparator.py`).

    python benchmarks/correction_us_us.py --json benchmarks/results/fusion_correction_us_us_cpu.json

Real speckle and a real field of view, but one modality: it says whether the search, the robust
fit and the refinement recover known motion, not how MIND-SSC fares between MR and US.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from convexadam_comparator import register_convexadam  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.errors import InputError  # noqa: E402
from deepnav.imaging import Volume, matrix_to_affine, read_volume, rotation_matrix  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib.fields import transform_points  # noqa: E402
from MRUSFusionLib.preprocess import registration_region  # noqa: E402
from MRUSFusionLib.registration import correct_registration, mr_on_region, us_on_region  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "us3d"
FILES = ["Case3-US-before.nii.gz", "Case4-US-before.nii.gz", "vtkVolumeReconstructorTestNNMEANvolumeRef.mha",
         "vtkVolumeReconstructorTestIMLiFvolumeRef.mha"]


def random_move(rng: np.random.Generator, centre: np.ndarray, max_deg: float, max_mm: float) -> np.ndarray:
    """4x4 LPS rigid map: a rotation about `centre` and a translation, each up to the limits."""
    axis = rng.normal(size=3)
    angles = np.deg2rad(rng.uniform(0.5, 1.0) * max_deg) * axis / np.linalg.norm(axis)
    shift = rng.normal(size=3)
    shift *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(shift)
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(angles)
    m[:3, 3] = centre - m[:3, :3] @ centre + shift
    return m


def smooth_field(us: Volume, rng: np.random.Generator, max_mm: float) -> sitk.BSplineTransform:
    """A random cubic B-spline displacement on a 4^3 mesh over the volume, peak |u| <= max_mm."""
    image = us.to_sitk()
    bspline = sitk.BSplineTransformInitializer(image, [4, 4, 4], order=3)
    coefficients = rng.normal(size=len(bspline.GetParameters()))
    coefficients *= max_mm / (np.sqrt(3) * np.abs(coefficients).max())
    bspline.SetParameters(coefficients.tolist())
    return bspline


def make_moving(us: Volume, move: np.ndarray, bspline, speckle: float, rng) -> Volume:
    """D(y) = us(B(y)) x speckle on the US grid, placed by `move` (a voxel at y lies at move(y))."""
    image = us.to_sitk()
    if bspline is not None:
        image = sitk.Resample(image, image, bspline, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    if speckle > 0:  # independent multiplicative speckle (gamma, mean 1)
        array = array * rng.gamma(1.0 / speckle**2, speckle**2, size=array.shape).astype(np.float32)
    return Volume.from_ijk_to_lps(array.astype(np.float32), move @ us.ijk_to_lps())


def classical_rigid(fixed: Volume, moving: Volume) -> tuple[sitk.Transform, float]:
    """SimpleITK rigid registration: Mattes MI (50 bins, 10% samples), versor rigid, regular step
    gradient descent (200 it.), pyramid 4-2-1, masks on both images' data (> 0)."""
    t0 = time.perf_counter()
    f, m = fixed.to_sitk(), moving.to_sitk()
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, 1)
    reg.SetMetricFixedMask(sitk.Cast(f > 0, sitk.sitkUInt8))
    reg.SetMetricMovingMask(sitk.Cast(m > 0, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 200, relaxationFactor=0.7)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SetInitialTransform(sitk.VersorRigid3DTransform(), inPlace=False)
    transform = reg.Execute(f, m)
    return transform, time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moves", type=int, default=4, help="moves per volume and kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--convexadam", type=int, default=0, metavar="N",
                        help="also run the authors' convexAdam package on the first N moves of each kind "
                             "(discrete + LTS, and with Adam; needs 'pip install convexadam nibabel')")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    torch.set_flush_denormal(True)
    rng = np.random.default_rng(args.seed)
    kinds = {"rigid_small": dict(deg=8, mm=10, smooth=0.0, speckle=0.0),
             "rigid_large": dict(deg=8, mm=25, smooth=0.0, speckle=0.0),
             "rigid_smooth_speckle": dict(deg=8, mm=10, smooth=3.0, speckle=0.3)}
    rows, skipped = [], []
    for name in FILES:
        us = read_volume(DATA / name, what="US")
        us = us.with_array(us.array.astype(np.float32))
        k, j, i = np.nonzero(us.array > 0)
        for kind, spec in kinds.items():
            for n in range(args.moves):
                pick = rng.choice(len(i), 200, replace=False)
                y = us.index_to_lps(np.stack([i[pick], j[pick], k[pick]], 1).astype(float))
                move = random_move(rng, y.mean(0), spec["deg"], spec["mm"])
                bspline = smooth_field(us, rng, spec["smooth"]) if spec["smooth"] else None
                moving = make_moving(us, move, bspline, spec["speckle"], rng)
                # landmark y of the deformed image: at B(y) in the original, at move(y) in the moving
                fixed_points = transform_points(bspline, y) if bspline is not None else y
                truth = y @ move[:3, :3].T + move[:3, 3]
                row = {"file": name, "kind": kind, "move": n,
                       "initial_mm": float(np.median(np.linalg.norm(fixed_points - truth, axis=1)))}
                t0 = time.perf_counter()
                try:
                    region = registration_region(us, moving)
                except InputError as exc:  # e.g. a slab thinner than the minimum overlap
                    skipped.append({"file": name, "kind": kind, "move": n, "why": str(exc)})
                    continue
                c = correct_registration(us, moving, region, fixed_is_us=True)
                row["correction_s"] = time.perf_counter() - t0
                transform = sitk.CompositeTransform([*c.start_transforms, matrix_to_affine(c.matrix_lps)])
                row["corrected_mm"] = float(np.median(np.linalg.norm(transform_points(transform, fixed_points) - truth,
                                                                     axis=1)))
                row.update({k: c.report[k] for k in ("inlier_share", "mind_ssc_before", "mind_ssc_after", "flags")})
                row["region_spacing_mm"] = float(region.spacing[0])
                if not args.no_baseline:
                    classical, seconds = classical_rigid(us, moving)
                    row["baseline_mm"] = float(np.median(np.linalg.norm(transform_points(classical, fixed_points) - truth,
                                                                        axis=1)))
                    row["baseline_s"] = seconds
                if n < args.convexadam:
                    (fixed_image, fixed_mask), (moving_image, moving_mask) = (
                        mr_on_region(us, region, data_only=True), us_on_region(moving, region, None))
                    for label, adam in (("convexadam_discrete", False), ("convexadam_adam", True)):
                        transform, seconds = register_convexadam(fixed_image, moving_image, fixed_mask, moving_mask, region,
                                                                instance_optimisation=adam)
                        row[f"{label}_mm"] = float(np.median(np.linalg.norm(
                            transform_points(transform, fixed_points) - truth, axis=1)))
                        row[f"{label}_s"] = seconds
                rows.append(row)
                print(f"{name[:24]:24s} {kind:22s} {row['initial_mm']:6.2f} -> {row['corrected_mm']:5.2f} mm "
                      f"({row['correction_s']:.2f} s)" + (f"   SimpleITK {row['baseline_mm']:5.2f} mm ({row['baseline_s']:.1f} s)"
                                                          if "baseline_mm" in row else "")
                      + (f"   convexAdam {row['convexadam_discrete_mm']:5.2f} / {row['convexadam_adam_mm']:5.2f} mm "
                         f"({row['convexadam_discrete_s']:.1f} / {row['convexadam_adam_s']:.1f} s)"
                         if "convexadam_adam_mm" in row else ""), flush=True)
    summary = {}
    for kind in kinds:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        keys = ("initial_mm", "corrected_mm", "correction_s", "baseline_mm", "baseline_s", "convexadam_discrete_mm",
                "convexadam_discrete_s", "convexadam_adam_mm", "convexadam_adam_s")
        summary[kind] = {key: spread([r[key] for r in sel if key in r]) for key in keys if any(key in r for r in sel)}
    print(f"\n{'kind':24s}{'initial':>10s}{'corrected':>12s}{'p90':>8s}{'time s':>9s}{'SimpleITK':>11s}{'time s':>9s}")
    for kind, s in summary.items():
        line = (f"{kind:24s}{s['initial_mm']['median']:10.2f}{s['corrected_mm']['median']:12.2f}"
                f"{s['corrected_mm']['p90']:8.2f}{s['correction_s']['median']:9.2f}")
        if "baseline_mm" in s:
            line += f"{s['baseline_mm']['median']:11.2f}{s['baseline_s']['median']:9.1f}"
        print(line)
    if any("convexadam_adam_mm" in s for s in summary.values()):
        print(f"\n{'convexAdam package':24s}{'discrete+LTS':>14s}{'time s':>9s}{'+Adam, LTS':>12s}{'time s':>9s}   (n)")
        for kind, s in summary.items():
            if "convexadam_adam_mm" in s:
                print(f"{kind:24s}{s['convexadam_discrete_mm']['median']:14.2f}{s['convexadam_discrete_s']['median']:9.1f}"
                      f"{s['convexadam_adam_mm']['median']:12.2f}{s['convexadam_adam_s']['median']:9.1f}"
                      f"   ({s['convexadam_adam_mm']['n']})")
    for file in sorted({skip["file"] for skip in skipped}):
        why = next(skip["why"] for skip in skipped if skip["file"] == file)
        print(f"skipped {file} ({sum(skip['file'] == file for skip in skipped)} moves): {why}")
    write_json({"summary": summary, "cases": rows, "skipped": skipped,
                "settings": {"moves": args.moves, "seed": args.seed, "kinds": kinds},
                "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
