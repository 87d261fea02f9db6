"""A deterministic synthetic liver patient: preoperative MR and a breathing sequence of 3D US.

Anatomy is analytic (signed distances in mm, negative inside), evaluated at arbitrary LPS points,
so the MR and every US frame are sampled *exactly* through the known transforms; nothing is
interpolated twice. All positions are LPS mm in the MR (patient) frame.

Ground truth. For US frame t the scanner's geometry places the US volume coarsely in MR space
(as the spec's manual initial alignment does). The anatomy seen at US world point y is the
anatomy at MR point `G_t(y) = B_t(R_t(y))`: a rigid residual R_t (probe/patient motion the
initial alignment missed) followed by a smooth breathing deformation B_t(z) = z + b_t(z).
A registration finds phi with US(phi(x)) ~ MR(x), i.e. phi = G_t^-1; a landmark at MR point x
is therefore found in the US at `G_t^-1(x)`, which `us_points_from_mr` computes by fixed-point
inversion (b_t is smooth with Lipschitz constant well below 1).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from deepnav.imaging import Volume, rotation_matrix

LABEL_VESSEL = 1  # vessel label maps: portal-vein tree and inferior vena cava = 1


@dataclasses.dataclass
class Segment:
    a: np.ndarray
    b: np.ndarray
    radius: float


def _segment_sd(points: np.ndarray, seg: Segment) -> np.ndarray:
    ab = seg.b - seg.a
    t = np.clip(((points - seg.a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = seg.a + t[:, None] * ab
    return np.linalg.norm(points - closest, axis=1) - seg.radius


def _tubes_sd(points: np.ndarray, segments: list[Segment], margin: float = 4.0) -> np.ndarray:
    """Signed distance to a union of capsules, exact within `margin` mm of the surface (capped
    at 1000 mm further away). Only points near the tree, then near each segment, are computed:
    the full per-point distance to every segment made patient generation ~10x slower."""
    sd = np.full(len(points), 1e3, dtype=np.float32)
    lo = np.min([np.minimum(s.a, s.b) - s.radius for s in segments], axis=0) - margin
    hi = np.max([np.maximum(s.a, s.b) + s.radius for s in segments], axis=0) + margin
    in_tree = np.flatnonzero(_in_box(points, lo, hi))
    sub = points[in_tree]
    sub_sd = np.full(len(sub), 1e3, dtype=np.float32)
    for seg in segments:
        near = np.flatnonzero(_in_box(sub, np.minimum(seg.a, seg.b) - seg.radius - margin,
                                      np.maximum(seg.a, seg.b) + seg.radius + margin))
        if len(near):
            sub_sd[near] = np.minimum(sub_sd[near], _segment_sd(sub[near], seg))
    sd[in_tree] = sub_sd
    return sd


def _in_box(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    inside = (points[:, 0] >= lo[0]) & (points[:, 0] <= hi[0])
    inside &= (points[:, 1] >= lo[1]) & (points[:, 1] <= hi[1])
    inside &= (points[:, 2] >= lo[2]) & (points[:, 2] <= hi[2])
    return inside


def _occupancy(sd: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Soft inside fraction of a voxel of size ~width: the partial-volume effect."""
    return np.clip(0.5 - sd / width, 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class Anatomy:
    """One patient's anatomy, all in MR LPS mm."""

    liver_centre: np.ndarray
    liver_axes: np.ndarray
    liver_wobble: np.ndarray  # (4, 3) random directions and amplitudes of the surface
    dome_top: float
    dome_curvature: float
    body_axes: np.ndarray
    ivc_xy: np.ndarray
    aorta_xy: np.ndarray
    spine_xy: np.ndarray
    kidney_centre: np.ndarray
    portal: list[Segment]
    bifurcations: np.ndarray  # (N, 3)
    lesions: list[tuple[np.ndarray, float, bool]]  # centre, radius, hyper-echoic in US

    # --- signed distances (mm, negative inside) -------------------------------------------
    def body_sd(self, p):
        q = np.sqrt((p[:, 0] / self.body_axes[0]) ** 2 + (p[:, 1] / self.body_axes[1]) ** 2)
        return (q - 1.0) * self.body_axes.min()

    def dome_height(self, p):
        d2 = (p[:, 0] - self.liver_centre[0]) ** 2 + (p[:, 1] - self.liver_centre[1]) ** 2
        return self.dome_top - self.dome_curvature * d2

    def lung_sd(self, p):
        return np.maximum(self.dome_height(p) + 2.5 - p[:, 2], self.body_sd(p) + 12.0)

    def diaphragm_sd(self, p):
        return np.maximum(np.abs(p[:, 2] - self.dome_height(p)) - 2.5, self.body_sd(p) + 12.0)

    def liver_sd(self, p):
        rel = (p - self.liver_centre) / self.liver_axes
        r = np.linalg.norm(rel, axis=1) + 1e-6
        u = rel / r[:, None]
        wobble = sum(amp * np.cos(3.0 * (u @ d))
                     for d, amp in zip(self.liver_wobble[:, :3], self.liver_wobble[:, 3], strict=True))
        ellipsoid = (r - 1.0 - wobble) * self.liver_axes.min()
        below_dome = p[:, 2] - (self.dome_height(p) - 2.5)
        return np.maximum(ellipsoid, below_dome)

    def tube_z_sd(self, p, xy, radius):
        return np.hypot(p[:, 0] - xy[0], p[:, 1] - xy[1]) - radius

    def kidney_sd(self, p):
        rel = (p - self.kidney_centre) / np.array([28.0, 24.0, 48.0])
        return (np.linalg.norm(rel, axis=1) - 1.0) * 24.0

    def ivc_sd(self, p):
        return self.tube_z_sd(p, self.ivc_xy, 10.0)

    def vessels_sd(self, p):
        """The labelled vessels: portal-vein tree and IVC (the spec's vessel label)."""
        return np.minimum(_tubes_sd(p, self.portal), self.ivc_sd(p))

    def lesion_sd(self, p):
        sd = np.full(len(p), 1e3, dtype=np.float32)
        for centre, radius, _ in self.lesions:
            sd = np.minimum(sd, np.linalg.norm(p - centre, axis=1) - radius)
        return sd

    def landmarks(self) -> tuple[np.ndarray, list[str]]:
        points = [*self.bifurcations, *(c for c, _, _ in self.lesions)]
        names = [f"bifurcation-{i}" for i in range(len(self.bifurcations))]
        names += [f"lesion-{i}" for i in range(len(self.lesions))]
        return np.array(points), names


def make_anatomy(rng: np.random.Generator) -> Anatomy:
    liver_centre = np.array([-55.0, -5.0, 0.0]) + rng.uniform(-6, 6, 3)
    liver_axes = np.array([78.0, 62.0, 58.0]) * rng.uniform(0.9, 1.1, 3)
    wobble_dirs = rng.normal(size=(4, 3))
    wobble_dirs /= np.linalg.norm(wobble_dirs, axis=1, keepdims=True)
    liver_wobble = np.hstack([wobble_dirs, rng.uniform(0.03, 0.08, (4, 1))])
    anatomy = Anatomy(
        liver_centre=liver_centre,
        liver_axes=liver_axes,
        liver_wobble=liver_wobble,
        dome_top=liver_centre[2] + 0.75 * liver_axes[2],
        dome_curvature=rng.uniform(0.004, 0.007),
        body_axes=np.array([150.0, 110.0]) * rng.uniform(0.93, 1.07, 2),
        ivc_xy=np.array([-22.0, 28.0]) + rng.uniform(-4, 4, 2),
        aorta_xy=np.array([18.0, 42.0]) + rng.uniform(-4, 4, 2),
        spine_xy=np.array([0.0, 78.0]) + rng.uniform(-3, 3, 2),
        kidney_centre=np.array([-68.0, 58.0, -62.0]) + rng.uniform(-5, 5, 3),
        portal=[],
        bifurcations=np.zeros((0, 3)),
        lesions=[],
    )
    _grow_portal_tree(anatomy, rng)
    _place_lesions(anatomy, rng)
    return anatomy


def _grow_portal_tree(anatomy: Anatomy, rng: np.random.Generator, depth: int = 4) -> None:
    """A binary tree from the hilum: radii 6.5 -> ~2 mm, branches kept inside the liver."""
    hilum = anatomy.liver_centre + np.array([18.0, 12.0, -22.0]) + rng.uniform(-4, 4, 3)
    entry = hilum + np.array([12.0, 8.0, -30.0])
    segments = [Segment(entry, hilum, 6.5)]
    bifurcations = []
    stack = [(hilum, _unit(hilum - entry), 6.5 * 0.8, 28.0, depth)]
    while stack:
        start, direction, radius, length, level = stack.pop()
        if level == 0:
            continue
        bifurcations.append(start)
        for side in (-1.0, 1.0):
            axis = _unit(np.cross(direction, rng.normal(size=3)))
            angle = side * rng.uniform(0.4, 0.8)
            new_dir = _unit(direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle))
            seg_len = length * rng.uniform(0.8, 1.15)
            end = start + new_dir * seg_len
            # shorten until the branch ends well inside the liver
            for _ in range(4):
                if anatomy.liver_sd(end[None])[0] < -radius - 4:
                    break
                seg_len *= 0.6
                end = start + new_dir * seg_len
            else:
                continue
            segments.append(Segment(start, end, radius))
            stack.append((end, new_dir, max(radius * 0.72, 1.6), length * 0.78, level - 1))
    anatomy.portal = segments
    inside = [b for b in bifurcations if anatomy.liver_sd(b[None])[0] < -5]
    anatomy.bifurcations = np.array(inside)


def _place_lesions(anatomy: Anatomy, rng: np.random.Generator, count: int = 3) -> None:
    for _ in range(200):
        if len(anatomy.lesions) == count:
            break
        radius = rng.uniform(6.0, 12.0)
        centre = anatomy.liver_centre + rng.uniform(-0.6, 0.6, 3) * anatomy.liver_axes
        p = centre[None]
        clear_of_vessels = anatomy.vessels_sd(p)[0] > radius + 3
        clear_of_others = all(np.linalg.norm(centre - c) > radius + r + 5 for c, r, _ in anatomy.lesions)
        if anatomy.liver_sd(p)[0] < -radius - 3 and clear_of_vessels and clear_of_others:
            anatomy.lesions.append((centre, radius, bool(rng.random() < 0.5)))


def _unit(v):
    return v / np.linalg.norm(v)


# --- MR rendering -------------------------------------------------------------------------

def render_mr(anatomy: Anatomy, points: np.ndarray, liver_sd: np.ndarray, vessels_sd: np.ndarray) -> np.ndarray:
    """T1-weighted portal-venous-phase MR intensities at LPS points (arbitrary units ~0-1200).
    The liver and vessel distances are passed in because the label maps need them too."""
    p = points
    occ = _occupancy
    value = 320.0 * occ(anatomy.body_sd(p), 2.0)  # fat / muscle of the body wall
    layers = [
        (anatomy.lung_sd(p), 35.0),
        (anatomy.kidney_sd(p), 620.0),
        (liver_sd, 760.0),
        (anatomy.diaphragm_sd(p), 420.0),
        (anatomy.tube_z_sd(p, anatomy.spine_xy, 18.0), 260.0),
        (anatomy.tube_z_sd(p, anatomy.aorta_xy, 10.0), 1150.0),
        (vessels_sd, 1080.0),
    ]
    for sd, intensity in layers:
        o = occ(sd)
        value = value * (1 - o) + intensity * o
    for centre, radius, hyper in anatomy.lesions:
        o = occ(np.linalg.norm(p - centre, axis=1) - radius)
        value = value * (1 - o) + (930.0 if hyper else 380.0) * o
    bias = 1.0 + 0.12 * np.sin(p[:, 0] / 90.0 + 0.5) * np.cos(p[:, 1] / 110.0)
    return (value * bias).astype(np.float32)


# --- US rendering -------------------------------------------------------------------------

@dataclasses.dataclass
class Probe:
    """A 3D convex probe: apex on the skin, a cone of half-angle `half_angle` along `axis`."""

    apex: np.ndarray
    axis: np.ndarray
    lateral: np.ndarray  # unit, perpendicular to axis
    half_angle: float = np.deg2rad(38.0)
    depth: float = 150.0


def make_probe(anatomy: Anatomy, rng: np.random.Generator) -> Probe:
    """Anterior-right subcostal position aimed at the liver centre, with some tilt."""
    target = anatomy.liver_centre + rng.uniform(-8, 8, 3)
    angle = np.deg2rad(rng.uniform(-115, -95))  # direction in the axial plane, anterior-right
    skin = np.array([anatomy.body_axes[0] * np.cos(angle), anatomy.body_axes[1] * np.sin(angle), target[2] - 25])
    axis = _unit(target - skin)
    lateral = _unit(np.cross(axis, np.array([0.0, 0.0, 1.0])))
    return Probe(apex=skin - 5 * axis, axis=axis, lateral=lateral)


def us_grid(probe: Probe, spacing=(1.2, 1.2, 1.0), lateral_mm=150.0) -> Volume:
    """The US volume's grid: k along the beam axis, i/j across it (an oblique direction)."""
    e_k = probe.axis
    e_i = probe.lateral
    e_j = np.cross(e_k, e_i)
    direction = np.stack([e_i, e_j, e_k], axis=1)
    size = (int(lateral_mm / spacing[0]), int(lateral_mm / spacing[1]), int(probe.depth / spacing[2]))
    centre_offset = direction @ (np.array([size[0] - 1, size[1] - 1, 0]) * np.array(spacing) / 2)
    origin = probe.apex - centre_offset
    return Volume(np.zeros(size[::-1], np.float32), spacing, origin, direction)


def render_us(
    anatomy: Anatomy,
    fov: Volume,
    anatomy_points: np.ndarray,
    vessels_sd: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """B-mode echo (uint8) on `fov`'s grid; `anatomy_points` are the MR-space points G(y) of its
    voxels y and `vessels_sd` the labelled vessels' distance there; outside the cone `fov` is 0.

    Shadowing and attenuation integrate along the grid's k axis (the probe axis): a parallel-beam
    approximation of the cone, good enough for the appearance the registration must cope with.
    """
    shape = fov.array.shape
    p = anatomy_points
    occ = _occupancy
    echo = 0.12 * occ(anatomy.body_sd(p), 2.0)
    attenuation = np.full(len(p), 0.004, np.float32)  # 1/mm, soft tissue
    liver_o = occ(anatomy.liver_sd(p))
    echo = echo * (1 - liver_o) + 0.15 * liver_o
    kidney_o = occ(anatomy.kidney_sd(p))
    echo = echo * (1 - kidney_o) + 0.08 * kidney_o
    for centre, radius, hyper in anatomy.lesions:
        d = np.linalg.norm(p - centre, axis=1) - radius
        o = occ(d)
        echo = echo * (1 - o) + (0.4 if hyper else 0.05) * o
        echo = np.maximum(echo, 0.35 * np.exp(-(d / 1.2) ** 2) * (not hyper))  # halo of hypo lesions
    vessels = np.minimum(vessels_sd, anatomy.tube_z_sd(p, anatomy.aorta_xy, 10.0))
    vessel_o = occ(vessels)
    echo = echo * (1 - vessel_o) + 0.01 * vessel_o
    echo = np.maximum(echo, 0.35 * np.exp(-((vessels + 0.6) / 0.8) ** 2))  # bright vessel walls
    lung_o = occ(anatomy.lung_sd(p))
    echo = echo * (1 - lung_o) + 0.04 * lung_o
    attenuation += 0.4 * lung_o  # air stops the beam
    diaphragm = np.exp(-(anatomy.diaphragm_sd(p) / 1.5).clip(min=0) ** 2) * occ(anatomy.diaphragm_sd(p) - 1.0, 3.0)
    echo = np.maximum(echo, 0.95 * diaphragm)
    spine_sd = anatomy.tube_z_sd(p, anatomy.spine_xy, 18.0)
    echo = np.maximum(echo, 1.0 * np.exp(-(spine_sd / 1.5) ** 2))
    attenuation += 0.6 * occ(spine_sd)

    echo = echo.reshape(shape)
    attenuation = attenuation.reshape(shape)
    dk = fov.spacing[2]
    transmitted = np.exp(-np.cumsum(attenuation, axis=0) * dk)
    depth = np.arange(shape[0], dtype=np.float32)[:, None, None] * dk
    gain = np.exp(0.0025 * depth)  # time-gain compensation, partial
    # fully developed speckle: Rayleigh amplitude of a correlated complex Gaussian field
    re, im = (_gaussian_filter(rng.normal(size=shape).astype(np.float32), (1.0, 1.0, 0.8)) for _ in range(2))
    speckle = np.hypot(re, im)
    speckle /= speckle.mean()
    intensity = echo * transmitted * gain * speckle
    bmode = np.log1p(12.0 * intensity) / np.log1p(12.0)  # log compression
    bmode *= fov.array
    return np.clip(bmode * 255.0, 0, 255).astype(np.uint8)


def _gaussian_filter(array: np.ndarray, sigma_ijk: tuple[float, float, float]) -> np.ndarray:
    """Gaussian smoothing in voxels with SimpleITK (what Slicer bundles; no SciPy needed)."""
    image = sitk.GetImageFromArray(array)
    return sitk.GetArrayFromImage(sitk.DiscreteGaussian(image, [s * s for s in sigma_ijk], 32, 0.01, False))


def cone_mask(probe: Probe, grid: Volume) -> np.ndarray:
    """1 inside the probe's field of view (cone of half-angle, depth), 0 outside, on `grid`."""
    shape = grid.array.shape
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    pts = grid.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    rel = pts - probe.apex
    along = rel @ probe.axis
    radial = np.linalg.norm(rel - along[:, None] * probe.axis, axis=1)
    inside = (along > 8.0) & (along < probe.depth) & (radial <= along * np.tan(probe.half_angle))
    return inside.reshape(shape).astype(np.float32)


# --- motion --------------------------------------------------------------------------------

@dataclasses.dataclass
class FrameMotion:
    """G(y) = B(R(y)): US world point y -> MR anatomy point. R about `centre`, then breathing."""

    rotation: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,) mm
    centre: np.ndarray  # (3,) mm
    breath_amplitude: float  # mm, along breath_direction at the liver dome
    breath_direction: np.ndarray
    rbf_centres: np.ndarray  # (M, 3) smooth non-rigid components
    rbf_vectors: np.ndarray  # (M, 3) mm
    rbf_sigma: float
    dome: np.ndarray  # (3,) where breathing is largest
    breath_sigma: float = 70.0

    def rigid(self, y: np.ndarray) -> np.ndarray:
        return (y - self.centre) @ self.rotation.T + self.centre + self.translation

    def breathing(self, z: np.ndarray) -> np.ndarray:
        """Displacement b(z) in mm: S-I dominated, largest near the dome, plus local RBFs."""
        d2 = np.sum((z - self.dome) ** 2, axis=1)
        envelope = np.exp(-d2 / (2 * self.breath_sigma**2))
        b = (self.breath_amplitude * envelope)[:, None] * self.breath_direction
        for c, v in zip(self.rbf_centres, self.rbf_vectors, strict=True):
            w = np.exp(-np.sum((z - c) ** 2, axis=1) / (2 * self.rbf_sigma**2))
            b = b + w[:, None] * v
        return b

    def us_to_mr(self, y: np.ndarray) -> np.ndarray:
        """G(y): where the anatomy seen at US point y lies in the MR (LPS mm)."""
        z = self.rigid(y)
        return z + self.breathing(z)

    def mr_to_us(self, x: np.ndarray, iterations: int = 40) -> np.ndarray:
        """G^-1(x): where an MR point appears in the US volume (fixed-point inversion)."""
        z = np.array(x, dtype=np.float64)
        for _ in range(iterations):
            z = x - self.breathing(z)
        return (z - self.centre - self.translation) @ self.rotation + self.centre


def make_motions(anatomy: Anatomy, rng: np.random.Generator, frames: int) -> list[FrameMotion]:
    """A half breathing cycle: amplitude rises as (1 - cos(pi t)) / 2 over the frames, on top of
    a patient-level rigid residual (the coarse initial alignment's error) with per-frame jitter."""
    base_rot = rng.uniform(-4.0, 4.0, 3)
    base_shift = rng.uniform(-4.0, 4.0, 3)
    amplitude = rng.uniform(7.0, 11.0)
    direction = _unit(np.array([0.0, rng.uniform(-0.35, -0.15), -1.0]))  # inferior and anterior
    dome = anatomy.liver_centre + np.array([0.0, 0.0, 0.7 * anatomy.liver_axes[2]])
    rbf_centres = anatomy.liver_centre + rng.uniform(-0.6, 0.6, (3, 3)) * anatomy.liver_axes
    rbf_shape = rng.uniform(-1, 1, (3, 3))
    motions = []
    for t in np.linspace(0.0, 1.0, frames):
        phase = (1 - np.cos(np.pi * t)) / 2
        rot = np.deg2rad(base_rot + rng.uniform(-1.0, 1.0, 3))
        motions.append(
            FrameMotion(
                rotation=rotation_matrix(rot),
                translation=base_shift + rng.uniform(-1.0, 1.0, 3),
                centre=anatomy.liver_centre.copy(),
                breath_amplitude=amplitude * phase,
                breath_direction=direction,
                rbf_centres=rbf_centres,
                rbf_vectors=rbf_shape * 3.0 * phase,
                rbf_sigma=28.0,
                dome=dome,
            )
        )
    return motions


# --- the patient -----------------------------------------------------------------------------

@dataclasses.dataclass
class USFrame:
    image: Volume  # uint8 B-mode
    vessels: Volume  # uint8 label on the same grid
    fov: Volume  # uint8 1 inside the probe's cone
    landmarks_lps: np.ndarray  # true positions in the US (LPS mm), same order as the MR's
    motion: FrameMotion


@dataclasses.dataclass
class Patient:
    seed: int
    anatomy: Anatomy
    mr: Volume  # int16
    liver: Volume  # uint8 mask on the MR grid
    vessels: Volume  # uint8 label on the MR grid
    landmarks_lps: np.ndarray
    landmark_names: list[str]
    frames: list[USFrame]


def _inside(points_lps: np.ndarray, volume: Volume, mask: np.ndarray | None = None) -> np.ndarray:
    """Points whose nearest voxel lies in `volume` (and, given a `mask` on it, in the mask)."""
    idx = np.round(volume.lps_to_index(points_lps)).astype(int)
    ok = np.all((idx >= 0) & (idx < np.array(volume.size_ijk)), axis=1)
    if mask is not None:
        ok[ok] = mask[idx[ok, 2], idx[ok, 1], idx[ok, 0]] > 0
    return ok


def landmarks_in_view(patient: Patient, frame: USFrame, grid: Volume) -> np.ndarray:
    """Mask of the landmarks a registration on `grid` can be scored on: the MR landmark inside
    the grid and its true US position inside the frame's field of view."""
    return _inside(patient.landmarks_lps, grid) & _inside(frame.landmarks_lps, frame.fov, frame.fov.array)


def _grid_points(grid: Volume) -> np.ndarray:
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in grid.array.shape), indexing="ij")
    return grid.index_to_lps(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)).astype(np.float32)


def mr_grid(anatomy: Anatomy, rng: np.random.Generator, oblique: bool, spacing=(1.5, 1.5, 2.5)) -> Volume:
    """An anisotropic MR grid (thick axial slices) around the liver, non-zero origin."""
    extent = np.array([250.0, 210.0, 190.0])
    size = np.round(extent / np.array(spacing)).astype(int)
    direction = rotation_matrix(np.deg2rad([6.0, -4.0, 12.0])) if oblique else np.eye(3)
    centre = anatomy.liver_centre + np.array([25.0, 20.0, 5.0])
    origin = centre - direction @ ((size - 1) * np.array(spacing) / 2)
    return Volume(np.zeros(size[::-1], np.float32), spacing, origin, direction)


def make_patient(seed: int, frames: int = 8, oblique: bool | None = None) -> Patient:
    """Generate patient `seed`: MR (+ liver mask, vessel labels, landmarks) and `frames` US
    volumes over half a breathing cycle. Same seed, same patient, bit for bit."""
    rng = np.random.default_rng(seed)
    anatomy = make_anatomy(rng)
    oblique = bool(seed % 2) if oblique is None else oblique
    grid = mr_grid(anatomy, rng, oblique)
    pts = _grid_points(grid)
    shape = grid.array.shape
    liver_sd, vessels_sd = anatomy.liver_sd(pts), anatomy.vessels_sd(pts)
    mr_values = render_mr(anatomy, pts, liver_sd, vessels_sd).reshape(shape)
    mr_values += rng.normal(0.0, 14.0, shape).astype(np.float32)
    mr = grid.with_array(np.clip(mr_values, 0, 4000).astype(np.int16))
    liver = grid.with_array((liver_sd < 0).reshape(shape).astype(np.uint8))
    vessels = grid.with_array(((vessels_sd < 0) & (anatomy.body_sd(pts) < 0)).reshape(shape).astype(np.uint8))
    landmarks, names = anatomy.landmarks()

    probe = make_probe(anatomy, rng)
    us_geometry = us_grid(probe)
    us_pts = _grid_points(us_geometry)
    fov = us_geometry.with_array(cone_mask(probe, us_geometry).astype(np.uint8))
    us_frames = []
    for motion in make_motions(anatomy, rng, frames):
        anat_pts = motion.us_to_mr(us_pts.astype(np.float64)).astype(np.float32)
        frame_vessels_sd = anatomy.vessels_sd(anat_pts)
        bmode = render_us(anatomy, fov, anat_pts, frame_vessels_sd, rng)
        label = (frame_vessels_sd < 0).reshape(us_geometry.array.shape) & (fov.array > 0)
        us_frames.append(
            USFrame(
                image=us_geometry.with_array(bmode),
                vessels=us_geometry.with_array(label.astype(np.uint8)),
                fov=fov,
                landmarks_lps=motion.mr_to_us(landmarks),
                motion=motion,
            )
        )
    return Patient(seed, anatomy, mr, liver, vessels, landmarks, names, us_frames)
