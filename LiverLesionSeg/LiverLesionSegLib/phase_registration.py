"""Rigid registration of one CT phase to the reference phase, as the method describes it:
a two-level pyramid, mutual information from a joint histogram, particle swarm optimisation at the
coarse level, then Powell's method from the swarm's optimum at the finer level, with cubic-spline
interpolation of the moving phase. `register_phase_sitk` is the classical alternative (SimpleITK
multi-resolution Mattes MI with gradient descent) that it is compared with.

Convention: the result maps a reference point (LPS mm) to where the same anatomy lies in the
moving phase (resampling convention), so `preprocess.resample` puts the moving phase on the reference grid.

Why our own evaluation loop rather than SimpleITK's: ITK has neither particle swarm nor Powell, and
calling `ImageRegistrationMethod.MetricEvaluate` per particle costs a full set-up each time. The
metric here samples a fixed set of body voxels of the reference, and reads the moving phase at
their transformed positions from cubic B-spline coefficients computed once per level
(`scipy.ndimage.map_coordinates`), a few milliseconds per evaluation.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, optimize

from deepnav.errors import InputError
from deepnav.imaging import Volume, grid_like, linear_to_matrix, matrix_to_affine, resample_to_grid, rotation_matrix

BODY_HU = -500.0  # voxels above this are the body; the metric ignores air
BINS = 32
LEVEL_SPACING_MM = (6.0, 3.0)  # the two pyramid levels: coarse (swarm), fine (Powell)
ROTATION_RANGE_DEG = 10.0
TRANSLATION_RANGE_MM = 20.0


@dataclasses.dataclass
class PhaseRegistration:
    matrix_lps: np.ndarray  # 4x4: reference point -> the same anatomy in the moving phase
    mi_before: float  # at the fine level, identity
    mi_after: float
    seconds: float
    evaluations: int
    method: str

    def transform(self) -> sitk.AffineTransform:
        return matrix_to_affine(self.matrix_lps)


def rigid_matrix(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """(rx, ry, rz degrees, tx, ty, tz mm) about `centre` -> 4x4: p -> R (p - c) + c + t."""
    m = np.eye(4)
    m[:3, :3] = rotation_matrix(np.deg2rad(params[:3]))
    m[:3, 3] = centre + params[3:] - m[:3, :3] @ centre
    return m


def _level(volume: Volume, spacing_mm: float) -> Volume:
    """The image smoothed (Gaussian, sigma = half the new spacing) and resampled to `spacing_mm`."""
    image = sitk.SmoothingRecursiveGaussian(volume.to_sitk(), spacing_mm / 2)
    size = np.maximum(np.round(np.array(volume.size_ijk) * volume.spacing / spacing_mm).astype(int), 4)
    grid = grid_like(tuple(size), np.full(3, spacing_mm), volume.origin, volume.direction)
    return resample_to_grid(Volume.from_sitk(image), grid, default_value=-1000.0)


class _MutualInformation:
    """MI between the reference's body voxels and the moving phase read at T(p)."""

    def __init__(self, reference: Volume, moving: Volume, max_points: int, rng: np.random.Generator):
        k, j, i = np.nonzero(reference.array > BODY_HU)
        pick = rng.choice(len(i), size=min(max_points, len(i)), replace=False)
        self.points = reference.index_to_lps(np.stack([i[pick], j[pick], k[pick]], axis=1).astype(np.float64))
        values = reference.array[k[pick], j[pick], i[pick]].astype(np.float64)
        self.fixed_bins = _bin(values, *np.percentile(values, [0.5, 99.5]))
        body = moving.array[moving.array > BODY_HU]
        self.moving_range = np.percentile(body, [0.5, 99.5])
        self.coefficients = ndimage.spline_filter(moving.array.astype(np.float64), order=3)
        self.lps_to_index = np.linalg.inv(moving.ijk_to_lps())
        self.shape = np.array(moving.array.shape)
        self.evaluations = 0

    def __call__(self, matrix: np.ndarray) -> float:
        self.evaluations += 1
        index = (self.points @ matrix[:3, :3].T + matrix[:3, 3]) @ self.lps_to_index[:3, :3].T + self.lps_to_index[:3, 3]
        kji = index[:, ::-1].T
        inside = np.all((kji >= 0) & (kji <= (self.shape - 1)[:, None]), axis=0)
        if inside.mean() < 0.3:
            return 0.0  # too little overlap to mean anything
        values = ndimage.map_coordinates(self.coefficients, kji[:, inside], order=3, prefilter=False)
        return _mi(self.fixed_bins[inside], _bin(values, *self.moving_range))


def _bin(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip(((values - lo) / max(hi - lo, 1e-6) * BINS).astype(np.int64), 0, BINS - 1)


def _mi(a: np.ndarray, b: np.ndarray) -> float:
    joint = np.bincount(a * BINS + b, minlength=BINS * BINS).reshape(BINS, BINS).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log(joint[nz] / (pa[:, None] * pb[None, :])[nz])))


def _swarm(cost, bounds: np.ndarray, rng: np.random.Generator, particles: int, iterations: int,
           deadline: float) -> np.ndarray:
    """Particle swarm minimisation within `bounds` (n, 2); particle 0 starts at the identity."""
    lo, hi = bounds[:, 0], bounds[:, 1]
    x = rng.uniform(lo, hi, (particles, len(lo)))
    x[0] = 0.0
    v = rng.uniform(-(hi - lo), hi - lo, x.shape) * 0.1
    f = np.array([cost(p) for p in x])
    best_x, best_f = x.copy(), f.copy()
    g = best_x[np.argmin(best_f)].copy()
    for _ in range(iterations):
        if time.monotonic() > deadline:
            break
        r1, r2 = rng.random(x.shape), rng.random(x.shape)
        v = 0.7 * v + 1.5 * r1 * (best_x - x) + 1.5 * r2 * (g - x)
        x = np.clip(x + v, lo, hi)
        f = np.array([cost(p) for p in x])
        better = f < best_f
        best_x[better], best_f[better] = x[better], f[better]
        g = best_x[np.argmin(best_f)].copy()
    return g


class _OutOfTime(Exception):
    pass


def check_ct_hu(volume: Volume, what: str) -> None:
    """A CT in Hounsfield units has air (about -1000) around the body or in the bowel and lungs;
    an MR, or a CT stored without its rescale slope and intercept, has none."""
    values = volume.array
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what} has NaN or infinite voxels")
    if values.min() > BODY_HU or np.mean(values > BODY_HU) < 0.01:
        raise InputError(f"{what} does not look like a CT in Hounsfield units (range {values.min():.0f} to "
                         f"{values.max():.0f}, {100 * np.mean(values > BODY_HU):.0f}% of voxels above -500): "
                         "an MR, or a CT stored without its rescale slope/intercept?")


def register_phase(reference: Volume, moving: Volume, *, seed: int = 0, particles: int = 20, iterations: int = 25,
                   max_points: int = 40_000, time_limit_s: float = 60.0) -> PhaseRegistration:
    """PSO at 6 mm, then Powell at 3 mm from the swarm's optimum; stops at `time_limit_s` with
    the best transform found so far."""
    t0 = time.monotonic()
    deadline = t0 + time_limit_s
    check_ct_hu(reference, "the reference phase")
    check_ct_hu(moving, "the phase to register")
    rng = np.random.default_rng(seed)
    body = np.argwhere(reference.array > BODY_HU)
    centre = reference.index_to_lps(body.mean(axis=0)[None, ::-1])[0]
    bounds = np.array([[-ROTATION_RANGE_DEG, ROTATION_RANGE_DEG]] * 3 + [[-TRANSLATION_RANGE_MM, TRANSLATION_RANGE_MM]] * 3)
    evaluations = 0

    coarse = _MutualInformation(_level(reference, LEVEL_SPACING_MM[0]), _level(moving, LEVEL_SPACING_MM[0]),
                                max_points // 2, rng)
    start = _swarm(lambda p: -coarse(rigid_matrix(p, centre)), bounds, rng, particles, iterations, deadline)
    evaluations += coarse.evaluations

    fine = _MutualInformation(_level(reference, LEVEL_SPACING_MM[1]), _level(moving, LEVEL_SPACING_MM[1]), max_points, rng)
    mi_before = fine(np.eye(4))
    best = {"x": start, "f": -fine(rigid_matrix(start, centre))}

    def cost(p: np.ndarray) -> float:
        if time.monotonic() > deadline:
            raise _OutOfTime
        f = -fine(rigid_matrix(p, centre))
        if f < best["f"]:
            best.update(x=np.array(p), f=f)
        return f

    try:
        optimize.minimize(cost, start, method="Powell", bounds=bounds,
                          options={"xtol": 1e-2, "ftol": 1e-5, "maxfev": 600})
    except _OutOfTime:
        pass
    evaluations += fine.evaluations
    return PhaseRegistration(rigid_matrix(best["x"], centre), mi_before, -best["f"], time.monotonic() - t0,
                             evaluations, "pso+powell")


def register_phase_sitk(reference: Volume, moving: Volume, *, seed: int = 0, iterations: int = 200) -> PhaseRegistration:
    """The classical alternative: SimpleITK Euler3D, Mattes MI (32 bins, 10% random samples of the
    body), regular-step gradient descent, shrink 4 then 2 (smoothing 2, 1 voxels)."""
    t0 = time.monotonic()
    check_ct_hu(reference, "the reference phase")
    check_ct_hu(moving, "the phase to register")
    fixed = sitk.Cast(reference.to_sitk(), sitk.sitkFloat32)
    moving_image = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed)
    method.SetMetricFixedMask(fixed > BODY_HU)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=iterations,
                                                   relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2])
    method.SetSmoothingSigmasPerLevel([2, 1])
    method.SetInitialTransform(sitk.CenteredTransformInitializer(fixed, moving_image, sitk.Euler3DTransform(),
                                                                 sitk.CenteredTransformInitializerFilter.GEOMETRY))
    transform = method.Execute(fixed, moving_image)
    evaluation = _MutualInformation(_level(reference, LEVEL_SPACING_MM[1]), _level(moving, LEVEL_SPACING_MM[1]),
                                    40_000, np.random.default_rng(seed))
    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    matrix = linear_to_matrix(transform)
    return PhaseRegistration(matrix, evaluation(np.eye(4)), evaluation(matrix), time.monotonic() - t0,
                             method.GetOptimizerIteration(), "sitk-mattes-gd")


def transform_error_mm(estimate: np.ndarray, truth: np.ndarray, points_lps: np.ndarray) -> float:
    """Mean distance between where two transforms send the same points (e.g. the liver's voxels)."""
    a = points_lps @ estimate[:3, :3].T + estimate[:3, 3]
    b = points_lps @ truth[:3, :3].T + truth[:3, 3]
    return float(np.mean(np.linalg.norm(a - b, axis=1)))
