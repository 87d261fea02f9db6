"""Text on pictures, for the modules' overlay PNGs: rendered by VTK's FreeType text renderer
(VTK is already a dependency and is part of Slicer), so no font file or plotting library is
needed. Pictures are RGB uint8 numpy arrays (rows, columns, 3).
"""

from __future__ import annotations

import numpy as np

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def text_coverage(text: str, size: int = 13, bold: bool = False) -> np.ndarray:
    """How much each pixel of `text` rendered at `size` points is covered by ink: (rows, columns)
    float32 in [0, 1]; empty (0, 0) for no text."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    prop = vtk.vtkTextProperty()
    prop.SetFontSize(size)
    prop.SetBold(bold)
    prop.SetColor(1.0, 1.0, 1.0)
    prop.SetBackgroundOpacity(0.0)
    image, dims = vtk.vtkImageData(), [0, 0]
    if not text or not vtk.vtkTextRenderer().RenderString(prop, text, image, dims, 72):
        return np.zeros((0, 0), np.float32)
    nx, ny, _ = image.GetDimensions()
    rgba = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)[::-1]  # VTK rows go up
    return rgba[: dims[1], : dims[0], 3].astype(np.float32) / 255.0


def put_text(rgb: np.ndarray, text: str, x: int, y: int, colour=BLACK, size: int = 13, bold: bool = False) -> int:
    """Draw `text` with its top left corner at column x, row y (clipped to the picture); returns
    the column just after it."""
    ink = text_coverage(text, size, bold)
    h, w = min(ink.shape[0], rgb.shape[0] - y), min(ink.shape[1], rgb.shape[1] - x)
    if h <= 0 or w <= 0:
        return x
    region = rgb[y: y + h, x: x + w].astype(np.float32)
    alpha = ink[:h, :w, None]
    rgb[y: y + h, x: x + w] = (region * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha).astype(np.uint8)
    return x + ink.shape[1]


def text_strip(text: str, width: int, height: int = 18, size: int = 13) -> np.ndarray:
    """A white strip (height x width RGB uint8) with `text` in black, vertically centred."""
    strip = np.full((height, width, 3), 255, np.uint8)
    ink_height = text_coverage(text, size).shape[0]
    put_text(strip, text, 4, max((height - ink_height) // 2, 0), BLACK, size)
    return strip
