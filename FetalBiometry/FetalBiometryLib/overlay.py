"""Overlay pictures that explain themselves: the de-identified image with the fitted ellipse, the
sub-pixel contour and the BPD / OFD axes drawn on it, and below it a caption with the values
(HC, BPD, OFD), a legend, a scale bar and any flag; an image that could not be measured shows
why, on the picture. Colours from the Okabe-Ito palette, told apart with any colour vision; text
by VTK (deepnav.pictures). Written as PNG with SimpleITK.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepnav.pictures import WHITE, put_text
from FetalBiometryLib.pipeline import Result

# Okabe & Ito (2008), "Color Universal Design": distinct for protan, deutan and tritan viewers
ORANGE, SKY_BLUE, YELLOW, REDDISH_PURPLE, VERMILLION = (230, 159, 0), (86, 180, 233), (240, 228, 66), \
    (204, 121, 167), (213, 94, 0)
ELLIPSE, CONTOUR, BPD, OFD = ORANGE, SKY_BLUE, YELLOW, REDDISH_PURPLE
LEGEND = (("ellipse fit (HC)", ELLIPSE), ("head contour", CONTOUR), ("BPD", BPD), ("OFD", OFD))
CAPTION_BACKGROUND = (32, 32, 32)
FONT = 15  # points (pixels at 72 dpi): legible at HC18's 800 px width
LINE = 24  # caption line height, pixels
SCALE_BARS_MM = (1, 2, 5, 10, 20, 50, 100)


def _draw(rgb: np.ndarray, points_xy: np.ndarray, colour, width: int = 2) -> None:
    """Points drawn as `width`-pixel dots: a one-pixel line vanishes in speckle."""
    for dx in range(width):
        for dy in range(width):
            x = np.round(points_xy[:, 0]).astype(int) + dx
            y = np.round(points_xy[:, 1]).astype(int) + dy
            ok = (x >= 0) & (y >= 0) & (x < rgb.shape[1]) & (y < rgb.shape[0])
            rgb[y[ok], x[ok]] = colour


def _segment(p0, p1, n: int = 400) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return np.asarray(p0) * (1 - t) + np.asarray(p1) * t


def caption_lines(result: Result, pixel_mm: float | None, width_px: int) -> list[tuple[str, tuple]]:
    """The caption's text lines and their colours: the values, or why there are none, and flags."""
    m = result.measurement
    chars = max(int(width_px / (0.55 * FONT)), 20)  # about how many characters fit on a line
    if m.hc_mm is None:
        return [(line, VERMILLION) for line in textwrap.wrap(f"NOT MEASURED: {m.reason}", chars)]
    lines = [(f"HC {m.hc_mm:.1f} mm    BPD {m.bpd_mm:.1f} mm    OFD {m.ofd_mm:.1f} mm"
              + (f"    (pixel {pixel_mm:.3f} mm)" if pixel_mm else ""), WHITE)]
    if m.flags:
        lines += [(line, ORANGE) for line in textwrap.wrap("check: " + "; ".join(m.flags), chars)]
    return lines


def scale_bar_mm(pixel_mm: float, width_px: int) -> int | None:
    """The longest round length (1, 2, 5, 10, ... mm) at most a quarter of the picture wide."""
    fitting = [mm for mm in SCALE_BARS_MM if mm / pixel_mm <= width_px / 4]
    return fitting[-1] if fitting else None


def overlay_picture(result: Result, pixel_mm: float | None) -> np.ndarray:
    """The annotated picture, RGB uint8: the image (drawings on it) above its caption."""
    grey = np.clip(result.pixels / max(float(result.pixels.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
    image = np.repeat(grey[..., None], 3, axis=-1)
    m = result.measurement
    if m.contour_px is not None:
        _draw(image, m.contour_px, CONTOUR)
    if m.ellipse_px is not None and m.hc_mm is not None:
        e = m.ellipse_px
        _draw(image, e.outline(4 * int(e.a + e.b) + 64), ELLIPSE)
        ofd, bpd = e.axes()
        _draw(image, _segment(*ofd), OFD)
        _draw(image, _segment(*bpd), BPD)

    width = image.shape[1]
    lines = caption_lines(result, pixel_mm, width - 16)
    caption = np.empty(((len(lines) + 2) * LINE + 8, width, 3), np.uint8)
    caption[:] = CAPTION_BACKGROUND
    y = 6
    for text, colour in lines:
        put_text(caption, text, 8, y, colour, FONT, bold=colour != WHITE)
        y += LINE
    x = 8  # legend: a short thick stroke of each colour, then its name
    for name, colour in LEGEND:
        caption[y + 8: y + 12, x: x + 22] = colour
        x = put_text(caption, name, x + 28, y, WHITE, FONT) + 18
    y += LINE
    bar_mm = scale_bar_mm(pixel_mm, width) if pixel_mm else None
    if bar_mm:
        bar_px = int(round(bar_mm / pixel_mm))
        caption[y + 8: y + 12, 8: 8 + bar_px] = WHITE
        caption[y + 4: y + 16, 8: 10] = WHITE  # end ticks
        caption[y + 4: y + 16, 6 + bar_px: 8 + bar_px] = WHITE
        put_text(caption, f"{bar_mm} mm", 16 + bar_px, y, WHITE, FONT)
    else:
        put_text(caption, "no scale: pixel size unknown", 8, y, WHITE, FONT)
    return np.concatenate([image, caption], axis=0)


def write_overlay(result: Result, path: Path, pixel_mm: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(overlay_picture(result, pixel_mm), isVector=True), str(path))
    return path

