"""The spec's per-patient workflow, measured: fine-tune on 8 US frames spread over one patient's half
breathing cycle, then register that patient's other frames (the patent: 8 training, 7 test).

Compares, on the held-out frames of one unseen synthetic patient: the coarse initial alignment, the
shipped generic model, and the model fine-tuned on this patient (`deepnav fusion train --init`).
Prints a table and writes JSON.

    python benchmarks/per_patient.py --json per_patient.json [--seed 100 --bspline-epochs 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib import model_io, training  # noqa: E402
from MRUSFusionLib.evaluation import landmark_errors  # noqa: E402
from MRUSFusionLib.phantom import make_patient  # noqa: E402
from MRUSFusionLib.preprocess import prepare_pair  # noqa: E402
from MRUSFusionLib.registration import register_pair  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=100, help="patient seed (unseen by the shipped model)")
    parser.add_argument("--frames", type=int, default=15)
    parser.add_argument("--train-frames", type=int, default=8)
    parser.add_argument("--rigid-epochs", type=int, default=3)
    parser.add_argument("--bspline-epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    patient = make_patient(args.seed, frames=args.frames)
    train_idx = sorted({int(round(i)) for i in np.linspace(0, args.frames - 1, args.train_frames)})
    test_idx = [i for i in range(args.frames) if i not in train_idx]
    pairs = [prepare_pair(patient.mr, f.image, liver=patient.liver, mr_vessels=patient.vessels, us_vessels=f.vessels)
             for f in patient.frames]
    samples = [training.Sample.from_pair(pairs[i]) for i in train_idx]
    shipped = model_io.load_model(None, "cpu")
    config = training.TrainConfig(rigid_epochs=args.rigid_epochs, bspline_epochs=args.bspline_epochs,
                                  steps_per_epoch=args.steps, augment_shift=2.0, augment_rotation_deg=2.0, seed=1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # no frame is held out of the 8 for validation: the best epoch is chosen on them, the 7 stay unseen
        tuned, _ = training.train(samples, samples, Path(tmp), config, init_state=shipped.eager().state_dict())
    train_s = time.perf_counter() - t0
    tuned_model = model_io.LoadedModel(tuned.eval(), shipped.metadata, torch.device("cpu"), Path("fine-tuned"))
    rows = []
    for i in test_idx:
        frame = patient.frames[i]
        base = landmark_errors(register_pair(shipped, pairs[i]), patient, frame)
        tuned_err = landmark_errors(register_pair(tuned_model, pairs[i]), patient, frame)
        rows.append({"frame": i, "initial_mm": float(np.median(base["initial"])),
                     "shipped_mm": float(np.median(base["final"])), "fine_tuned_mm": float(np.median(tuned_err["final"])),
                     "fine_tuned_rigid_mm": float(np.median(tuned_err["rigid"]))})
    keys = ("initial_mm", "shipped_mm", "fine_tuned_rigid_mm", "fine_tuned_mm")
    summary = {k: float(np.median([r[k] for r in rows])) for k in keys}
    print(f"patient {args.seed}: trained on frames {train_idx} in {train_s:.0f} s, tested on frames {test_idx}")
    print(f"{'median landmark TRE over test frames':40s}{'mm':>8s}")
    for k, v in summary.items():
        print(f"  {k:38s}{v:8.2f}")
    write_json({"summary": summary, "frames": rows, "train_frames": train_idx, "test_frames": test_idx,
                "training_seconds": train_s, "config": config.to_json(), "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
