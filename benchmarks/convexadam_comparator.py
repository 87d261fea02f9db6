"""The published comparator of the MR-US correction benchmarks, run with the authors' own package
(`convexadam` 0.2.0, Apache-2.0; `pip install -e ".[bench]"`). Kept beside the benchmarks, not in
MRUSFusionLib: the extension itself does not depend on it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def register_convexadam(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
                        region, *, instance_optimisation: bool) -> tuple[sitk.Transform, float]:
    """The published comparator, run with the authors' own package (`convexadam`, Apache-2.0,
    optional: `pip install convexadam nibabel`): MIND-SSC radius 3 / dilation 3, coupled-convex
    discrete search on a 6-voxel grid with half-width 6, inverse consistency, masks for both
    images (the package reads them from NIfTI files), optionally Adam instance optimisation (80
    iterations); then its least-trimmed-squares rigid fit of the dense field, in LPS mm.
    `fixed`, `moving` and the masks are (k, j, i) arrays on `region` (a Volume). Returns a rigid
    transform (region LPS -> moving LPS) and the runtime."""
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
