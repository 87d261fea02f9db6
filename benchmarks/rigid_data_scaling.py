"""Is the rigid network short of training patients, or of training steps?

The rigid network's landmark TRE (mm, on the 1 mm fusion grid) on frames of patients it was
trained on and on unseen ones (the evaluation's, `evaluate --seed S`) tells the two apart:
- the shipped network as it is, on the training patients and on unseen ones;
- then, for N = 20, 60, 180 training patients, its last two convolutions and its fully connected
  layer fine-tuned for many steps on the first N, with the first three convolutions frozen so
  that their output (32 x 32^3 per pair) can be computed once and cached: ~0.03 s per pair
  against ~1.2 s for the whole network's step on this CPU, so one run passes 12,000 pairs where
  a stage of `fusion train` (16 epochs x 75 steps of one pair) passed 1,200. Each training frame
  enters as itself and moved by a few random rigid augmentations (as `fusion train
  --augment-shift/--augment-rotation`),
  the loss is the landmark term alone (known truth; a diagnostic, not the spec's label-only
  training), and the weights after the last step are scored (none is chosen by the unseen score).

If the fine-tuned layers fit their training frames far better than unseen frames, and the unseen
error falls only slowly with N, the network needs many more distinct patients, not more steps on
the same ones.

    python benchmarks/rigid_data_scaling.py --cache /tmp/patients --json rigid_data_scaling.json

Synthetic patients take ~10 s each per core to make; `--cache DIR` keeps each one (~30 MB) so a
rerun starts at once.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib.dataset import patient_samples, synthetic_samples, training_seeds  # noqa: E402
from MRUSFusionLib.evaluation import case_seeds  # noqa: E402
from MRUSFusionLib.model_io import load_model  # noqa: E402
from MRUSFusionLib.networks import GRID  # noqa: E402
from MRUSFusionLib.training import Batch, TrainConfig, make_batch, stage_lr  # noqa: E402
from MRUSFusionLib.warp import apply_affine_to_positions, compose_matrices, grid_centre, rigid_matrix  # noqa: E402

FROZEN = 3  # convolutions of RigidNet.features computed once and cached
TRAINING_RUN_SEED = 10  # training patients: those of `fusion train --seed 10`, which no shipped stage used
SHIPPED_STAGE_RUN_SEED = 7  # the shipped network's last stage: `fusion train --synthetic 256 --seed 7`


def patients(seeds: list[int], frames: int, cache: Path | None) -> list[list]:
    """Each patient's samples, made in parallel, or read from `cache` where made before."""
    paths = {s: cache / f"{s}_{frames}.pkl" for s in seeds} if cache else {}
    missing = [s for s in seeds if not (cache and paths[s].exists())]
    made = dict(zip(missing, synthetic_samples(missing, frames), strict=True)) if missing else {}
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
        for s, samples in made.items():
            paths[s].write_bytes(pickle.dumps(samples))
    return [made[s] if s in made else pickle.loads(paths[s].read_bytes()) for s in seeds]


class Encoded:
    """Cached frozen features (float16), each with the augmentation that moved its US (grid ->
    original US, (3, 4) voxels) and its landmarks ((L, 2, 3): MR position, true US position)."""

    def __init__(self):
        self.features, self.augmentation, self.landmarks = [], [], []

    @torch.no_grad()
    def add(self, model, batch: Batch) -> None:
        """A frame without landmarks in view has nothing to score: left out."""
        if batch.landmarks is None:
            return
        self.features.append(model.rigid.features[:FROZEN](torch.cat([batch.fixed, batch.moving_in], 1))[0].half())
        self.augmentation.append(batch.augmentation[0])
        self.landmarks.append(batch.landmarks)


def rigid_head(model) -> torch.nn.ModuleDict:
    """The trainable part: convolutions after the frozen ones and the fully connected layer."""
    return copy.deepcopy(torch.nn.ModuleDict({"late": model.rigid.features[FROZEN:], "fc": model.rigid.fc}))


def predict(model, head, features: torch.Tensor, augmentation: torch.Tensor) -> torch.Tensor:
    """(N, 3, 4) grid -> original-US matrices: the head's rigid map composed with the augmentation."""
    raw = head["fc"](head["late"](features).flatten(1))
    params = torch.cat([raw[:, :3] * model.rigid.translation_scale, raw[:, 3:] * model.rigid.rotation_scale], 1)
    return compose_matrices(augmentation, rigid_matrix(params, grid_centre(GRID)))


def distances(matrix: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """(L,) mm between where the (3, 4) matrix sends the MR landmarks and their true US positions.
    The matrix applied to the points themselves: training's `landmark_error` interpolates a
    128^3 field (exact for an affine one), which here would cost 25 MB per pair per step."""
    x, truth = landmarks.unbind(1)
    return torch.linalg.norm(apply_affine_to_positions(matrix[None], x.T[None])[0].T - truth, dim=1)


@torch.no_grad()
def tre(model, head, data: Encoded) -> dict:
    errors = [distances(predict(model, head, f[None].float(), a[None])[0], lm)
              for f, a, lm in zip(data.features, data.augmentation, data.landmarks, strict=True)]
    return spread(torch.cat(errors).tolist())


def fine_tune(model, data: Encoded, args, rng: np.random.Generator) -> torch.nn.ModuleDict:
    head = rigid_head(model)
    optimiser = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = TrainConfig(rigid_epochs=1, steps_per_epoch=args.steps, lr_rigid=args.lr)  # training's cosine decay
    for step in range(args.steps):
        for group in optimiser.param_groups:
            group["lr"] = stage_lr(schedule, "rigid", 0, step)
        pick = rng.choice(len(data.features), args.batch, replace=False)
        matrices = predict(model, head, torch.stack([data.features[i] for i in pick]).float(),
                           torch.stack([data.augmentation[i] for i in pick]))
        loss = torch.stack([distances(m, data.landmarks[i]).mean() for m, i in zip(matrices, pick, strict=True)]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if (step + 1) % 250 == 0:
            print(f"  step {step + 1}/{args.steps}: training loss {loss.item():.2f} mm", flush=True)
    return head


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-patients", type=int, nargs="+", default=[20, 60, 180])
    parser.add_argument("--frames", type=int, default=3, help="frames per training patient")
    parser.add_argument("--augmentations", type=int, default=3, help="randomly moved copies of each training frame")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--shipped-patients", type=int, default=20,
                        help="patients of the shipped network's last training stage to score it on")
    parser.add_argument("--cases", type=int, default=20, help="unseen patients (the evaluation's, 2 frames each)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    model = load_model(args.model, "cpu").eager().eval()
    rng = np.random.default_rng(0)
    # the shipped stages' augmentation (`fusion train --augment-shift 8 --augment-rotation 6`), by training's make_batch
    augment = TrainConfig(augment_shift=8.0, augment_rotation_deg=6.0)
    started = time.perf_counter()

    unseen = Encoded()
    for seed in case_seeds(args.cases, args.seed):
        for sample in patient_samples(seed, frames=2):
            unseen.add(model, make_batch(sample, augment, "cpu"))
    n_max = max(args.train_patients)
    print(f"making or reading {n_max} training patients x {args.frames} frames", flush=True)
    # each frame with landmarks in view as it is, then in its moved copies: the frames as they
    # are (scored) are every `per_frame`-th item
    training, per_frame = Encoded(), 1 + args.augmentations
    counts = []  # items encoded after each patient
    for samples in patients(training_seeds(TRAINING_RUN_SEED, n_max), args.frames, args.cache):
        for sample in samples:
            training.add(model, make_batch(sample, augment, "cpu"))
            for _ in range(args.augmentations):
                training.add(model, make_batch(sample, augment, "cpu", rng))
        counts.append(len(training.features))
    own = Encoded()  # frames the shipped network's last stage trained on
    for samples in patients(training_seeds(SHIPPED_STAGE_RUN_SEED, args.shipped_patients), args.frames, args.cache):
        for sample in samples:
            own.add(model, make_batch(sample, augment, "cpu"))

    def first(data: Encoded, items: int, every: int = 1) -> Encoded:
        part = Encoded()
        for name in ("features", "augmentation", "landmarks"):
            setattr(part, name, getattr(data, name)[:items:every])
        return part

    shipped = rigid_head(model)
    rows = [{"training patients": 0, "what": "shipped rigid network", "training frames": tre(model, shipped, own),
             "unseen": tre(model, shipped, unseen)}]
    for n in sorted(args.train_patients):
        print(f"fine-tuning on {n} patients ({counts[n - 1]} cached pairs)", flush=True)
        head = fine_tune(model, first(training, counts[n - 1]), args, rng)
        rows.append({"training patients": n, "what": "last layers fine-tuned",
                     "training frames": tre(model, head, first(training, counts[n - 1], per_frame)),
                     "unseen": tre(model, head, unseen)})
    print(f"\n{'rigid network':32s}{'train median':>14s}{'unseen median':>15s}{'unseen p90':>12s}")
    for r in rows:
        name = r["what"] + (f", {r['training patients']} patients" if r["training patients"] else "")
        print(f"{name:32s}{r['training frames']['median']:14.2f}{r['unseen']['median']:15.2f}{r['unseen']['p90']:12.2f}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json", "cache")}
    scored = (f"the first N patients' frames, unmoved; the shipped row: the first {args.shipped_patients} patients "
              "of its last training stage (seed 7)")
    write_json({"what": __doc__.splitlines()[0], "rows": rows, "training_frames_scored": scored,
                "settings": settings, "minutes": round((time.perf_counter() - started) / 60, 1),
                "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
