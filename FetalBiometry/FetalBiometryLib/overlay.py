"""Overlay pictures: the de-identified image with the fitted ellipse (red), the sub-pixel
contour (green) and the BPD / OFD axes (yellow), written as PNG with SimpleITK."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from FetalBiometryLib.pipeline import Result

RED, GREEN, YELLOW = (255, 40, 40), (40, 230, 40), (255, 230, 0)


def _draw(rgb: np.ndarray, points_xy: np.ndarray, colour) -> None:
    x = np.round(points_xy[:, 0]).astype(int)
    y = np.round(points_xy[:, 1]).astype(int)
    ok = (x >= 0) & (y >= 0) & (x < rgb.shape[1]) & (y < rgb.shape[0])
    rgb[y[ok], x[ok]] = colour


def _segment(p0, p1, n: int = 400) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return np.asarray(p0) * (1 - t) + np.asarray(p1) * t


def write_overlay(result: Result, path: Path) -> Path:
    grey = np.clip(result.pixels / max(float(result.pixels.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    m = result.measurement
    if m.contour_px is not None:
        _draw(rgb, m.contour_px, GREEN)
    if m.ellipse_px is not None:
        e = m.ellipse_px
        _draw(rgb, e.outline(4 * int(e.a + e.b) + 64), RED)
        for end_points in e.axes():  # OFD, BPD
            _draw(rgb, _segment(*end_points), YELLOW)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    return path
