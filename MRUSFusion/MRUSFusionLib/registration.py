"""Register a US volume to the MR with a loaded cascade, then correct it: the one entry point for
the command line, the demo, the evaluation, the streaming service and the Slicer module.

Two grids. The network sees its training grid (128^3 at 1 mm, `preprocess.fusion_grid`, centred on
the liver or on the registration region): a model trained on 1 mm grids gets the input it knows,
whatever the US's resolution. The correction (`correction.py`) works on the registration region
(`preprocess.registration_region`: the overlap of the US data with the MR, 128^3 at its own
spacing, 0.5 mm for a small brain US), where the corrected results are also written. Both are
related through LPS mm only, so each result is exact on either.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from deepnav.errors import InputError
from deepnav.imaging import Volume, linear_to_matrix, matrix_to_affine, resample_to_grid, write_volume
from MRUSFusionLib import correction, fields, losses
from MRUSFusionLib.model_io import LoadedModel
from MRUSFusionLib.preprocess import FusionPair, fusion_grid, normalise, prepare_pair, registration_region
from MRUSFusionLib.warp import compose_affine, compose_matrices, jacobian_determinant


@dataclasses.dataclass
class Correction:
    """The correction stage's answer: a rigid map C (MR LPS -> LPS of the start), applied before
    the transform it started from (the network's, or the coarse alignment when the network's
    scored worse), so the registration is T = start o C."""

    start: str  # "network" or "coarse"
    start_transforms: list  # the start's ITK transforms, applied last-first (empty: identity)
    start_linear: np.ndarray  # 4x4 LPS: the start's linear part (its rigid stage, or `initial`)
    matrix_lps: np.ndarray  # 4x4 LPS: C
    region: Volume  # the registration region (geometry)
    warped: np.ndarray  # the US through T on the region, float32 [0, 1], 0 outside its data
    report: dict  # similarity before/after, inlier share, consistency, disagreement, flags
    timings: dict


@dataclasses.dataclass
class Registration:
    pair: FusionPair
    warped: np.ndarray  # US resampled into the fusion grid through phi, float32 (128^3)
    disp_ijk: np.ndarray  # composed phi(x) - x, (3, 128, 128, 128) voxels (i, j, k)
    bspline_ijk: np.ndarray  # the B-spline stage's u, same layout
    matrix_ijk: np.ndarray  # (3, 4) rigid, voxel space
    timings: dict[str, float]
    correction: Correction | None = None  # None: the network's result alone (--fast)

    @property
    def grid(self) -> Volume:
        return self.pair.grid

    @property
    def stage(self) -> str:
        return "network" if self.correction is None else "corrected"

    def network_transform(self) -> sitk.CompositeTransform:
        """The network's cascade in LPS mm, valid everywhere (rigid outside the 128 mm grid)."""
        return fields.composite_lps(self.matrix_ijk, self.bspline_ijk, self.grid)

    def network_transforms(self) -> list[sitk.Transform]:
        """The network's cascade as its two ITK transforms, rigid then B-spline field (a
        composite applies the last one first): what the correction may start from."""
        return [fields.rigid_to_lps(self.matrix_ijk, self.grid),
                fields.displacement_transform(fields.displacement_to_lps_image(self.bspline_ijk, self.grid))]

    def rigid_transform(self) -> sitk.AffineTransform:
        """The rigid part in LPS mm, resampling convention (MR point -> US point): the network's
        rigid stage, followed (applied before) by the correction when there is one."""
        if self.correction is None:
            return fields.rigid_to_lps(self.matrix_ijk, self.grid)
        return matrix_to_affine(self.correction.start_linear @ self.correction.matrix_lps)

    def transform(self) -> sitk.CompositeTransform:
        """The registration in LPS mm (MR point -> US point): the network's cascade, or, corrected,
        start o C as one composite (SimpleITK applies a composite's last transform first)."""
        if self.correction is None:
            return self.network_transform()
        c = self.correction
        return sitk.CompositeTransform([*c.start_transforms, matrix_to_affine(c.matrix_lps)])

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
        """Transforms (rigid.tfm, field.nrrd, transform.h5) and the warped US: on the network's
        grid, or, corrected, on the registration region."""
        if self.correction is None:
            paths = fields.write_transforms(out_dir, self.matrix_ijk, self.disp_ijk, self.bspline_ijk, self.grid)
            paths["warped_us"] = write_volume(self.grid.with_array(self.warped), out_dir / "warped_us.nrrd")
            return paths
        region = self.correction.region
        transform = self.transform()
        paths = fields.write_transform_files(out_dir, self.rigid_transform(), transform,
                                             fields.transform_to_field(transform, region))
        paths["warped_us"] = write_volume(region.with_array(self.correction.warped), out_dir / "warped_us.nrrd")
        return paths


def overlay_picture(result: Registration, mr: Volume, us: Volume, initial: sitk.Transform | None = None) -> np.ndarray:
    """RGB uint8 overlay (`overlay.overlay_panel`): the MR with the US as coarsely aligned, through
    the network, and corrected, on the registration region (the network's grid with --fast),
    each row captioned with its MIND-SSC distance where the correction measured one."""
    from MRUSFusionLib.overlay import overlay_panel

    grid = result.correction.region if result.correction is not None else result.grid
    fixed, _ = mr_on_region(mr, grid)
    report = result.correction.report if result.correction is not None else {}

    def caption(stage: str, key: str) -> str:
        return f"{stage}: MIND-SSC {report[key]:.3f}" if np.isfinite(report.get(key, np.nan)) else stage

    rows = []
    for stage, key, transform in (("before (coarse)", "mind_ssc_coarse", initial),
                                  ("network", "mind_ssc_network", result.network_transform())):
        image, mask = us_on_region(us, grid, transform)
        rows.append((caption(stage, key), image, mask))
    if result.correction is not None:
        c = result.correction
        rows.append((f"{caption(f'corrected (from {c.start})', 'mind_ssc_after')}, {100 * report['inlier_share']:.0f}% inliers",
                     c.warped, (c.warped > 0).astype(np.float32)))
    return overlay_panel(fixed, rows)


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
             fixed: np.ndarray | None = None, correct: bool = True,
             settings: correction.CorrectionSettings | None = None, mr_side: MRSideCache | None = None) -> Registration:
    """Resample MR and US into the network's grid (US coarsely aligned, or through `initial`), run
    the network, then (unless `correct` is False) the correction on the registration region.
    `grid` and `fixed` (see `prepare_pair`), and `mr_side` for the correction, reuse the MR's
    preprocessing across frames."""
    t0 = time.perf_counter()
    region = registration_region(mr, us, liver, initial) if correct or (grid is None and liver is None) else None
    if grid is None:
        grid = fusion_grid(mr, liver, centre_lps=region.centre_lps() if region is not None else None)
    pair = prepare_pair(mr, us, liver=liver, initial=initial, grid=grid, fixed=fixed)
    result = register_pair(model, pair, {"preprocess": time.perf_counter() - t0})
    if initial is not None:
        fold_initial(result, initial)
    if correct:
        correct_result(result, mr, us, region=region, liver=liver, initial=initial, settings=settings, mr_side=mr_side)
    return result


def correct_result(result: Registration, mr: Volume, us: Volume, *, region: Volume | None = None,
                   liver: Volume | None = None, initial: sitk.Transform | None = None,
                   settings: correction.CorrectionSettings | None = None, mr_side: MRSideCache | None = None) -> Correction:
    """Follow the network's result with the correction stage (on `region`, by default the
    registration region of this MR and US): sets and returns `result.correction`, its timings
    added to the result's. What `register`, the evaluation and the service's second stage run."""
    region = region if region is not None else registration_region(mr, us, liver, initial)
    result.correction = correct_registration(mr, us, region, network=result.network_transforms(),
                                             initial=initial, liver=liver, settings=settings, mr_side=mr_side)
    # the correction is rigid: the corrected map folds where the network's field it composes with
    # does, and not at all from the coarse alignment
    result.correction.report["folding_percent"] = result.folding_percent() if result.correction.start == "network" else 0.0
    result.timings.update({f"correction_{k}": v for k, v in result.correction.timings.items()})
    return result.correction


def mr_on_region(mr: Volume, region: Volume, data_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The MR (or any fixed image) on the region, normalised, and its support mask (float32):
    inside its grid, and with `data_only` also > 0 (a fixed US with a fan)."""
    values = resample_to_grid(mr.with_array(mr.array.astype(np.float32, copy=False)), region,
                              default_value=np.nan).array
    mask = (np.isfinite(values) & ((values > 0) if data_only else True)).astype(np.float32)
    return normalise(np.nan_to_num(values, nan=0.0), mask), mask


def us_on_region(us: Volume, region: Volume, transform: sitk.Transform | None) -> tuple[np.ndarray, np.ndarray]:
    """The US through `transform` (region LPS -> US LPS) on the region, normalised, and its data
    mask (inside the US grid and > 0: a scan converter leaves zeros outside the fan)."""
    values = resample_to_grid(us, region, transform=transform, default_value=np.nan).array
    mask = (np.isfinite(values) & (values > 0)).astype(np.float32)
    return normalise(np.nan_to_num(values, nan=0.0), mask) * mask, mask


@dataclasses.dataclass(frozen=True)
class FixedSide:
    """The fixed image's share of a correction on one region padded by the search's reach: its
    MIND-SSC features and support on the feature grid and on the search's coarse grid, and its
    support on the padded region's voxels."""

    features: tuple[torch.Tensor, torch.Tensor]
    coarse: tuple[torch.Tensor, torch.Tensor]
    mask: np.ndarray
    rows: correction.Rows  # the features and support as the refinement and the scores read them


class MRSideCache:
    """The MR's share of the correction, kept for the next frame: a live stream (a held probe) or
    a series of volumes from one sweep gives the same registration region frame after frame, and
    the MR's resampling and MIND-SSC on it (the padded region, up to 192^3 voxels) cost more than
    the US's. One region is kept (a padded region's features take up to ~400 MB); the entry holds
    the MR and liver it was made from and is used only for those same objects."""

    def __init__(self):
        self._entry: tuple[Volume, Volume | None, Volume, tuple, FixedSide] | None = None
        self.hits = self.misses = 0

    def get(self, mr: Volume, liver: Volume | None, region: Volume, key: tuple, compute) -> FixedSide:
        """The fixed side on `region` (the padded registration region) with the settings `key`."""
        entry = self._entry
        if entry is not None and entry[0] is mr and entry[1] is liver and entry[2].same_grid(region, tol_mm=1e-6) \
                and entry[3] == key:
            self.hits += 1
            return entry[4]
        self.misses += 1
        self._entry = None  # the old one is freed before the new one is made
        side = compute()
        self._entry = (mr, liver, region, key, side)
        return side


def correct_registration(mr: Volume, us: Volume, region: Volume, *, network: list | None = None,
                         initial: sitk.Transform | None = None, liver: Volume | None = None,
                         fixed_is_us: bool = False, settings: correction.CorrectionSettings | None = None,
                         mr_side: MRSideCache | None = None) -> Correction:
    """The correction stage on the registration region, started from the network's answer
    (`network`: its ITK transforms, applied last-first) or from the coarse alignment (`initial`, or
    the images as they lie), whichever has the lower MIND-SSC distance; never worse than its
    start by that distance (`correction.correct`). The fixed support is the MR's grid (or, with
    `fixed_is_us` for US-US registration, its voxels > 0, and it is despeckled as the US is); with
    a liver mask only the liver and a margin around it: the body wall and ribs do not follow the
    liver's breathing, and a rigid fit to them would pull it back. With `mr_side`, the MR's share
    (its resampling and features on the padded region) comes from there when another frame already
    made it on the same region."""
    settings = settings or correction.CorrectionSettings()
    timings = {}
    t0 = time.perf_counter()
    pool = settings.pool(float(region.spacing[0]))
    fg = correction.feature_grid(region, pool)
    factor, reach = settings.search(float(fg.spacing[0]))
    pad = factor * reach  # feature voxels: the fixed image is scored up to the search's reach around the region
    around = correction.padded(region, pad * pool)
    coarse_settings = dataclasses.replace(settings, mind_radius=settings.search_mind[0], mind_dilation=settings.search_mind[1])

    def fixed_side() -> FixedSide:
        fixed, fixed_mask = mr_on_region(mr, around, data_only=fixed_is_us)
        if fixed_is_us:
            fixed = _despeckled(fixed, fixed_mask, around, settings.us_smoothing_mm)
        if liver is not None:
            fixed_mask *= _dilated_mask(liver, around, settings.liver_margin_mm)
        fine = correction.features(fixed, fixed_mask, pool, settings)
        return FixedSide(fine, correction.features(fixed, fixed_mask, pool * factor, coarse_settings), fixed_mask,
                         correction.Rows(*fine))

    side = mr_side.get(mr, liver, around, (fixed_is_us, settings), fixed_side) if mr_side is not None else fixed_side()
    timings["mr_features"] = time.perf_counter() - t0
    fix_padded, fixed_mask = side.features, side.mask
    coarse = correction.Coarse(side.coarse, {}, factor)
    starts = {"coarse": ([initial] if initial is not None else [],
                         linear_to_matrix(initial) if initial is not None else np.eye(4))}
    if network:
        starts["network"] = (list(network), linear_to_matrix(network[0]))
    moving = {}
    for name, (transforms, _) in starts.items():
        image, mask = us_on_region(us, region, sitk.CompositeTransform(transforms) if transforms else None)
        despeckled = _despeckled(image, mask, region, settings.us_smoothing_mm)
        moving[name] = correction.features(despeckled, mask, pool, settings)
        coarse.movings[name] = correction.features(despeckled, mask, pool * factor, coarse_settings)
    timings["features"] = time.perf_counter() - t0
    answer = correction.correct(fix_padded, pad, moving, float(fg.spacing[0]), settings, coarse, side.rows)
    if answer is None:
        raise InputError("the US data and the MR do not overlap in the registration region")
    timings.update(answer.timings)
    start, rigid = answer.start, answer.fit
    matrix_lps = linear_to_matrix(fields.rigid_to_lps(answer.matrix_ijk, fg))
    transforms, linear = starts[start]
    final = sitk.CompositeTransform([*transforms, matrix_to_affine(matrix_lps)])
    warped, _ = us_on_region(us, region, final)
    support = correction.unpadded(fixed_mask, pad * pool)
    disagreement = _mean_distance(final, sitk.CompositeTransform(network), region, support) if network else float("nan")
    moved = _mean_distance(matrix_to_affine(matrix_lps), sitk.AffineTransform(3), region, support)
    capture = settings.search_range_mm  # the translation search's reach each way from either start
    distance = answer.distances
    report = {
        "start": start,
        "mind_ssc_coarse": distance["coarse"], "mind_ssc_network": distance.get("network", float("nan")),
        "mind_ssc_before": min(d for d in distance.values() if np.isfinite(d)), "mind_ssc_after": answer.distance_after,
        "mind_ssc_robust_fit_from": answer.corrected_from,
        "inlier_share": rigid.inlier_share, "correspondences": rigid.points,
        "consistency_mm": rigid.consistency_mm, "network_disagreement_mm": disagreement,
        "correction_mm": moved, "capture_range_mm": capture,
        "flags": [flag for flag, on in (
            ("network_worse_than_coarse", bool(network) and distance.get("network", np.inf) > distance["coarse"]),
            ("correction_rejected", answer.rejected),
            (f"disagrees_with_network_over_{settings.disagreement_mm:g}mm", disagreement > settings.disagreement_mm),
            ("few_inliers", rigid.inlier_share < settings.min_inlier_share),
            # moved most of the way to the search's edge: the true answer may lie beyond what it can reach
            (f"near_capture_range_{capture:g}mm", moved > 0.9 * capture)) if on],
    }
    timings["total"] = time.perf_counter() - t0
    return Correction(start, transforms, linear, matrix_lps, region.with_array(np.zeros(region.array.shape, np.uint8)),
                      warped.astype(np.float32), report, timings)


def _despeckled(image: np.ndarray, mask: np.ndarray, region: Volume, sigma_mm: float) -> np.ndarray:
    """The US smoothed (Gaussian, `sigma_mm`) inside its data before its self-similarity is taken:
    speckle has structure at the voxel scale that the MR does not share."""
    if sigma_mm <= 0:
        return image
    smooth = sitk.SmoothingRecursiveGaussian(region.with_array(image).to_sitk(), sigma_mm)
    return sitk.GetArrayFromImage(smooth) * mask


def _dilated_mask(mask: Volume, region: Volume, margin_mm: float) -> np.ndarray:
    """A mask resampled on the region (nearest neighbour) and dilated by `margin_mm` (a cube)."""
    inside = resample_to_grid(mask.with_array((mask.array > 0).astype(np.float32)), region,
                              interpolator=sitk.sitkNearestNeighbor).array
    radius = int(round(margin_mm / float(region.spacing[0])))
    if radius > 0:  # a cube is three 1D maxima, one per axis (a 3D kernel costs radius^2 times more)
        t = torch.from_numpy(inside)[None, None]
        for axis in range(3):
            kernel, pad = [1, 1, 1], [0, 0, 0]
            kernel[axis], pad[axis] = 2 * radius + 1, radius
            t = F.max_pool3d(t, kernel, stride=1, padding=pad)
        inside = t[0, 0].numpy()
    return inside


def _mean_distance(a: sitk.Transform, b: sitk.Transform, region: Volume, mask: np.ndarray, points: int = 500) -> float:
    """Mean distance (mm) between where two transforms send the region's voxels inside `mask`
    (a fixed subset of `points`)."""
    k, j, i = np.nonzero(mask > 0)
    if len(i) == 0:
        return float("nan")
    pick = np.random.default_rng(0).choice(len(i), min(points, len(i)), replace=False)
    lps = region.index_to_lps(np.stack([i[pick], j[pick], k[pick]], 1))
    return float(np.mean(np.linalg.norm(fields.transform_points(a, lps) - fields.transform_points(b, lps), axis=1)))


def fold_initial(result: Registration, initial: sitk.Transform) -> None:
    """The network saw the US resampled through `initial` (a linear transform, e.g. from paired
    fiducials): the transforms out must map MR points all the way to the original US,
    x -> initial(R(x + u(x))), so `initial` is composed into the rigid matrix and the field."""
    outer = fields.affine_lps_to_ijk(initial, result.grid)
    outer_t = torch.from_numpy(outer).float()[None]
    result.disp_ijk = compose_affine(outer_t, torch.from_numpy(result.disp_ijk)[None])[0].numpy()
    inner = torch.from_numpy(result.matrix_ijk).double()[None]
    result.matrix_ijk = compose_matrices(torch.from_numpy(outer)[None], inner)[0].numpy()
