"""Where a correction's time goes, per frame, on this machine: the first frame of a patient (the
MR's resampling and features made for its registration region) and the next frames on the same
region (the MR's share reused, as the service and `fusion register` over a sweep do), with and
without a liver mask, split by stage (MR features, US features, searches, refinement).

For each unseen synthetic patient (`evaluate`'s seeds): the network's answer for frames 0 and 1,
then the correction of frame 0 with an empty MR-side cache, and of frames 1 and 0 again with it
(the phantom's frames share one probe pose, so one region). The load average is stored with each
run: on a shared 2-core machine the times follow it.

    python benchmarks/correction_time.py --cases 3 --json benchmarks/results/fusion_correction_time_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import torch  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib.evaluation import case_seeds  # noqa: E402
from MRUSFusionLib.model_io import load_model  # noqa: E402
from MRUSFusionLib.phantom import make_patient  # noqa: E402
from MRUSFusionLib.preprocess import registration_region  # noqa: E402
from MRUSFusionLib.registration import MRSideCache, correct_registration, register  # noqa: E402

STAGES = ("mr_features", "us_features", "discrete", "refine", "total")


def stages(timings: dict) -> dict:
    """The correction's timings as disjoint stages (its 'features' is cumulative, MR side first)."""
    return {"mr_features": timings["mr_features"], "us_features": timings["features"] - timings["mr_features"],
            "discrete": timings["discrete"], "refine": timings["refine"], "total": timings["total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (patients seed * 100 + i)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    torch.set_flush_denormal(True)
    model = load_model(None, "cpu")
    runs = []
    for patient_seed in case_seeds(args.cases, args.seed):
        patient = make_patient(patient_seed, frames=2)
        for liver in (patient.liver, None):
            networks = [register(model, patient.mr, f.image, liver=liver, correct=False).network_transforms()
                        for f in patient.frames]
            cache = MRSideCache()
            for kind, index in (("first frame", 0), ("next frame", 1), ("next frame", 0)):
                us = patient.frames[index].image
                region = registration_region(patient.mr, us, liver)
                c = correct_registration(patient.mr, us, region, network=networks[index], liver=liver, mr_side=cache)
                row = {"patient_seed": patient_seed, "liver_mask": liver is not None, "frame": index, "kind": kind,
                       "mr_side_reused": cache.hits > 0 and kind == "next frame", "load_average_1min": os.getloadavg()[0],
                       **stages(c.timings)}
                runs.append(row)
                print(f"patient {patient_seed} {'liver mask' if liver is not None else 'no mask   '} {kind:11s} "
                      + "  ".join(f"{s} {row[s]:5.2f}" for s in STAGES) + f"  (load {row['load_average_1min']:.1f})",
                      flush=True)
    summary = {}
    print(f"\n{'seconds, median (max)':34s}" + "".join(f"{s:>18s}" for s in STAGES))
    for mask in (True, False):
        for kind in ("first frame", "next frame"):
            rows = [r for r in runs if r["liver_mask"] == mask and r["kind"] == kind]
            name = f"{'liver mask' if mask else 'no mask'}, {kind}"
            summary[name] = {s: spread(r[s] for r in rows) for s in STAGES}
            print(f"{name:34s}" + "".join(f"{summary[name][s]['median']:11.2f} ({summary[name][s]['max']:4.1f})"
                                          for s in STAGES))
    write_json({"summary": summary, "runs": runs, "settings": vars(args) | {"json": str(args.json)},
                "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
