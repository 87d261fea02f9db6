"""Head segmentation of one image with the trained network: four corner crops, one batch,
fused back into the original frame as a probability map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepnav import model_files
from deepnav.torch_runtime import forward_in, pick_device
from FetalBiometryLib import crops
from FetalBiometryLib.network import HeadNet

MODEL_FORMAT = "deepnav.fetalbiometry.headnet"
MODEL_VERSION = 1
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "fetalbiometry_default.pt"


def normalise(pixels: np.ndarray) -> np.ndarray:
    """Grey levels to [0, 1]: 8-bit images by 255 (as trained), deeper ones by their 99.9th
    percentile, so a 16-bit export looks like the 8-bit frame it came from."""
    pixels = np.asarray(pixels, dtype=np.float32)
    top = 255.0 if pixels.max() <= 255.0 else float(np.percentile(pixels, 99.9))
    return np.clip(pixels / max(top, 1e-6), 0.0, 1.0)


def record(width: int, extra: dict | None = None, canvas_hw: tuple[int, int] = crops.CANVAS_HW) -> dict:
    """The model file's metadata. `canvas_hw` is the working scale the network was trained at: the
    image is scaled so that a corner crop fits this canvas (crops.layout_for), and measuring uses the
    model's own (a file without it, the default canvas)."""
    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "width": width, "canvas_hw": list(canvas_hw),
            "crop_fraction": crops.Q, **(extra or {})}


class HeadSegmenter:
    """The network on a device; its forward in `precision` ('fp32', or 'bf16' autocast:
    deepnav.torch_runtime.autocast), the logits back in fp32 before the sigmoid, the fusion of
    the crops and the ellipse fit."""

    def __init__(self, module, metadata: dict, device: torch.device, path: Path | None = None, precision: str = "fp32"):
        self.module, self.metadata, self.device, self.path, self.precision = module, metadata, device, path, precision
        self.canvas_hw = tuple(metadata.get("canvas_hw", crops.CANVAS_HW))
        self.q = float(metadata.get("crop_fraction", crops.Q))
        self.mirror = True  # test-time flip (see crop_probabilities); False for the plain path's cost

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto", precision: str = "fp32") -> HeadSegmenter:
        path = Path(path) if path is not None else SHIPPED_MODEL
        dev = pick_device(device)
        module, metadata = model_files.load_archive(path, dev, MODEL_FORMAT, MODEL_VERSION, "fetal head segmentation")
        return cls(module, metadata, dev, path, precision)

    @classmethod
    def from_module(cls, module: HeadNet, device: torch.device | str = "cpu", precision: str = "fp32",
                    canvas_hw: tuple[int, int] = crops.CANVAS_HW) -> HeadSegmenter:
        """An in-training network at its working scale (validation uses the same path as inference)."""
        return cls(module, record(0, canvas_hw=canvas_hw), torch.device(device), precision=precision)

    def probability(self, pixels: np.ndarray, mirror: bool | None = None) -> np.ndarray:
        """(rows, cols) grey image -> head probability on the same pixel grid, float32."""
        probabilities, layout = self.crop_probabilities(pixels, mirror)
        return crops.to_original(crops.fuse(probabilities, layout), layout)

    @torch.no_grad()
    def crop_probabilities(self, pixels: np.ndarray, mirror: bool | None = None) -> tuple[torch.Tensor, crops.Layout]:
        """The four corner crops' head probabilities (4, 1, canvas), and where they sit.

        `mirror` (default: the segmenter's): each crop is also segmented flipped left-right and the two probabilities
        averaged (test-time flip; the training's flip augmentation taught both): on the 107
        validation images |HC difference| 1.93 -> 1.86 mm for twice the network's time
        (benchmarks/fetal_error_sources.py)."""
        mirror = self.mirror if mirror is None else mirror
        layout = crops.layout_for(pixels.shape, self.canvas_hw, self.q)
        image = torch.from_numpy(normalise(pixels))[None, None]
        batch = crops.crops_of(crops.to_working(image, layout), layout, self.canvas_hw)
        if mirror:  # one batch of 8: the four crops, then their mirror images
            batch = torch.cat([batch, crops.mirrored(batch, layout)])
        probabilities = torch.sigmoid(forward_in(self.precision, self.module, batch.to(self.device)).cpu())
        if mirror:
            n = len(layout.origins)
            probabilities = (probabilities[:n] + crops.mirrored(probabilities[n:], layout)) / 2
        return probabilities, layout


def save(model: HeadNet, path: Path, extra: dict | None = None, canvas_hw: tuple[int, int] = crops.CANVAS_HW) -> Path:
    return model_files.save_torchscript(model, path, record(model.width, extra, canvas_hw))
