"""The correction stage after the network: the method that leads the multimodal MR-US benchmarks
(Learn2Reg CuRIOUS / ReMIND2Reg baselines: MIND-SSC features, a discrete displacement search with
coupled-convex regularisation, forward/backward consistency, a least-trimmed-squares rigid fit),
followed by a rigid instance optimisation on the same features.

References: Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions
using self-similarities" (MICCAI 2013, MIND-SSC); Heinrich et al., "MRF-based deformable
registration and ventilation estimation" (coupled convex, 2013); Siebert, Hansen & Heinrich,
"Fast 3D registration with accurate optimisation and little learning for Learn2Reg 2021"
(ConvexAdam).

Written here rather than called from the authors' `convexadam` package: that package reads its
images and masks from NIfTI file paths and returns a dense field at the fixed image's voxels, while
this stage runs on a grid we already hold in memory, once per streamed frame, from more than one
start, and must end in a rigid transform in mm with a never-worse check.

Spaces. Everything runs on one feature grid (`feature_grid`: the registration region averaged over
p^3 voxels; isotropic spacing s, LPS geometry): tensors are (N, C, k, j, i); positions and
displacements are voxel coordinates (i, j, k) of that grid (s mm per unit along each grid axis; the
grid is isotropic and its direction orthonormal, so a rigid map of voxel coordinates is a rigid map
in mm). A rigid map is a (3, 4) matrix on voxel
positions, `x_moving = A x + b`, in the resampling convention (a fixed/MR voxel -> where it is
found in the moving image resampled on the same grid). `fields.rigid_to_lps` turns it into LPS mm.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import time
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from deepnav.imaging import Volume, grid_like
from MRUSFusionLib.warp import compose_matrices, identity_grid_ijk


@dataclasses.dataclass(frozen=True)
class CorrectionSettings:
    """In the spirit of the published CuRIOUS / ReMIND2Reg recipe (MIND-SSC with a patch radius and
    dilation of a few millimetres, a discrete search on a coarse grid, an LTS rigid fit), in mm:
    features at about 1.2 mm whatever the region's spacing (a 0.5 mm brain region is averaged over
    2^3 voxels, a 1.25 mm liver region is used as it is), a 16^3 search grid over the region
    (4 mm steps and +-16 mm capture for a brain US, ~10 mm and +-40 mm for a liver sweep).
    Chosen on synthetic liver patients and real US-US moves (benchmarks/)."""

    feature_spacing_mm: float = 1.2  # the region is averaged over p^3 blocks to about this spacing before MIND-SSC
    us_smoothing_mm: float = 2.0  # Gaussian sigma applied to the US before its features (speckle; 1.5-2.5 measured alike)
    mind_radius: int = 2  # patch radius of the self-similarity distances, feature voxels
    mind_dilation: int = 2  # distance of the six neighbours, feature voxels
    grid_points: int = 16  # the discrete search's grid: about this many points along the region (16^3)
    half_width: int = 4  # discrete search range, in grid steps each way (capture = 4 steps = a quarter of the region)
    search_spacing_mm: float = 4.0  # the global translation search's grid: images averaged to about this
    search_mind: tuple[int, int] = (1, 1)  # its MIND-SSC radius and dilation, coarse voxels (structures of 4-12 mm:
    # the fine features averaged to 4 mm put the true shift among the deepest minima in none of four
    # 25 mm phantom moves; these, computed on the averaged images, in all four)
    search_range_mm: float = 32.0  # and its reach each way: livers move 20-25 mm over half a breath
    search_minima: int = 4  # local minima of the translation search passed on as candidates
    refine_candidates: int = 4  # the best candidates refined (the deepest start is not always the true basin)
    coupling: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # coupled-convex weights, rising
    consistency_voxels: float = 2.0  # forward/backward disagreement above which a point is not used (grid steps)
    trim: float = 0.5  # least-trimmed squares: share of points the fit keeps
    inlier_steps: float = 0.5  # a point is an inlier of the fit when its residual < this many grid steps
    refine_steps: int = 60  # Adam steps of the rigid refinement (30 at half the rate left 6-8 mm on 25 mm phantom moves)
    refine_points: int = 4096  # fixed-support voxels the refinement samples
    refine_reach_mm: float = 16.0  # how far the refinement may move a candidate
    refine_lr_mm: float = 0.8  # translation step of the rigid refinement, mm
    refine_lr_rad: float = 0.012  # rotation step of the rigid refinement, radians
    near_mm: float = 10.0  # an answer within this of its start (at its points' centre) is near it
    far_margin: float = 0.12  # a far answer must score this share below the best near one to win (phantom: true
    # 20-40 mm captures scored 0.76-0.86 of the best near answer, false minima 30-42 mm away 0.90-0.97)
    disagreement_mm: float = 5.0  # network and correction disagree above this mean distance (flag)
    min_inlier_share: float = 0.3  # fewer inliers of the robust fit are flagged
    liver_margin_mm: float = 10.0  # with a liver mask, the fixed support is the liver dilated by this

    def pool(self, region_spacing_mm: float) -> int:
        """Region voxels averaged per feature voxel (per axis)."""
        return max(1, int(round(self.feature_spacing_mm / region_spacing_mm)))

    def step(self, feature_size: int) -> int:
        """The discrete search's grid step in feature voxels, for a region `feature_size` voxels wide:
        the cost of the search is then the same at every spacing."""
        return max(2, int(round(feature_size / self.grid_points)))

    def search(self, spacing_mm: float) -> tuple[int, int]:
        """The translation search's coarsening factor and half-width (coarse voxels) on features
        `spacing_mm` apart."""
        factor = max(1, int(round(self.search_spacing_mm / spacing_mm)))
        return factor, int(math.ceil(self.search_range_mm / (factor * spacing_mm)))


# ---------------------------------------------------------------- MIND-SSC

def _shifted(padded: torch.Tensor, pad: int, offset: tuple[int, int, int], shape) -> torch.Tensor:
    """image(x + offset) for a replicate-padded image; offset in (i, j, k) voxels."""
    k, j, i = shape
    oi, oj, ok = offset
    return padded[:, :, pad + ok: pad + ok + k, pad + oj: pad + oj + j, pad + oi: pad + oi + i]


def _box(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)^3 cube of a (N, C, k, j, i) tensor, replicate border: along each axis
    in turn, the sum of 2r+1 shifted views (avg_pool3d with a 1D kernel took twice as long here;
    a 3D kernel costs (2r+1)^2 times more)."""
    if radius <= 0:
        return x
    x = F.pad(x, (radius,) * 6, mode="replicate")
    n = 2 * radius + 1
    for axis in (2, 3, 4):
        length = x.shape[axis] - 2 * radius
        total = x.narrow(axis, 0, length).clone()
        for offset in range(1, n):
            total += x.narrow(axis, offset, length)
        x = total
    return x / n**3


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (1, 12, k, j, i) of an image (1, 1, k, j, i).

    The six neighbours at `dilation` voxels along the grid axes form 12 pairs at distance
    sqrt(2) * dilation (the octahedron's edges); each channel is the patch distance between
    the pair, exp(-D / V) with V the local mean distance (a noise estimate), so the descriptor
    depends on local structure, not on the modality's intensities.

    The pair (p, q) sees (I(x + p) - I(x + q))^2 = S_v(x + p) with v = q - p: the 12 pairs need
    only 6 difference images S_v (v and -v give the same one, shifted), box-filtered once each,
    then read at 12 offsets; half the work of filtering 12 channels."""
    shape = image.shape[2:]
    d = dilation
    axes = np.eye(3, dtype=int) * d
    pairs = [(sa * axes[a], sb * axes[b]) for a, b in itertools.combinations(range(3), 2)
             for sa, sb in itertools.product((-1, 1), repeat=2)]
    # the difference vectors up to sign: (+e_a + e_b) and (+e_a - e_b) for each pair of axes
    vectors = []
    for p, q in pairs:
        v = q - p
        key = tuple(v) if tuple(v) > tuple(-v) else tuple(-v)
        if key not in vectors:
            vectors.append(key)
    pad = 2 * d  # S_v is read at x + p (|p| = d) and built from I(y + v) (|v_i| <= d)
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    k, j, i = (n + 2 * d for n in shape)  # S_v on the grid grown by d each side
    base = padded[:, :, d: d + k, d: d + j, d: d + i]
    diffs = torch.cat([(base - _shifted(padded, d, v, (k, j, i))) ** 2 for v in vectors], 1)
    diffs = _box(diffs, radius)
    channels = []
    for p, q in pairs:
        v = tuple(q - p)
        index, origin = (vectors.index(v), p) if v in vectors else (vectors.index(tuple(p - q)), q)
        channels.append(_shifted(diffs[:, index: index + 1], d, tuple(origin), shape))
    dist = torch.cat(channels, 1)
    dist = dist - dist.min(1, keepdim=True).values
    variance = dist.mean(1, keepdim=True)
    mean_var = variance.mean()
    variance = variance.clamp(float(mean_var) * 1e-3, float(mean_var) * 1e3)
    return torch.exp(-dist / variance)


# ---------------------------------------------------------------- discrete search

def _shifts(half_width: int) -> torch.Tensor:
    r = torch.arange(-half_width, half_width + 1, dtype=torch.float32)
    dk, dj, di = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([di.flatten(), dj.flatten(), dk.flatten()], 1)  # (S, 3) in (i, j, k)


def cost_volume(fix: torch.Tensor, mov: torch.Tensor, fix_valid: torch.Tensor, mov_valid: torch.Tensor,
                half_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of squared feature differences for every shift in [-hw, hw]^3 (coarse voxels):
    cost[s, x] = |fix(x) - mov(x + s)|^2, smoothed over a 3^3 neighbourhood of x, normalised to a
    mean of 1 over the valid entries. Entries whose shifted point leaves the moving image's
    support are set to the point's mean valid cost (they neither attract nor repel), and points
    outside the fixed support get a flat cost (the regularisation alone places them)."""
    hw = half_width
    n = fix.shape[2:]
    width = 2 * hw + 1
    mov_p = F.pad(mov, (hw,) * 6)[0]
    valid_p = F.pad(mov_valid, (hw,) * 6)[0, 0] > 0.5
    shifts = _shifts(hw).long()  # dk slowest, then dj, then di: the order of the slabs below
    cost = torch.empty((width, width, width) + tuple(n))
    valid = torch.empty((width, width, width) + tuple(n), dtype=torch.bool)
    for a in range(width):  # one shift along k at a time; all (j, i) shifts at once as strided views
        window = mov_p[:, a: a + n[0]].unfold(2, n[1], 1).unfold(3, n[2], 1)  # (C, k, dj, di, j, i)
        cost[a] = ((fix[0][:, :, None, None] - window) ** 2).sum(0).permute(1, 2, 0, 3, 4)
        valid[a] = valid_p[a: a + n[0]].unfold(1, n[1], 1).unfold(2, n[2], 1).permute(1, 2, 0, 3, 4)
    cost = cost.reshape((len(shifts),) + tuple(n))
    valid = valid.reshape((len(shifts),) + tuple(n))
    cost = _box(cost[None], 1)[0]
    usable = valid & (fix_valid[0, 0] > 0.5)[None]
    scale = cost[usable].mean() if usable.any() else torch.tensor(1.0)
    cost = cost / scale.clamp_min(1e-12)
    count = valid.sum(0).clamp_min(1)
    neutral = (cost * valid).sum(0) / count
    cost = torch.where(valid, cost, neutral[None].expand_as(cost))
    cost[:, fix_valid[0, 0] <= 0.5] = 0.0
    return cost, shifts.float()


def _smooth_field(disp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Two 3^3 box filters, normalised by the weight (1 inside the fixed support): the field
    outside the support neither drags the inside towards zero nor counts at all."""
    total = _box(_box(weight, 1), 1)
    return _box(_box(disp * weight, 1), 1) / total.clamp_min(1e-6) * (total > 1e-6)


def coupled_convex(cost: torch.Tensor, shifts: torch.Tensor, coupling, weight: torch.Tensor) -> torch.Tensor:
    """Alternate a point-wise argmin of cost + w * |s - v(x)|^2 with the smoothing of the chosen
    shifts into v, for rising w: the discrete search and the smooth field converge onto each
    other (Heinrich's coupled convex optimisation). Returns (1, 3, n...) coarse voxels (i, j, k).
    Ties (flat costs outside the support) go to the smallest shift."""
    n = cost.shape[1:]
    flat = cost.reshape(len(shifts), -1) + 1e-6 * (shifts**2).sum(1, keepdim=True)
    disp = shifts[flat.argmin(0)].T.reshape(1, 3, *n)
    norms = (shifts**2).sum(1, keepdim=True)
    for w in coupling:
        smooth = _smooth_field(disp, weight).reshape(3, -1)
        # |s - v|^2 = |s|^2 - 2 s.v + |v|^2, and |v|^2 does not change the argmin: one matrix product
        penalty = norms - 2.0 * (shifts @ smooth)
        disp = shifts[(flat + w * penalty).argmin(0)].T.reshape(1, 3, *n)
    return _smooth_field(disp, weight)


def sample_field(field: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """A field (1, C, k, j, i) at positions (1, 3, ...) in its voxel coordinates (i, j, k),
    trilinear, border values outside."""
    k, j, i = field.shape[2:]
    scale = torch.tensor([2.0 / max(i - 1, 1), 2.0 / max(j - 1, 1), 2.0 / max(k - 1, 1)]).view(1, 3, 1, 1, 1)
    grid = (pos * scale - 1.0).permute(0, 2, 3, 4, 1)
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)


@dataclasses.dataclass
class DiscreteResult:
    points: torch.Tensor  # (P, 3) fine voxel positions (i, j, k) of the coarse grid's centres, usable ones
    targets: torch.Tensor  # (P, 3) where they are found in the moving image (fine voxels)
    consistency: torch.Tensor  # (P,) forward/backward disagreement, fine voxels


def discrete_correspondences(fix_feat, mov_feat, fix_mask, mov_mask, spacing_mm: float,
                             settings: CorrectionSettings) -> DiscreteResult:
    """Coarse correspondences from the discrete search, both ways, kept where they agree."""
    step = settings.step(max(fix_feat.shape[2:]))
    f = F.avg_pool3d(fix_feat, step, stride=step)
    m = F.avg_pool3d(mov_feat, step, stride=step)
    fv = F.avg_pool3d(fix_mask, step, stride=step)
    mv = F.avg_pool3d(mov_mask, step, stride=step)
    cost_f, shifts = cost_volume(f, m, fv, mv, settings.half_width)
    forward = coupled_convex(cost_f, shifts, settings.coupling, (fv > 0.5).float())
    cost_b, _ = cost_volume(m, f, mv, fv, settings.half_width)
    backward = coupled_convex(cost_b, shifts, settings.coupling, (mv > 0.5).float())
    coarse = identity_grid_ijk(f.shape[2:])
    # forward then backward should return to the start: x + f(x) + b(x + f(x)) = x
    round_trip = forward + sample_field(backward, coarse + forward)
    disagreement = round_trip.norm(dim=1)[0]  # coarse voxels
    # both supports at the point and at its correspondence
    lands = sample_field(mv, coarse + forward)[0, 0] > 0.5
    inside = (fv[0, 0] > 0.5) & lands
    keep = inside & (disagreement <= settings.consistency_voxels)
    centre = (step - 1) / 2.0  # the fine position of coarse voxel c is c * step + (step - 1) / 2
    pos = coarse[0].permute(1, 2, 3, 0)[keep] * step + centre
    # the symmetric estimate: half of forward minus half of backward at the target
    sym = 0.5 * (forward - sample_field(backward, coarse + forward))
    target = pos + sym[0].permute(1, 2, 3, 0)[keep] * step
    return DiscreteResult(pos, target, disagreement[keep] * step)


# ---------------------------------------------------------------- global translation search

def _correlate(a: torch.Tensor, b: torch.Tensor, half_width: int) -> torch.Tensor:
    """sum_x a(x) b(x + s) for every integer shift s in [-h, h]^3, summed over channels
    ((C, k, j, i) each; returns (2h+1)^3 indexed [dk, dj, di] + h). By FFT with zero padding of h
    on each axis, so that no shift wraps around."""
    n = a.shape[1:]
    size = [m + half_width for m in n]
    product = torch.fft.rfftn(a, s=size, dim=(1, 2, 3)).conj() * torch.fft.rfftn(b, s=size, dim=(1, 2, 3))
    full = torch.fft.irfftn(product.sum(0), s=size, dim=(0, 1, 2))
    index = torch.arange(-half_width, half_width + 1)
    return full[index][:, index][:, :, index]  # negative shifts sit at the end of the circular result


def translation_search(fix_feat, points_mask, mov_feat, mov_mask, half_width: int, outside_cost: float,
                       minima: int = 1) -> list[np.ndarray]:
    """The shifts, in voxels of the grid the images are given on, that minimise the same cost as
    the scores (`_match_cost`: squared MIND-SSC difference inside the moving support,
    `outside_cost` outside it) over the fixed points `points_mask`, among all shifts up to
    `half_width` voxels (every one, by FFT: ~10^4 shifts in a fraction of a second). Rigid
    misalignments are mostly translation at a coarse scale (6 degrees moves a point 5 mm at 50 mm
    from the centre), and the discrete search on its 16^3 grid alone loses track of shifts beyond
    about two of its steps. Returns the `minima` deepest local minima (lowest first) as (3, 4) maps
    [I | s]: at a coarse scale the deepest is not always the true one."""
    w, f, m, g, h = points_mask[0], fix_feat[0], mov_mask[0], mov_feat[0], half_width
    # sum_x w(x) [m(x+s) |f(x) - g(x+s)|^2 + (1 - m(x+s)) c], expanded into correlations
    total = (_correlate(w * (f**2).sum(0, keepdim=True), m, h)
             + _correlate(w, m * (g**2).sum(0, keepdim=True), h)
             - 2.0 * _correlate(w * f, m * g, h)
             + outside_cost * (w.sum() - _correlate(w, m, h)))
    # local minima: lower than every neighbour in a 5^3 window (replicate: a border is no minimum by padding)
    lowest = -F.max_pool3d(F.pad(-total[None, None], (2,) * 6, mode="replicate"), 5, stride=1)[0, 0]
    at = torch.nonzero(total <= lowest)
    at = at[torch.argsort(total[at[:, 0], at[:, 1], at[:, 2]])][:minima]
    shifts = at.flip(1).double().numpy() - h  # (dk, dj, di) -> (i, j, k)
    return [np.hstack([np.eye(3), shift[:, None]]) for shift in shifts]


# ---------------------------------------------------------------- robust rigid fit

def kabsch(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The rigid (3, 4) [R | t] minimising sum |R p + t - q|^2 (proper rotation)."""
    pc, qc = p.mean(0), q.mean(0)
    u, _, vt = np.linalg.svd((p - pc).T @ (q - qc))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return np.column_stack([rot, qc - rot @ pc])


def lts_rigid(p: np.ndarray, q: np.ndarray, keep: float = 0.5, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Least-trimmed-squares rigid fit: the rigid map whose `keep` share of smallest residuals
    has the least squared sum (concentration steps from the full fit, Rousseeuw & Van Driessen).
    Returns the (3, 4) matrix and the residual of every point."""
    h = max(3, int(math.ceil(keep * len(p))))
    subset = np.arange(len(p))
    matrix = kabsch(p, q)
    for _ in range(iterations):
        residual = np.linalg.norm(p @ matrix[:, :3].T + matrix[:, 3] - q, axis=1)
        new = np.sort(np.argsort(residual)[:h])
        if len(new) == len(subset) and np.array_equal(new, subset):
            break
        subset = new
        matrix = kabsch(p[subset], q[subset])
    residual = np.linalg.norm(p @ matrix[:, :3].T + matrix[:, 3] - q, axis=1)
    return matrix, residual


# ---------------------------------------------------------------- rigid instance optimisation

class Rows:
    """A (1, C, k, j, i) image as rows of C channels, one row per voxel (channels last: a voxel's
    channels side by side in memory), and the box of voxels [lo, hi) (i, j, k) that may be read:
    what `_TrilinearWithGradient` samples."""

    def __init__(self, *images: torch.Tensor):
        """The images' channels side by side (all (1, C_n, k, j, i) on one grid), all readable."""
        self.shape = tuple(images[0].shape[2:])  # (k, j, i)
        self.values = torch.cat([image[0].permute(1, 2, 3, 0) for image in images], -1).view(-1, sum(
            image.shape[1] for image in images))  # (voxels, C): one copy
        self.lo = torch.zeros(3, dtype=torch.long)
        self.hi = torch.tensor(self.shape[::-1])

    def within(self, lo: torch.Tensor, hi: torch.Tensor) -> Rows:
        """The same rows, readable only in the box [lo, hi) (i, j, k voxels; no copy)."""
        out = copy.copy(self)
        out.lo, out.hi = torch.maximum(lo, self.lo), torch.minimum(hi, self.hi)
        return out

    def at(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows at every combination of per-axis voxel indices `nodes` (P, 3 axes i j k, n):
        (P, n^3, C) in (k, j, i) order, read at the nearest voxel of the box, and whether each
        index lies in the box, (P, 3, n) (the caller weighs those outside by zero)."""
        inside = (nodes >= self.lo[:, None]) & (nodes < self.hi[:, None])
        node = torch.minimum(torch.maximum(nodes, self.lo[:, None]), self.hi[:, None] - 1)
        _, j, i = self.shape
        index = (node[:, 2, :, None, None] * j + node[:, 1, None, :, None]) * i + node[:, 0, None, None, :]
        # index_select: a quarter of the time of advanced indexing (aten::index) here
        return self.values.index_select(0, index.reshape(-1)).view(len(nodes), index[0].numel(), -1), inside


_HALF_STEPS = torch.tensor([-0.5, 0.0, 0.5])
_NODES = torch.tensor([-1, 0, 1])


class _TrilinearWithGradient(torch.autograd.Function):
    """Trilinear samples of `Rows` at positions (P, 3) (voxels, i, j, k; zero outside the box),
    with the gradient with respect to the positions from central differences of the same
    interpolant half a voxel either side (the interpolant's own derivative jumps at every voxel
    face, where the points lie at the start, and biases the refinement).

    Written here rather than with grid_sample: CPU grid_sample's own backward costs ~40 ms a step
    here, and seven grid_samples per point (the value and the six half steps) make ~90 strided
    trilinear reads per point. Those seven positions all fall in the 3^3 voxels around the nearest
    voxel: one gather of 27 contiguous channel rows and one batched product with separable weights
    give the value and the three differences (2.2x faster on 4096 points x 13 channels, this CPU, one thread)."""

    @staticmethod
    def forward(ctx, pos: torch.Tensor, rows: Rows) -> torch.Tensor:
        nearest = pos.round().long()  # (P, 3)
        nodes = nearest[:, :, None] + _NODES  # (P, 3 axes, 3 nodes)
        where = pos[:, :, None, None] + _HALF_STEPS[:, None]  # (P, 3 axes, 3 positions, 1)
        corners, inside = rows.at(nodes)  # (P, 27, C)
        hat = (1.0 - (where - nodes[:, :, None, :]).abs()).clamp_min(0.0) * inside[:, :, None, :]  # (P, axis, position, node)
        value, difference = hat[:, :, 1], hat[:, :, 2] - hat[:, :, 0]  # (P, axis, node)
        # per output (value, d/di, d/dj, d/dk) and axis: the weights along that axis
        along = [torch.stack([value[:, a] if o != a + 1 else difference[:, a] for o in range(4)], 1) for a in range(3)]
        weights = (along[2][:, :, :, None, None] * along[1][:, :, None, :, None] * along[0][:, :, None, None, :])
        out = torch.bmm(weights.reshape(len(pos), 4, 27), corners)  # (P, 4, C)
        ctx.save_for_backward(out[:, 1:].permute(2, 1, 0))  # (C, 3, P): d/di, d/dj, d/dk
        return out[:, 0].T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (derivatives,) = ctx.saved_tensors
        return (grad_out[:, None, :] * derivatives).sum(0).T, None


def trilinear(pos: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Trilinear samples (C, P) of `Rows` at positions (P, 3) (voxels, i, j, k; zero outside the
    box): grid_sample's values, from eight contiguous rows per point instead of 8 x C strided
    reads (1.7x faster here on 65536 points x 13 channels, one thread)."""
    base = pos.floor()
    frac = pos - base
    nodes = base.long()[:, :, None] + _NODES[1:]  # (P, axis, 2)
    corners, inside = rows.at(nodes)  # (P, 8, C)
    hat = torch.stack([1.0 - frac, frac], 2) * inside
    weights = hat[:, 2, :, None, None] * hat[:, 1, None, :, None] * hat[:, 0, None, None, :]  # (P, 2, 2, 2)
    return torch.bmm(weights.reshape(len(pos), 1, 8), corners)[:, 0].T


def sampled_distance(fix_values: torch.Tensor, points: torch.Tensor, stack: Rows, matrix: torch.Tensor,
                     outside_cost: float) -> torch.Tensor:
    """Mean squared MIND-SSC difference at `points` (P, 3) between the fixed features there
    (C, P) and the moving ones at matrix(points) (`stack`: the moving features with the moving
    support as a last channel). A point that the map sends out of the moving support costs
    `outside_cost` (a poor match) instead of being dropped: a normalised mean over the overlap
    alone would reward shrinking the overlap onto featureless tissue. Differentiable in `matrix`."""
    pos = points @ matrix[:, :3].T + matrix[:, 3]
    return _match_cost(fix_values, _TrilinearWithGradient.apply(pos, stack), outside_cost)


def _match_cost(fix_values: torch.Tensor, sampled: torch.Tensor, outside_cost: float) -> torch.Tensor:
    """The mean over points of |fixed - moving|^2 inside the moving support, `outside_cost` outside
    it (`sampled`: the moving features with the support as a last channel, (C + 1, P))."""
    inside = sampled[-1].clamp(0.0, 1.0)
    return (inside * ((fix_values - sampled[:-1]) ** 2).sum(0) + (1.0 - inside) * outside_cost).mean()


@dataclasses.dataclass
class Overlap:
    """The fixed points the correction scores: fixed-support voxels inside the moving support at
    the start, with the cost of losing one (the 90th percentile of their start distances)."""

    points: torch.Tensor  # (P, 3) feature voxel positions (i, j, k)
    values: torch.Tensor  # (C, P) fixed features there
    outside_cost: float
    LIMIT: ClassVar[int] = 65536  # points scored at most

    @classmethod
    def build(cls, fix, fix_mask, movings: list[tuple[torch.Tensor, torch.Tensor]]) -> Overlap:
        """The fixed support inside any of the moving (features, mask) pairs as they lie."""
        support = fix_mask[0, 0] > 0.99
        inside = torch.zeros_like(support)
        for _, mask in movings:
            inside |= support & (mask[0, 0] > 0.99)
        k, j, i = torch.nonzero(inside, as_tuple=True)
        if len(k) > cls.LIMIT:  # a fixed subset, in memory order: scores to ~1e-3, at a fraction of the cost
            keep = torch.randperm(len(k), generator=torch.Generator().manual_seed(0))[:cls.LIMIT].sort().values
            k, j, i = k[keep], j[keep], i[keep]
        flat = (k * support.shape[1] + j) * support.shape[2] + i  # one index per voxel: 3x faster than [:, k, j, i]

        def at(image: torch.Tensor) -> torch.Tensor:
            return image[0].reshape(len(image[0]), -1).index_select(1, flat)

        values = at(fix)
        distances = [((values - at(mov)) ** 2).sum(0)[at(mask)[0] > 0.99] for mov, mask in movings]
        pooled = torch.cat(distances)[:100_000]
        cost = float(torch.quantile(pooled, 0.9)) if len(pooled) else 0.0
        return cls(torch.stack([i, j, k], 1).float(), values, cost)

    def subset(self, limit: int, seed: int = 0) -> Overlap:
        """A fixed random subset: the refinement's cost is per point, and a few thousand points pin
        six parameters."""
        if len(self.points) <= limit:
            return self
        pick = torch.randperm(len(self.points), generator=torch.Generator().manual_seed(seed))[:limit]
        pick = pick.sort().values  # in memory order: the samples stay near each other in the image's cache
        return Overlap(self.points[pick], self.values[:, pick], self.outside_cost)

    def distance(self, stack: Rows, matrix: torch.Tensor) -> float:
        """The similarity the never-worse rule compares (lower is better); `stack`: the moving
        features with the moving support as a last channel."""
        if len(self.points) == 0:
            return float("nan")
        with torch.no_grad(), _one_thread():  # small ops: a second thread cost 1-4x more than it gave here
            pos = self.points @ matrix[:, :3].T.float() + matrix[:, 3].float()
            return float(_match_cost(self.values, trilinear(pos, stack), self.outside_cost))


def _rotation(rotvec: torch.Tensor) -> torch.Tensor:
    x, y, z = rotvec
    zero = torch.zeros((), dtype=rotvec.dtype)
    skew = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]), torch.stack([-y, x, zero])])
    return torch.linalg.matrix_exp(skew)


class Refinement:
    """Adam on the six rigid parameters (rotation about `centre`, translation in mm) applied
    before `start`, minimising `sampled_distance` of the moving `stack` (features, then support)
    on a fixed subset of the overlap, with a cosine decay over `settings.refine_steps`; run in
    parts (`advance`), so that several candidates can be refined side by side and the weaker
    ones dropped halfway.
    The map moves at most about `settings.refine_reach_mm` from `start`: beyond that the stack
    is not read (a point sent there costs as one outside the support)."""

    def __init__(self, overlap: Overlap, stack: Rows, start: np.ndarray, centre: torch.Tensor, spacing_mm: float,
                 settings: CorrectionSettings):
        self.sample = overlap.subset(settings.refine_points)
        self.a0 = torch.from_numpy(start).float()
        reached = self.sample.points @ self.a0[:, :3].T + self.a0[:, 3]
        margin = math.ceil(settings.refine_reach_mm / spacing_mm) + 1
        self.stack = stack.within(reached.min(0).values.floor().long() - margin,
                                  reached.max(0).values.ceil().long() + margin + 1)
        self.centre, self.spacing_mm = centre, spacing_mm
        self.rotvec = torch.zeros(3, requires_grad=True)
        self.shift_mm = torch.zeros(3, requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.rotvec], "lr": settings.refine_lr_rad},
                                     {"params": [self.shift_mm], "lr": settings.refine_lr_mm}])
        # Adam's steps stay near the learning rate whatever the gradient, so its precision is the
        # rate's: a cosine decay to zero lets it settle (0.3-0.6 mm left on real US-US without it)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, settings.refine_steps)

    def _matrix(self) -> torch.Tensor:
        rot = _rotation(self.rotvec)
        inner = torch.cat([rot, (self.centre - rot @ self.centre + self.shift_mm / self.spacing_mm)[:, None]], 1)
        return compose_matrices(self.a0[None], inner[None])[0]

    def advance(self, steps: int) -> None:
        with _one_thread():  # a few thousand samples a step: a second thread costs more than it brings
            for _ in range(steps):
                self.opt.zero_grad()
                sampled_distance(self.sample.values, self.sample.points, self.stack, self._matrix(),
                                 self.sample.outside_cost).backward()
                self.opt.step()
                self.schedule.step()

    def matrix(self) -> np.ndarray:
        """The (3, 4) map so far (feature voxels)."""
        with torch.no_grad():
            return self._matrix().double().numpy()


@contextlib.contextmanager
def _one_thread():
    """torch on one intra-op thread inside the block (measured here: a refinement step's backward
    took 40 ms on two threads, 0.5 ms on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the stage

_IDENTITY = np.hstack([np.eye(3), np.zeros((3, 1))])


@dataclasses.dataclass
class RobustFit:
    matrix_ijk: np.ndarray  # (3, 4) on feature voxels: fixed voxel -> moving voxel (identity: no fit)
    inlier_share: float  # share of consistent coarse points within the inlier distance of the fit
    points: int  # consistent coarse points used by the fit
    consistency_mm: float  # median forward/backward disagreement of those points


def robust_fit(fix_feat, mov_feat, fix_mask, mov_mask, spacing_mm: float, settings: CorrectionSettings) -> RobustFit:
    """Discrete search both ways, consistent correspondences, least-trimmed-squares rigid fit."""
    corr = discrete_correspondences(fix_feat, mov_feat, fix_mask, mov_mask, spacing_mm, settings)
    if len(corr.points) < 6:  # too few consistent correspondences to fit anything
        return RobustFit(_IDENTITY, 0.0, len(corr.points), float("nan"))
    fitted, residual = lts_rigid(corr.points.double().numpy(), corr.targets.double().numpy(), settings.trim)
    step_mm = settings.step(max(fix_feat.shape[2:])) * spacing_mm
    return RobustFit(fitted, float(np.mean(residual * spacing_mm < settings.inlier_steps * step_mm)),
                     len(corr.points), float(np.median(corr.consistency.numpy())) * spacing_mm)


@dataclasses.dataclass
class RigidAnswer:
    start: str  # the start the answer composes with
    matrix_ijk: np.ndarray  # (3, 4) on feature voxels, applied before that start
    distances: dict[str, float]  # MIND-SSC distance of each start as it lies (on its own points)
    distance_after: float  # of the answer (<= the best start's: never worse)
    fit: RobustFit  # the chosen start's robust fit
    corrected_from: dict[str, float]  # the distance each start's robust fit reached
    rejected: bool  # nothing beat the best start, which is returned unchanged
    timings: dict


def _coarse_shifts(coarse: Coarse, name: str, pad: int, minima: int) -> list[np.ndarray]:
    """The translation search's minima for one start, as maps from moving feature voxels to padded
    fixed feature voxels."""
    (fix, fix_mask), (mov, mov_mask), f = coarse.fixed, coarse.movings[name], coarse.factor
    reach = pad // f
    points = ((mov_mask > 0.99) & (unpadded(fix_mask, reach) > 0.99)).float()
    outside = Overlap.build(mov, mov_mask, [(unpadded(fix, reach), unpadded(fix_mask, reach))]).outside_cost
    found = translation_search(F.pad(mov, (reach,) * 6), F.pad(points, (reach,) * 6), fix, fix_mask, reach,
                               outside, minima)
    return [_shifted_by(np.hstack([np.eye(3), m[:, 3:] * f]), pad) for m in found]


def unpadded(array, pad: int):
    """An image (torch or numpy, the last three axes spatial) without `pad` voxels on every side."""
    inner = slice(pad, -pad if pad else None)
    return array[..., inner, inner, inner]


def _inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a (3, 4) affine map."""
    inv = np.linalg.inv(matrix[:, :3])
    return np.column_stack([inv, -inv @ matrix[:, 3]])


def _shifted_by(matrix: np.ndarray, offset: float) -> np.ndarray:
    """The map followed by a shift of `offset` voxels along every axis (into a padded grid)."""
    return np.column_stack([matrix[:, :3], matrix[:, 3] + offset])


@dataclasses.dataclass
class Coarse:
    """The images averaged to the translation search's grid, `factor` feature voxels per coarse
    voxel, with their MIND-SSC: the fixed one padded by the search's reach (`pad` feature voxels
    = factor * reach coarse voxels), each start's moving one on the region."""

    fixed: tuple[torch.Tensor, torch.Tensor]
    movings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    factor: int


def correct(fix_padded: tuple[torch.Tensor, torch.Tensor], pad: int, movings: dict[str, tuple[torch.Tensor, torch.Tensor]],
            spacing_mm: float, settings: CorrectionSettings = CorrectionSettings(), coarse: Coarse | None = None,
            fixed_rows: Rows | None = None) -> RigidAnswer | None:
    """The correction of moving images already resampled on the fixed grid through different
    starts (`movings`: name -> (features, support)), against the fixed features and support on
    that grid padded by `pad` voxels each way (`fix_padded`).

    Scored from the moving side: each start's points are its moving-support voxels inside the
    fixed support as it lies, and the fixed features are sampled where a map sends them. The moving
    image (a US fan) is the one with the small support; the fixed one (an MR) is known around it,
    padded by the search's reach, so a large true shift costs no lost points (scored from the fixed
    side, a 25 mm shift pushed a third of the fan's points out of the US and the penalty for losing
    them outweighed the better match). Every start is scored as it lies, after its robust fit and
    after the global translation search (on `coarse`, when given); the best few are refined, and
    the best one near its start; an answer far from its start must beat the best near one by
    `settings.far_margin`; the answer is kept only if its distance is below the best start's,
    otherwise that start is returned unchanged. None when no start overlaps the fixed support.
    `fixed_rows`: `Rows(*fix_padded)` when the caller keeps it for the next frame."""
    t0 = time.perf_counter()
    fix_feat_p, fix_mask_p = fix_padded
    fix_feat, fix_mask = unpadded(fix_feat_p, pad), unpadded(fix_mask_p, pad)
    fixed_rows = fixed_rows if fixed_rows is not None else Rows(fix_feat_p, fix_mask_p)
    overlaps = {name: Overlap.build(feat, mask, [(fix_feat, fix_mask)]) for name, (feat, mask) in movings.items()}
    as_it_lies = _shifted_by(_IDENTITY, pad)  # a moving voxel -> the same place in the padded fixed grid

    def score(name: str, matrix_to_padded: np.ndarray) -> float:
        return overlaps[name].distance(fixed_rows, torch.from_numpy(matrix_to_padded))

    distances = {name: score(name, as_it_lies) for name in movings}
    usable = [name for name in movings if np.isfinite(distances[name])]
    if not usable:
        return None
    # candidates as maps from moving voxels to padded fixed voxels
    fits, candidates, corrected_from = {}, [], {}
    for name in usable:
        feat, mask = movings[name]
        candidates.append((distances[name], name, as_it_lies))
        fits[name] = robust_fit(fix_feat, feat, fix_mask, mask, spacing_mm, settings)
        fitted = _shifted_by(_inverse(fits[name].matrix_ijk), pad)
        corrected_from[name] = score(name, fitted)
        candidates.append((corrected_from[name], name, fitted))
        if coarse is not None:
            for shift in _coarse_shifts(coarse, name, pad, settings.search_minima):
                candidates.append((score(name, shift), name, shift))
    t1 = time.perf_counter()
    centres = {name: overlaps[name].points.mean(0) if len(overlaps[name].points) else torch.zeros(3) for name in usable}

    def moved_mm(name: str, m: np.ndarray) -> float:
        """How far a map moves its start's points (at their centre), mm."""
        c = centres[name].double().numpy()
        return float(np.linalg.norm(m[:, :3] @ c + m[:, 3] - (c + pad))) * spacing_mm

    # the best answer near its start (within settings.near_mm) and the best beyond: a far one wins
    # only by a margin (a deeper false minimum 30-40 mm away took 2 of 10 phantom frames otherwise)
    best_of = {True: (np.inf, "", as_it_lies), False: (np.inf, "", as_it_lies)}

    def offer(distance: float, name: str, m: np.ndarray) -> None:
        near = moved_mm(name, m) <= settings.near_mm
        if distance < best_of[near][0]:
            best_of[near] = (distance, name, m)

    for c in candidates:
        offer(*c)

    # the few best candidates are refined side by side (the deepest before refining is not always
    # the true basin), but not one that starts within 2 mm of one already taken from the same
    # start, and always the best one near its start; after each third of the steps the weaker half
    # of the others is dropped (scored as the answer is): 4 candidates cost 4 + 2 + 1 thirds of a
    # refinement each, not 4 x 3
    taken: list[tuple[str, np.ndarray]] = []
    runs: list[tuple[str, Refinement]] = []
    near_first = min((c for c in candidates if moved_mm(c[1], c[2]) <= settings.near_mm), key=lambda c: c[0], default=None)
    kept = None  # the best near candidate's run, never dropped
    for _, name, candidate in sorted(candidates, key=lambda c: c[0]):
        is_near_first = near_first is not None and candidate is near_first[2] and name == near_first[1]
        if len(runs) >= settings.refine_candidates and not is_near_first:
            continue
        sent = candidate[:, :3] @ centres[name].double().numpy() + candidate[:, 3]
        if not is_near_first and any(n == name and np.linalg.norm(sent - other) * spacing_mm < 2.0 for n, other in taken):
            continue
        taken.append((name, sent))
        runs.append((name, Refinement(overlaps[name], fixed_rows, candidate, centres[name], spacing_mm, settings)))
        kept = runs[-1][1] if is_near_first else kept
    thirds = [settings.refine_steps // 3, settings.refine_steps // 3]
    thirds.append(settings.refine_steps - sum(thirds))
    for part, steps in enumerate(thirds):
        for _, run in runs:
            run.advance(steps)
        scored = sorted(((score(name, m), name, run, m) for name, run in runs for m in [run.matrix()]), key=lambda r: r[0])
        for distance, name, _, m in scored:
            offer(distance, name, m)
        if part < len(thirds) - 1:
            others = [(name, run) for _, name, run, _ in scored if run is not kept]
            runs = others[:max(1, (len(others) + 1) // 2)] + [(name, run) for _, name, run, _ in scored if run is kept]
    (near_d, near_name, near_m), (far_d, far_name, far_m) = best_of[True], best_of[False]
    if far_d < near_d * (1.0 - settings.far_margin):
        best, start, matrix = far_d, far_name, far_m
    else:
        best, start, matrix = near_d, near_name, near_m
    t2 = time.perf_counter()
    best_start = min(usable, key=lambda n: distances[n])
    rejected = not best < distances[best_start]
    if rejected:
        start, matrix, best = best_start, as_it_lies, distances[best_start]
    return RigidAnswer(start, _inverse(_shifted_by(matrix, -pad)), distances, best, fits[start], corrected_from,
                       rejected, {"discrete": t1 - t0, "refine": t2 - t1})


# ---------------------------------------------------------------- on volumes

def padded(region: Volume, voxels: int) -> Volume:
    """The region grown by `voxels` on every side (same spacing and axes; LPS)."""
    origin = region.origin - region.direction @ (region.spacing * voxels)
    return grid_like([n + 2 * voxels for n in region.size_ijk], region.spacing, origin, region.direction)


def feature_grid(region: Volume, pool: int) -> Volume:
    """The geometry of the region averaged over pool^3 voxels: feature voxel c is the centre of
    region voxels pool * c .. pool * c + pool - 1 (LPS)."""
    size = [n // pool for n in region.size_ijk]
    origin = region.origin + region.direction @ (region.spacing * (pool - 1) / 2.0)
    return grid_like(size, region.spacing * pool, origin, region.direction)


def features(image: np.ndarray, mask: np.ndarray, pool: int, settings: CorrectionSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """MIND-SSC of an image on the region (k, j, i, float32 in [0, 1]) averaged over its support
    `mask` in pool^3 blocks, and the pooled mask (share of each block inside the support)."""
    img = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    msk = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    inside = F.avg_pool3d(msk, pool, stride=pool)
    pooled = F.avg_pool3d(img * msk, pool, stride=pool) / inside.clamp_min(1e-6)
    out = torch.zeros((1, 12) + pooled.shape[2:])
    if not bool((inside > 0).any()):
        return out, inside
    # MIND-SSC only over the support's box (and the reach of its patches): a US fan or a liver
    # fills a fraction of the cube, and the descriptor costs per voxel
    reach = settings.mind_radius + 2 * settings.mind_dilation
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        used = torch.nonzero((inside[0, 0] > 0).any(dim=other[1]).any(dim=other[0])).view(-1)
        box.append(slice(max(0, int(used[0]) - reach), int(used[-1]) + 1 + reach))
    crop = (slice(None), slice(None), *box)
    out[crop] = mind_ssc(pooled[crop], settings.mind_radius, settings.mind_dilation)
    return out, inside
