"""The liver model on the one real CT at hand, under every phase label a user could give it.

`../shared/data/abdomen/example_ct.nii.gz` is a real unenhanced (plain) whole-abdomen CT, 3 mm,
112 slices. Each run gives it to `segment_study` as one phase (plain, arterial, venous, delayed:
a user may label it wrongly) and reports what a clinician would check:
- liver Dice against `example_seg.nii.gz`'s liver label (label 5). That label is itself a
  TotalSegmentator model's output, not an expert's, and covers 30 of the 112 slices; it is placed
  as `abdomen.load_abdomen` places it, and the few centimetres beyond its cut where the liver may
  go on unlabelled are left out of the score (as everywhere in this project);
- the found liver's volume (mL) and superior-inferior extent (mm), the localiser's slab;
- each lesion's volume and mean HU on the plain CT, and the tissue the HU says it sits in
  (fat < -30 HU, bone > 200 HU on the plain CT);
- the plausibility verdict (`plausibility.py`): reliable or not, and why.

    python benchmarks/liver_real_ct.py --json benchmarks/results/liver_real_ct_cpu.json [--model M --localiser L]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "LiverLesionSeg")]

import numpy as np  # noqa: E402
from LiverLesionSegLib.abdomen import LABELS, UNKNOWN, load_abdomen  # noqa: E402
from LiverLesionSegLib.evaluation import dice  # noqa: E402
from LiverLesionSegLib.model_io import load_model  # noqa: E402
from LiverLesionSegLib.pipeline import segment_study  # noqa: E402
from LiverLesionSegLib.simulator import PHASES  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "abdomen"


def tissue(hu: float) -> str:
    return "fat" if hu < -30 else "bone" if hu > 200 else "soft tissue"


def run(model, abdomen, phase: str) -> dict:
    t0 = time.perf_counter()
    result = segment_study(model, {phase: abdomen.ct})
    seconds = time.perf_counter() - t0
    known = abdomen.labels.array != UNKNOWN
    truth = abdomen.labels.array == LABELS["liver"]
    liver = result.liver.array > 0
    spacing = abdomen.ct.spacing
    slices = np.nonzero(liver.any(axis=(1, 2)))[0]
    lesions = [{"volume_ml": r["volume_ml"], "mean_hu": r["mean_hu"][phase], "tissue": tissue(r["mean_hu"][phase])}
               for r in result.statistics]
    return {
        "phase_label": phase,
        "liver_dice": round(dice(liver & known, truth & known), 3),
        "liver_volume_ml": round(float(liver.sum() * np.prod(spacing) / 1000), 1),
        "liver_extent_mm": round(float((slices[-1] - slices[0] + 1) * spacing[2]), 1) if len(slices) else 0.0,
        "liver_slices": [int(slices[0]), int(slices[-1])] if len(slices) else None,
        "series_slices": int(liver.shape[0]),
        "localiser_slab": None if result.slab is None else dict(zip(("first", "stop", "of"), result.slab, strict=True)),
        "lesion_count": len(lesions),
        "lesion_volume_ml": round(sum(r["volume_ml"] for r in lesions), 1),
        "lesions_in_fat_or_bone": sum(r["tissue"] != "soft tissue" for r in lesions),
        "lesion_mean_hu_range": [min(r["mean_hu"] for r in lesions), max(r["mean_hu"] for r in lesions)]
        if lesions else None,
        "reliable": result.plausibility.reliable,
        "reasons": result.plausibility.reasons,
        "runtime_s": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="default: the shipped model with the shipped localiser")
    parser.add_argument("--localiser", type=Path)
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    args = parser.parse_args()
    configure_threads()
    model = load_model(args.model, "cpu", localiser=args.localiser)
    abdomen = load_abdomen(DATA / "example_ct.nii.gz", DATA / "example_seg.nii.gz")
    rows = []
    for phase in args.phases:
        rows.append(run(model, abdomen, phase))
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": " ".join(sys.argv), "machine": machine_description(),
              "model": str(model.path), "localiser": str(model.localiser.path) if model.localiser else None,
              "reference": "example_seg.nii.gz label 5: a TotalSegmentator model's output, not expert truth",
              "runs": rows}
    write_json(report, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
