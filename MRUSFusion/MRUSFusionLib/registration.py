"""Register a US volume to the MR with a loaded cascade: the one entry point for the command
line, the demo, the evaluation, the streaming service and the Slicer module."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepnav.imaging import Volume, write_volume
from MRUSFusionLib import fields, losses
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.preprocess import FusionPair, prepare_pair
from MRUSFusionLib.warp import compose_affine, compose_matrices, jacobian_determinant


@dataclasses.dataclass
class Registration:
    pair: FusionPair
    warped: np.ndarray  # US resampled into the fusion grid through phi, float32 (128^3)
    disp_ijk: np.ndarray  # composed phi(x) - x, (3, 128, 128, 128) voxels (i, j, k)
    bspline_ijk: np.ndarray  # the B-spline stage's u, same layout
    matrix_ijk: np.ndarray  # (3, 4) rigid, voxel space
    timings: dict[str, float]

    @property
    def grid(self) -> Volume:
        return self.pair.grid

    def rigid_transform(self) -> sitk.AffineTransform:
        """The rigid stage in LPS mm, resampling convention (MR point -> US point)."""
        return fields.rigid_to_lps(self.matrix_ijk, self.grid)

    def transform(self) -> sitk.CompositeTransform:
        """The full cascade in LPS mm, valid everywhere (rigid outside the 128 mm grid)."""
        return fields.composite_lps(self.matrix_ijk, self.bspline_ijk, self.grid)

    def map_points_lps(self, points_mr: np.ndarray, rigid_only: bool = False) -> np.ndarray:
        """Where MR points (N, 3, LPS mm) are found in the US, through the exported transform."""
        return fields.transform_points(self.rigid_transform() if rigid_only else self.transform(), points_mr)

    def folding_percent(self) -> float:
        """Share of voxels where the Jacobian determinant of phi is <= 0 (folding), percent."""
        det = jacobian_determinant(torch.from_numpy(self.disp_ijk)[None])
        return float(100.0 * (det <= 0).float().mean())

    @torch.no_grad()
    def quality(self) -> dict[str, float]:
        """Similarity before/after (MIND distance at 2 mm, lower is better, in the US field of
        view) and folding. At 2 mm the pair costs ~0.1 s instead of ~1 s on two CPU cores,
        cheap enough for every streamed frame."""
        def half(a: np.ndarray) -> torch.Tensor:
            return F.avg_pool3d(torch.from_numpy(a)[None, None], 2)

        fixed, fov = half(self.pair.fixed), half(self.pair.fov)
        before = float(losses.mind_loss(fixed, half(self.pair.moving), fov))
        after = float(losses.mind_loss(fixed, half(self.warped), fov))
        return {"mind_before": before, "mind_after": after, "folding_percent": self.folding_percent()}

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Transforms (rigid.tfm, field.nrrd, transform.h5) and the warped US in the fusion grid."""
        paths = fields.write_transforms(out_dir, self.matrix_ijk, self.disp_ijk, self.bspline_ijk, self.grid)
        paths["warped_us"] = write_volume(self.grid.with_array(self.warped), out_dir / "warped_us.nrrd")
        return paths


def run_network(model: LoadedModel, pair: FusionPair) -> tuple[tuple[torch.Tensor, ...], float]:
    """One forward pass on a preprocessed pair; returns CPU tensors and its wall time (s)."""
    fixed = torch.from_numpy(pair.fixed)[None, None]
    moving = torch.from_numpy(pair.moving)[None, None]
    t0 = time.perf_counter()
    outputs = model(fixed, moving)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    elapsed = time.perf_counter() - t0
    return tuple(o.float().cpu() for o in outputs), elapsed


def register_pair(model: LoadedModel, pair: FusionPair, timings: dict | None = None) -> Registration:
    (warped, disp, matrix, u), elapsed = run_network(model, pair)
    timings = dict(timings or {})
    timings["network"] = elapsed
    return Registration(pair, warped[0, 0].numpy(), disp[0].numpy(), u[0].numpy(), matrix[0].numpy(), timings)


def register(model: LoadedModel, mr: Volume, us: Volume, *, liver: Volume | None = None,
             initial: sitk.Transform | None = None, grid: Volume | None = None,
             fixed: np.ndarray | None = None) -> Registration:
    """Resample MR and US into the fusion grid (US coarsely aligned, or through `initial`) and run.
    `grid` and `fixed` (see `prepare_pair`) reuse the MR's preprocessing across frames."""
    t0 = time.perf_counter()
    pair = prepare_pair(mr, us, liver=liver, initial=initial, grid=grid, fixed=fixed)
    result = register_pair(model, pair, {"preprocess": time.perf_counter() - t0})
    if initial is not None:
        fold_initial(result, initial)
    return result


def fold_initial(result: Registration, initial: sitk.Transform) -> None:
    """The network saw the US resampled through `initial` (a linear transform, e.g. from paired
    fiducials): the transforms out must map MR points all the way to the original US,
    x -> initial(R(x + u(x))), so `initial` is composed into the rigid matrix and the field."""
    outer = fields.affine_lps_to_ijk(initial, result.grid)
    outer_t = torch.from_numpy(outer).float()[None]
    result.disp_ijk = compose_affine(outer_t, torch.from_numpy(result.disp_ijk)[None])[0].numpy()
    inner = torch.from_numpy(result.matrix_ijk).double()[None]
    result.matrix_ijk = compose_matrices(torch.from_numpy(outer)[None], inner)[0].numpy()
