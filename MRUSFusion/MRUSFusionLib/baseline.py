"""The classical baseline: SimpleITK rigid then B-spline registration with Mattes mutual
information, on the same preprocessed 128^3 pair the network sees (same crop, same intensity
normalisation), with bounded iterations that `BaselineSettings` states."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import SimpleITK as sitk

from MRUSFusionLib.preprocess import FusionPair


@dataclasses.dataclass
class BaselineSettings:
    histogram_bins: int = 32
    sampling: float = 0.05  # random share of the fixed voxels used by the metric
    rigid_iterations: int = 100
    # bounded so that an evaluation fits a session on 2 cores: ~45 s per pair; a 14^3 mesh with
    # 60 iterations (the network's control spacing) took over 6 minutes per pair
    bspline_mesh: int = 8
    bspline_iterations: int = 20
    shrink: tuple[int, ...] = (2, 1)  # multi-resolution pyramid
    seed: int = 1

    def describe(self) -> str:
        return (f"SimpleITK Euler3D ({self.rigid_iterations} it.) then B-spline mesh {self.bspline_mesh}^3 "
                f"(LBFGSB, {self.bspline_iterations} it.), Mattes MI {self.histogram_bins} bins, "
                f"{int(100 * self.sampling)}% sampling, pyramid {self.shrink}")


def _method(settings: BaselineSettings, fov: sitk.Image) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(settings.sampling, settings.seed)
    reg.SetMetricFixedMask(fov)  # only where the US has data
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(settings.shrink))
    reg.SetSmoothingSigmasPerLevel([s - 1.0 for s in settings.shrink])
    return reg


def register_classical(pair: FusionPair, settings: BaselineSettings | None = None) -> tuple[sitk.Transform, float]:
    """Returns a transform (fusion-grid LPS -> US LPS, resampling convention) and the runtime."""
    settings = settings or BaselineSettings()
    t0 = time.perf_counter()
    fixed = pair.grid.with_array(pair.fixed).to_sitk()
    moving = pair.grid.with_array(pair.moving).to_sitk()
    fov = sitk.Cast(pair.grid.with_array((pair.fov > 0).astype(np.uint8)).to_sitk(), sitk.sitkUInt8)

    rigid = _method(settings, fov)
    rigid.SetOptimizerAsRegularStepGradientDescent(2.0, 0.01, settings.rigid_iterations, relaxationFactor=0.7)
    rigid.SetOptimizerScalesFromPhysicalShift()
    centre = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                               sitk.CenteredTransformInitializerFilter.GEOMETRY)
    rigid.SetInitialTransform(centre, inPlace=False)
    rigid_result = rigid.Execute(fixed, moving)

    deformable = _method(settings, fov)
    bspline = sitk.BSplineTransformInitializer(fixed, [settings.bspline_mesh] * 3, order=3)
    deformable.SetMovingInitialTransform(rigid_result)
    deformable.SetInitialTransform(bspline, inPlace=True)
    deformable.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                                    numberOfIterations=settings.bspline_iterations, maximumNumberOfCorrections=5)
    deformable.Execute(fixed, moving)
    # resampling convention: p -> rigid(bspline(p)); SimpleITK applies the last-added first
    transform = sitk.CompositeTransform([rigid_result, bspline])
    return transform, time.perf_counter() - t0


def register_convexadam(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
                        region, *, instance_optimisation: bool) -> tuple[sitk.Transform, float]:
    """The published comparator, run with the authors' own package (`convexadam`, Apache-2.0,
    optional: `pip install convexadam nibabel`): MIND-SSC radius 3 / dilation 3, coupled-convex
    discrete search on a 6-voxel grid with half-width 6, inverse consistency, masks for both
    images (the package reads them from NIfTI files), optionally Adam instance optimisation (80
    iterations); then its least-trimmed-squares rigid fit of the dense field, in LPS mm.
    `fixed`, `moving` and the masks are (k, j, i) arrays on `region` (a Volume). Returns a rigid
    transform (region LPS -> moving LPS) and the runtime."""
    import tempfile
    from pathlib import Path

    try:
        import nibabel
        import torch
        from convexAdam.convex_adam_MIND import convex_adam_pt
        from convexAdam.convex_adam_utils import least_trimmed_rigid
    except ImportError as exc:
        raise RuntimeError("the convexAdam comparator needs 'pip install convexadam nibabel'") from exc
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, mask in (("fixed", fixed_mask), ("moving", moving_mask)):
            paths.append(Path(tmp) / f"{name}_mask.nii.gz")
            nibabel.save(nibabel.Nifti1Image(mask.astype(np.float32), np.eye(4)), str(paths[-1]))
        disp = convex_adam_pt(fixed.astype(np.float32), moving.astype(np.float32), mind_r=3, mind_d=3,
                              grid_sp=6, disp_hw=6, lambda_weight=1.25 if instance_optimisation else 0.0,
                              selected_niter=80, use_mask=True, path_fixed_mask=paths[0], path_moving_mask=paths[1],
                              device=torch.device("cpu"))
    # the field's components follow the arrays' axes (k, j, i), in voxels: fit points p -> p + u(p)
    k, j, i = np.nonzero(fixed_mask > 0)
    pick = np.random.default_rng(0).choice(len(k), min(20000, len(k)), replace=False)
    k, j, i = k[pick], j[pick], i[pick]
    u = disp[k, j, i]
    p = region.index_to_lps(np.stack([i, j, k], 1).astype(float))
    q = region.index_to_lps(np.stack([i + u[:, 2], j + u[:, 1], k + u[:, 0]], 1))
    ones = np.ones((len(p), 1))
    matrix = least_trimmed_rigid(torch.from_numpy(np.hstack([p, ones])).float(),
                                 torch.from_numpy(np.hstack([q, ones])).float()).double().numpy()
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform, time.perf_counter() - t0
