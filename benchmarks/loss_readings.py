"""Which reading of the spec's loss weights is better? (MRUSFusion.md: alpha = 0.01, beta = 100,
gamma = 1, the formula itself missing from the patent text.)

  A (shipped): L = 0.01 * label + 100 * MIND + 1 * smoothness   (MIND main, labels auxiliary)
  B:           L = 100 * label + 0.01 * MIND + 1 * smoothness   (labels main)

Both train the B-spline stage with the same budget, seeds and data, from the same rigid stage
(the shipped model's), then are evaluated on the same unseen synthetic patients. Prints a table
and writes JSON.

    python benchmarks/loss_readings.py --json loss_readings.json [--patients 6 --epochs 6 --cases 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import torch  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.progress import print_progress  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib import dataset, losses, model_io, training  # noqa: E402
from MRUSFusionLib.evaluation import evaluate  # noqa: E402
from MRUSFusionLib.networks import Cascade  # noqa: E402

READINGS = {"A_mind_main": losses.LossWeights(label=0.01, mind=100.0, smooth=1.0),
            "B_label_main": losses.LossWeights(label=100.0, mind=0.01, smooth=1.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=6, help="synthetic training patients (+1 for validation)")
    parser.add_argument("--epochs", type=int, default=6, help="B-spline epochs per reading")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2, help="evaluation seed (unseen patients)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    shipped = model_io.load_model(None, "cpu")
    rigid_state = {k: v for k, v in shipped.eager().state_dict().items() if k.startswith("rigid.")}
    seeds = [dataset.TRAINING_SEED_BASE + 500_000 + i for i in range(args.patients + 1)]
    print_progress(0.0, f"generating {len(seeds)} synthetic patients")
    pools = dataset.synthetic_samples(seeds, frames=8)
    train_samples = [s for pool in pools[:-1] for s in pool]
    val_samples = [pools[-1][i] for i in (1, 4, 7)]
    results = {}
    for name, weights in READINGS.items():
        config = training.TrainConfig(rigid_epochs=0, bspline_epochs=args.epochs, steps_per_epoch=args.steps,
                                      weights=weights, seed=7)
        torch.manual_seed(7)
        init = Cascade().state_dict()  # fresh B-spline network, shipped rigid network
        init.update(rigid_state)
        with tempfile.TemporaryDirectory() as tmp:
            model, info = training.train(train_samples, val_samples, Path(tmp), config, init_state=init)
            path = Path(tmp) / "model.pt"
            model_io.save_torchscript(model, path, {"training": {"patient_seeds": seeds}})
            report = evaluate(model_io.load_model(path, "cpu"), args.cases, args.seed, baseline=False)
        results[name] = {"weights": weights.__dict__, "best_validation": info["best"], "summary": report["summary"]}
    print(f"{'reading':16s}{'TRE median':>12s}{'TRE p90':>10s}{'Dice':>8s}{'folding %':>11s}")
    for name, r in results.items():
        s = r["summary"]
        print(f"{name:16s}{s['tre_final_mm']['median']:12.2f}{s['tre_final_mm']['p90']:10.2f}"
              f"{s['dice_vessels_final']:8.3f}{s['folding_percent']:11.4f}")
    better = min(results, key=lambda n: results[n]["summary"]["tre_final_mm"]["median"])
    print(f"better by median TRE: {better}")
    write_json({"results": results, "better": better, "settings": vars(args) | {"json": str(args.json)},
                "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
