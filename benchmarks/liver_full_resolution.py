"""`deepnav liver segment` on a full-resolution two-phase CT, measured as a user runs it: one
process per run (Python and torch start-up, model load, reading the files, registration,
resampling, inference, writing), wall time and peak memory (the child's max RSS) per run.

The study is simulated on a scanner's grid, not on the liver's box: 512 x 512 x 130 voxels of
0.75 x 0.75 x 2.5 mm around the real abdominal CT (arterial reference, venous misaligned by a known
rigid motion), so the body crop, the working grid and the number of windows are those of a real
series. Both registrations are run side by side (the shipped PSO + Powell and SimpleITK's Mattes
MI); lesion and liver Dice and lesion recall are scored against the simulator's labels on the
full-resolution grid (leaving out, as `deepnav liver evaluate` does, the few centimetres beyond the
real CT's organ labels where the liver may go on unlabelled).

    python benchmarks/liver_full_resolution.py --runs 2 --json benchmarks/results/liver_full_resolution_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "LiverLesionSeg")]

import numpy as np  # noqa: E402
from LiverLesionSegLib.abdomen import load_abdomen  # noqa: E402
from LiverLesionSegLib.evaluation import score_case  # noqa: E402
from LiverLesionSegLib.simulator import simulate_case  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.imaging import grid_like, read_volume, write_volume  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import machine_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "abdomen"
SIZE_IJK = (512, 512, 130)
SPACING_MM = (0.75, 0.75, 2.5)


def scanner_grid(ct) -> object:
    """SIZE_IJK at SPACING_MM (LPS, axial), centred on the CT's field of view."""
    origin = ct.centre_lps() - (np.array(SIZE_IJK) - 1) / 2.0 * np.array(SPACING_MM)
    return grid_like(SIZE_IJK, SPACING_MM, origin, np.eye(3))


def run_segment(phases: dict[str, Path], registration: str, model: Path | None, out: Path) -> dict:
    """One `deepnav liver segment` process: wall seconds, peak RSS (MiB), its stage timings."""
    command = [sys.executable, "-c", "import sys; from deepnav.cli import main; sys.exit(main())", "liver", "segment",
               *[f"--phase={name}={path}" for name, path in phases.items()], "--registration", registration,
               "--out", str(out), *(["--model", str(model)] if model else [])]
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"deepnav liver segment failed:\n{(out / 'log.txt').read_text()}")
    statistics = json.loads((out / "lesions.json").read_text())
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024.0, "stages_s": statistics["timings_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2_000_000, help="simulation seed (outside the training seeds)")
    parser.add_argument("--model", type=Path, help="default: the shipped model")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    abdomen = load_abdomen(DATA / "example_ct.nii.gz", DATA / "example_seg.nii.gz")
    t0 = time.perf_counter()
    case = simulate_case(abdomen, args.seed, phases=("arterial", "venous"), grid=scanner_grid(abdomen.ct))
    print(f"simulated a {'x'.join(map(str, SIZE_IJK))} two-phase study in {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{lesion.kind} {lesion.diameter_mm:.0f} mm" for lesion in case.lesion_list))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        phases = {name: write_volume(volume, Path(folder) / f"{name}.nii.gz") for name, volume in case.phases.items()}
        for registration in ("pso-powell", "sitk"):
            runs = []
            for n in range(args.runs):
                out = Path(folder) / f"{registration}-{n}"
                run = run_segment(phases, registration, args.model, out)
                lesions, liver = read_volume(out / "lesions.nii.gz").array, read_volume(out / "liver.nii.gz").array
                scores = score_case(case, lesions, liver)
                run.update({key: scores[key] for key in ("lesion_dice", "liver_dice", "lesions_found", "lesions_true",
                                                          "lesions_predicted", "lesions_correct")})
                runs.append(run)
                stages = ", ".join(f"{k} {v:.1f}" for k, v in run["stages_s"].items())
                print(f"{registration} run {n}: {run['seconds']:.1f} s, peak {run['peak_rss_mib']:.0f} MiB, "
                      f"lesion Dice {run['lesion_dice']:.3f}, liver Dice {run['liver_dice']:.3f}, "
                      f"{run['lesions_found']}/{run['lesions_true']} lesions found, "
                      f"{run['lesions_correct']}/{run['lesions_predicted']} predicted correct (stages, s: {stages})")
            results[registration] = {"runs": runs, "seconds": spread([r["seconds"] for r in runs]),
                                     "peak_rss_mib": spread([r["peak_rss_mib"] for r in runs]),
                                     # every run's scores: ITK's random sampling makes `sitk` runs differ
                                     "lesion_dice": spread([r["lesion_dice"] for r in runs]),
                                     "liver_dice": spread([r["liver_dice"] for r in runs])}
    print(f"\n{'registration':14s}{'median s':>10s}{'min-max s':>14s}{'peak MiB':>10s}"
          f"{'lesion Dice min-max':>22s}{'liver Dice min-max':>21s}")
    for name, r in results.items():
        print(f"{name:14s}{r['seconds']['median']:10.1f}{r['seconds']['min']:7.1f}-{r['seconds']['max']:<6.1f}"
              f"{r['peak_rss_mib']['max']:10.0f}{r['lesion_dice']['min']:15.3f}-{r['lesion_dice']['max']:<6.3f}"
              f"{r['liver_dice']['min']:14.3f}-{r['liver_dice']['max']:<6.3f}")
    report = {"study": {"size_ijk": SIZE_IJK, "spacing_mm": SPACING_MM, "phases": ["arterial", "venous"],
                        "seed": args.seed, "lesions": [{"kind": lesion.kind, "diameter_mm": round(lesion.diameter_mm, 1)}
                                                      for lesion in case.lesion_list]},
              "target_s": 120, "results": results, "machine": machine_description()}
    write_json(report, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
