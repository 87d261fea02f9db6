"""Where the cascade's error comes from, and what inference-time changes could remove.

On unseen synthetic patients (the evaluation's, `evaluate --seed S`), landmark TRE (mm) on the
1 mm fusion grid of:
- the coarse initial alignment;
- the best rigid map to the landmarks themselves (least squares on the known truth): what a
  perfect rigid stage would leave, i.e. the non-rigid part of the breathing motion;
- the rigid network, the rigid network applied twice (its output warped and registered again),
  and the rigid network averaged over test-time augmentations (the US moved by known rigid
  shifts, each prediction mapped back, the matrices averaged);
- the cascade (rigid network + B-spline network).
It also prints the MIND distance (2 mm, as `Registration.quality`, lower is better) at the
identity, at the best rigid map and at the network's: whether MIND could drive a test-time
refinement towards the truth.

    python benchmarks/rigid_headroom.py --cases 20 --seed 1 --json rigid_headroom.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "MRUSFusion")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deepnav.command_line import write_json, wrote  # noqa: E402
from deepnav.errors import InputError  # noqa: E402
from deepnav.statistics import spread  # noqa: E402
from deepnav.torch_runtime import configure_threads, machine_description  # noqa: E402
from MRUSFusionLib import losses  # noqa: E402
from MRUSFusionLib.alignment import rigid_from_fiducials  # noqa: E402
from MRUSFusionLib.dataset import patient_samples  # noqa: E402
from MRUSFusionLib.evaluation import case_seeds  # noqa: E402
from MRUSFusionLib.model_io import load_model  # noqa: E402
from MRUSFusionLib.networks import GRID  # noqa: E402
from MRUSFusionLib.warp import affine_displacement, compose_affine, compose_matrices, grid_centre, map_points, rigid_matrix, warp  # noqa: E402

ROWS = ("initial", "best rigid map (truth)", "rigid network", "rigid network twice",
        "rigid network, 8 test-time augmentations", "cascade")


def moved(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return warp(image, affine_displacement(matrix, list(image.shape[2:])))


def apply(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Points (P, 3) through a (1, 3, 4) grid-to-US matrix, by the same path as training's
    landmark term (`map_points` on its field: exact, the field is affine)."""
    return map_points(affine_displacement(matrix, [GRID] * 3), points)


def mind_at(matrix: torch.Tensor, fixed: torch.Tensor, moving: torch.Tensor, fov: torch.Tensor) -> float:
    half = [F.avg_pool3d(t, 2) for t in (fixed, moved(matrix, moving), moved(matrix, fov))]
    return float(losses.mind_loss(half[0], half[1], (half[2] > 0.5).float()))


@torch.no_grad()
def frame_errors(model, sample, augmentations: list[torch.Tensor]) -> dict:
    fixed, moving, fov, _, _ = sample.tensors("cpu")
    x, truth = sample.landmarks_ijk[:, 0], sample.landmarks_ijk[:, 1]
    # least squares works in any Cartesian frame: here grid voxels (1 mm), not LPS
    best = torch.from_numpy(rigid_from_fiducials(x.double().numpy(), truth.double().numpy()).matrix_lps[:3]).float()[None]
    net = model.rigid_stage(fixed, moving)
    net_warped = moved(net, moving)  # what the second pass and the B-spline network both see
    twice = compose_matrices(net, model.rigid_stage(fixed, net_warped))
    # each augmented prediction maps back to the original US through its augmentation
    tta = torch.stack([compose_matrices(a, model.rigid_stage(fixed, moved(a, moving)))[0] for a in augmentations]).mean(0)
    u, _, vt = torch.linalg.svd(tta[:, :3])
    tta = torch.cat([u @ vt, tta[:, 3:]], 1)[None]  # nearest rotation to the mean
    cascade = compose_affine(net, model.dense_field(fixed, net_warped))
    predicted = [x, apply(best, x), apply(net, x), apply(twice, x), apply(tta, x), map_points(cascade, x)]
    identity = torch.eye(3, 4)[None]
    return {"errors": [(p - truth).norm(dim=1).tolist() for p in predicted],
            "mind": {"identity": mind_at(identity, fixed, moving, fov), "best rigid map": mind_at(best, fixed, moving, fov),
                     "rigid network": mind_at(net, fixed, moving, fov)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    configure_threads()
    model = load_model(args.model, "cpu").eager().eval()
    rng = np.random.default_rng(0)
    # the US as it is, and moved by 7 random rigid shifts (up to 4 voxels, 3 degrees)
    augmentations = [torch.eye(3, 4)[None]] + [
        rigid_matrix(torch.tensor([[*rng.uniform(-4, 4, 3), *np.deg2rad(rng.uniform(-3, 3, 3))]], dtype=torch.float32),
                     grid_centre(GRID)) for _ in range(7)]
    errors, minds = [[] for _ in ROWS], []
    for n, seed in enumerate(case_seeds(args.cases, args.seed)):
        for sample in patient_samples(seed, frames=2):
            try:
                frame = frame_errors(model, sample, augmentations)
            except InputError:  # fewer than 3 landmarks in view, or all on a line: no rigid fit
                continue
            for row, e in zip(errors, frame["errors"], strict=True):
                row.extend(e)
            minds.append(frame["mind"])
        print(f"case {n + 1}/{args.cases}: rigid network {np.median(errors[2]):.2f} mm so far", flush=True)
    summary = {name: spread(e) for name, e in zip(ROWS, errors, strict=True)}
    mind = {k: float(np.median([m[k] for m in minds])) for k in minds[0]}
    lowest = int(sum(m["best rigid map"] < min(m["identity"], m["rigid network"]) for m in minds))
    print(f"\n{'landmark TRE (mm), ' + str(len(minds)) + ' frames':44s}{'median':>8s}{'p90':>8s}")
    for name, s in summary.items():
        print(f"{name:44s}{s['median']:8.2f}{s['p90']:8.2f}")
    print("MIND distance at 2 mm, median over frames: " + ", ".join(f"{k} {v:.4f}" for k, v in mind.items()))
    print(f"frames where the best rigid map has the lowest MIND of the three: {lowest} of {len(minds)}")
    write_json({"what": __doc__.splitlines()[0], "summary": summary, "mind_median": mind,
                "frames_best_rigid_map_lowest_mind": lowest, "frames": len(minds),
                "settings": {"cases": args.cases, "seed": args.seed, "frames_per_case": 2,
                             "model": str(args.model or "shipped")},
                "machine": machine_description()}, args.json)
    wrote(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
