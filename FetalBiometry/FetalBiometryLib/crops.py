"""The spec's four-corner crops, at the network's working resolution, and their fusion.

All in pixel (row, col) coordinates. The image is first scaled by one factor `f` on both axes
(the aspect ratio is kept: measuring on a grid squeezed to a square would turn the head's
ellipse into another ellipse), chosen so that a crop of Q = 0.9 of the image fits the network's
canvas; each crop is padded (not stretched) to the canvas. The four crops (top-left, top-right,
bottom-right, bottom-left) cover the whole image; where they overlap their probabilities are
averaged, so the fused map stays a probability.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

Q = 0.9
CANVAS_HW = (176, 256)  # network input (rows, cols), multiples of 8: a 800x540 crop of 0.9 fits at f = 0.356


def check_canvas(canvas_hw) -> tuple[int, int]:
    """A canvas (rows, cols), e.g. from `fetal train --canvas 248x360`, as a tuple of two positive multiples of 8."""
    if isinstance(canvas_hw, str):
        canvas_hw = canvas_hw.lower().split("x")
    try:
        rows, cols = (int(v) for v in canvas_hw)
    except (TypeError, ValueError):
        raise ValueError(f"canvas {canvas_hw!r}: give ROWSxCOLS, e.g. 176x256") from None
    if rows <= 0 or cols <= 0 or rows % 8 or cols % 8:
        raise ValueError(f"canvas {rows}x{cols}: rows and columns must be positive multiples of 8 (the network's stride)")
    return rows, cols


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the crops sit in the working-resolution image."""

    image_hw: tuple[int, int]  # original image (rows, cols)
    work_hw: tuple[int, int]  # scaled image (rows, cols)
    crop_hw: tuple[int, int]  # each crop, in the scaled image
    origins: tuple[tuple[int, int], ...]  # top-left (row, col) of each crop: TL, TR, BR, BL

    @property
    def scale(self) -> float:
        return self.work_hw[1] / self.image_hw[1]


def layout_for(image_hw: tuple[int, int], canvas_hw: tuple[int, int] = CANVAS_HW, q: float = Q) -> Layout:
    rows, cols = image_hw
    f = min(canvas_hw[0] / (q * rows), canvas_hw[1] / (q * cols))
    work = (max(int(round(rows * f)), 8), max(int(round(cols * f)), 8))
    crop = (min(int(round(q * work[0])), canvas_hw[0]), min(int(round(q * work[1])), canvas_hw[1]))
    r1, c1 = work[0] - crop[0], work[1] - crop[1]
    return Layout(image_hw, work, crop, ((0, 0), (0, c1), (r1, c1), (r1, 0)))


def to_working(image: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N, C, rows, cols) original -> working resolution (area averaging: no aliasing)."""
    return F.interpolate(image, size=layout.work_hw, mode="area")


def crops_of(work: torch.Tensor, layout: Layout, canvas_hw: tuple[int, int] = CANVAS_HW) -> torch.Tensor:
    """(1, C, work rows, cols) -> (4, C, canvas) zero-padded crops in TL, TR, BR, BL order."""
    h, w = layout.crop_hw
    out = work.new_zeros((len(layout.origins), work.shape[1], *canvas_hw))
    for n, (r, c) in enumerate(layout.origins):
        out[n, :, :h, :w] = work[0, :, r:r + h, c:c + w]
    return out


def mirrored(batch: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(N, C, canvas) crops with each crop's image region flipped left-right, the padding left
    where it is (right and bottom): the network sees a head at the same place on its canvas as
    in training. Its own inverse, so it also brings a mirrored crop's output back."""
    w = layout.crop_hw[1]
    out = batch.clone()
    out[..., :w] = batch[..., :w].flip(-1)
    return out


def fuse(probabilities: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(4, 1, canvas) crop probabilities -> (work rows, cols) map, averaged where crops overlap."""
    h, w = layout.crop_hw
    total = probabilities.new_zeros(layout.work_hw)
    count = probabilities.new_zeros(layout.work_hw)
    for n, (r, c) in enumerate(layout.origins):
        total[r:r + h, c:c + w] += probabilities[n, 0, :h, :w]
        count[r:r + h, c:c + w] += 1
    return total / count.clamp(min=1)


def to_original(work_map: torch.Tensor, layout: Layout) -> np.ndarray:
    """A working-resolution map back on the original pixel grid (bilinear; pixel centres map
    onto pixel centres as in the downscaling), float32 (rows, cols)."""
    up = F.interpolate(work_map[None, None], size=layout.image_hw, mode="bilinear", align_corners=False)
    return up[0, 0].numpy().astype(np.float32)
