"""From the fused head probability (original pixel grid) to the measurements.

- The head is the largest connected region above 0.5, holes filled.
- Its boundary is the 0.5 iso-contour of the probability, found with sub-pixel accuracy
  (marching squares); its length is `contour_length_mm`.
- The ellipse is a least-squares fit to the contour's points where the probability's edge is
  sharp (see EDGE_SHARPNESS); HC is the ellipse perimeter (Ramanujan),
  which is what HC18's reference and sonographers' ellipse tools report: `hc_mm`. BPD and OFD
  are the ellipse's minor and major axes (outer-to-outer, as the ellipse is drawn on the skull).
- An image where the network hesitates over much of the frame (not a fetal head ultrasound) is
  refused rather than measured; a less uncertain one is measured and flagged.
- The spec's boundary length, (dilate(mask) - mask) pixel count x pixel size, is reported as
  `pixel_count_hc_mm` for comparison only: a pixel chain over-estimates a smooth perimeter
  (by ~27% on a circle).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from FetalBiometryLib.ellipse import Ellipse, fit_ellipse

MIN_HEAD_AREA_FRACTION = 0.01  # a head smaller than 1% of the frame is not a transthalamic plane
DISAGREEMENT = 0.05  # contour length vs ellipse perimeter, relative
# Share of the image where the network hesitates (0.1 < p < 0.9). On 167 HC18 images: median 3%,
# max 10%; on CT, MR and synthetic non-ultrasound frames: 24-32%.
UNCERTAIN_FLAG = 0.08
UNCERTAIN_REFUSE = 0.15
# The ellipse is fitted to the contour points where the probability's gradient is at least this
# share of its median along the contour: where the skull is shadowed or faint the network's edge
# is blurred and its place a guess, while the sonographer's ellipse follows the visible skull.
# Chosen among 0 (all points) to 1.2 by 5-fold cross-validation by fetus on the 107 validation
# images (benchmarks/fetal_error_sources.py): every fold chose 0.85; held-out |HC difference|
# 1.86 -> 1.74 mm. Beyond ~1 too few points are left and the fits break down.
EDGE_SHARPNESS = 0.85
MIN_SHARP_SHARE = 1 / 3  # fewer sharp points than this share: the whole contour is fitted


@dataclasses.dataclass
class Measurement:
    hc_mm: float | None
    ellipse_px: Ellipse | None = None
    bpd_mm: float | None = None
    ofd_mm: float | None = None
    contour_length_mm: float | None = None
    pixel_count_hc_mm: float | None = None
    flags: list[str] = dataclasses.field(default_factory=list)
    reason: str | None = None  # why there is no measurement
    contour_px: np.ndarray | None = None  # (N, 2) x, y
    mask: np.ndarray | None = None  # the head region (bool, image grid) the contour bounds

    @property
    def confident(self) -> bool:
        return self.hc_mm is not None and not self.flags


def head_mask(probability: np.ndarray) -> np.ndarray | None:
    mask = probability >= 0.5
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    head = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(head)


def pixel_count_length(mask: np.ndarray) -> int:
    """The spec's boundary: dilate (3x3 square, as image libraries do by default) minus mask,
    counted. The ring is a 4-connected chain: ~4/pi times a smooth curve's length."""
    return int((ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool)) & ~mask).sum())


def sharp_points(probability: np.ndarray, contour: np.ndarray, sharpness: float) -> np.ndarray:
    """The (x, y) contour points where the probability's edge is at least `sharpness` x its median
    along the contour; the whole contour where that leaves too few."""
    if sharpness <= 0:
        return contour
    gy, gx = np.gradient(probability)
    at = (contour[:, 1], contour[:, 0])  # (rows, cols) of the points
    edge = np.hypot(ndimage.map_coordinates(gx, at, order=1), ndimage.map_coordinates(gy, at, order=1))
    keep = edge >= sharpness * np.median(edge)
    return contour[keep] if keep.mean() >= MIN_SHARP_SHARE else contour


def measure(probability: np.ndarray, pixel_mm: float, edge_sharpness: float = EDGE_SHARPNESS) -> Measurement:
    uncertain = float(((probability > 0.1) & (probability < 0.9)).mean())
    if uncertain > UNCERTAIN_REFUSE:
        return Measurement(None, reason=f"the segmentation is uncertain over {100 * uncertain:.0f}% of the image: "
                                        "not a recognisable fetal head ultrasound")
    mask = head_mask(probability)
    if mask is None or mask.mean() < MIN_HEAD_AREA_FRACTION:
        return Measurement(None, reason="no fetal head found")
    # the contour of the head region only (other blobs zeroed), padded so that it closes
    isolated = np.pad(np.where(ndimage.binary_dilation(mask, iterations=2), probability, 0.0), 1)
    contours = find_contours(isolated, 0.5)
    if not contours:
        return Measurement(None, reason="no closed head contour")
    contour = max(contours, key=len)[:, ::-1] - 1.0  # (row, col) -> (x, y), undo the padding
    ellipse = fit_ellipse(sharp_points(probability, contour, edge_sharpness)) or fit_ellipse(contour)
    if ellipse is None:
        return Measurement(None, reason="the head contour is not elliptic")
    closed = np.vstack([contour, contour[:1]])
    contour_mm = float(np.linalg.norm(np.diff(closed, axis=0), axis=1).sum()) * pixel_mm
    hc_mm = ellipse.perimeter() * pixel_mm
    flags = []
    rows, cols = probability.shape
    if mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any():
        flags.append("head touches the image border")
    x, y = ellipse.outline(360).T
    if x.min() < -0.5 or y.min() < -0.5 or x.max() > cols - 0.5 or y.max() > rows - 0.5:
        flags.append("ellipse extends beyond the image")
    if uncertain > UNCERTAIN_FLAG:
        flags.append(f"uncertain segmentation ({100 * uncertain:.0f}% of the image)")
    if abs(contour_mm - hc_mm) > DISAGREEMENT * hc_mm:
        flags.append(f"contour and ellipse disagree by {100 * abs(contour_mm - hc_mm) / hc_mm:.0f}%")
    return Measurement(hc_mm, ellipse, 2 * ellipse.b * pixel_mm, 2 * ellipse.a * pixel_mm, contour_mm,
                       pixel_count_length(mask) * pixel_mm, flags, contour_px=contour, mask=mask)
