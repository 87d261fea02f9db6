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

