"""The head ellipse: fitting, perimeter, rasterising, outline.

Pixel coordinates throughout: x to the right (column), y down (row), origin at the centre of
the first pixel. `a` and `b` are semi-axes (a >= b); `angle` is the direction of the a-axis,
measured from +x towards +y, in radians within [0, pi).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from skimage.measure import EllipseModel


@dataclasses.dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    b: float
    angle: float

    def perimeter(self) -> float:
        """Ramanujan's second approximation (relative error < 1e-9 for head-like ellipses);
        HC18's reference head circumference is this perimeter."""
        a, b = self.a, self.b
        h = ((a - b) / (a + b)) ** 2
        return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))

    def scaled(self, s: float) -> Ellipse:
        return Ellipse(self.cx * s, self.cy * s, self.a * s, self.b * s, self.angle)

    def inside(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (x - self.cx) * c + (y - self.cy) * s
        v = -(x - self.cx) * s + (y - self.cy) * c
        return (u / self.a) ** 2 + (v / self.b) ** 2 <= 1.0

    def filled(self, shape_hw: tuple[int, int]) -> np.ndarray:
        """Boolean mask of the pixels whose centres lie inside."""
        y, x = np.mgrid[0:shape_hw[0], 0:shape_hw[1]]
        return self.inside(x, y)

    def outline(self, n: int = 720) -> np.ndarray:
        """(n, 2) points (x, y) on the ellipse."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        c, s = math.cos(self.angle), math.sin(self.angle)
        u, v = self.a * np.cos(t), self.b * np.sin(t)
        return np.c_[self.cx + u * c - v * s, self.cy + u * s + v * c]

    def axes(self) -> tuple[np.ndarray, np.ndarray]:
        """End points (2, 2) (x, y) of the major axis (OFD) and of the minor axis (BPD)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        major = np.array([[self.cx - self.a * c, self.cy - self.a * s], [self.cx + self.a * c, self.cy + self.a * s]])
        minor = np.array([[self.cx + self.b * s, self.cy - self.b * c], [self.cx - self.b * s, self.cy + self.b * c]])
        return major, minor

    def as_dict(self, pixel_mm: float | None = None) -> dict:
        out = {"cx": self.cx, "cy": self.cy, "a": self.a, "b": self.b, "angle_rad": self.angle}
        if pixel_mm is not None:
            out = {k: (v * pixel_mm if k != "angle_rad" else v) for k, v in out.items()}
        return out


def fit_ellipse(points_xy: np.ndarray) -> Ellipse | None:
    """Least-squares (algebraic, Halir-Flusser) ellipse through (N, 2) points; None if the
    points do not define one."""
    if len(points_xy) < 6:
        return None
    model = EllipseModel.from_estimate(np.asarray(points_xy, dtype=np.float64))
    if not model:
        return None
    (cx, cy), (ra, rb), theta = model.center, model.axis_lengths, model.theta
    if not np.all(np.isfinite([cx, cy, ra, rb, theta])) or min(ra, rb) <= 0:
        return None
    if rb > ra:
        ra, rb, theta = rb, ra, theta + math.pi / 2
    return Ellipse(float(cx), float(cy), float(ra), float(rb), float(theta % math.pi))
