"""Removing text burned into the image borders (patient name, age, dates) before anything is
stored or shown, as the spec's first step.

Scanner annotations are small, bright, sharp-edged glyphs on the dark margin of the frame. Here:
in a band of 10% of each side, connected components of near-white pixels that are small (glyph
sized), lie wholly inside the band and have a dark surround are blanked, with a one-pixel margin
for anti-aliasing. Bright speckle in tissue has a grey surround and stays.
Anatomy at the border (a skull cut by the edge) is a large component reaching into the image
and is left alone.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

BAND = 0.10  # fraction of each side
BRIGHT = 0.78  # of the image's maximum grey level
MAX_GLYPH_FRACTION = 0.002  # of the image area, per component
DARK = 0.25  # text is drawn on the dark margin: its surroundings are below this (of the maximum)


def border_band(shape: tuple[int, int], band: float = BAND) -> np.ndarray:
    rows, cols = shape
    r, c = max(1, int(band * rows)), max(1, int(band * cols))
    inside = np.zeros(shape, bool)
    inside[r:rows - r, c:cols - c] = True
    return ~inside


def deidentify(pixels: np.ndarray) -> tuple[np.ndarray, int]:
    """A copy with burned-in border text blanked, and the number of pixels blanked."""
    band = border_band(pixels.shape)
    top = float(pixels.max())
    if top <= 0:
        return pixels.copy(), 0
    bright = pixels >= BRIGHT * top
    labels, n = ndimage.label(bright & band, structure=np.ones((3, 3)))
    if n == 0:
        return pixels.copy(), 0
    sizes = ndimage.sum(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    whole = ndimage.labeled_comprehension(band, labels, np.arange(1, n + 1), np.all, bool, False)
    # a component is text only if the bright structure it belongs to does not continue inwards
    full_labels, _ = ndimage.label(bright, structure=np.ones((3, 3)))
    interior = np.unique(full_labels[bright & ~band])
    owner = ndimage.maximum(full_labels, labels, index=np.arange(1, n + 1))  # each lies in one structure
    reaches_in = np.isin(owner, interior)
    # and if it sits on a dark background (overlay text), unlike bright speckle in tissue
    grown = ndimage.grey_dilation(labels, size=(5, 5))
    ring = np.where(labels == 0, grown, 0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a component with no ring: NaN, not text
        background = np.asarray(ndimage.mean(pixels, ring, index=np.arange(1, n + 1)))
    dark_around = np.nan_to_num(background, nan=0.0) < DARK * top
    glyph = (sizes <= MAX_GLYPH_FRACTION * pixels.size) & whole & ~reaches_in & dark_around
    text = np.isin(labels, np.nonzero(glyph)[0] + 1)
    text = ndimage.binary_dilation(text, iterations=1) & band
    out = pixels.copy()
    out[text] = 0
    return out, int(text.sum())
