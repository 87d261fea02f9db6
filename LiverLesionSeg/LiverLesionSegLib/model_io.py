"""The lesion network as a TorchScript file with its record: phases, working spacing and the
training set's intensity normalisation (so inference needs no labels), and how it was trained."""

from __future__ import annotations

from pathlib import Path

import torch

from deepnav import model_files
from deepnav.torch_runtime import forward_in, pick_device
from LiverLesionSegLib.network import CLASSES, PHASE_CHANNELS, LesionUNet
from LiverLesionSegLib.preprocess import WORK_SPACING_MM, Normalisation

MODEL_FORMAT = "deepnav.liverlesionseg.unet"
MODEL_VERSION = 1
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "liverlesionseg_default.pt"
# finds the liver on a series taller than the lesion network's training slabs (pipeline.localise_liver)
SHIPPED_LOCALISER = SHIPPED_MODEL.with_name("liverlesionseg_localiser.pt")


class LoadedModel:
    """A loaded network on a device: `model(x)` -> fp32 logits, the forward in `precision`
    ('fp32', or 'bf16' autocast: deepnav.torch_runtime.autocast; autocast runs inside a
    TorchScript module's operators, so the file's module serves both)."""

    def __init__(self, module, record: dict, device: torch.device, path: Path, localiser: LoadedModel | None = None,
                 precision: str = "fp32"):
        # channels-last 3D weights: oneDNN's convolutions on a 96^3 window take ~0.9x the time on this
        # CPU, faster in 10 of 10 paired runs (benchmarks/mixed_precision.py, results/channels_last_cpu.json)
        self.module = module.to(memory_format=torch.channels_last_3d)
        self.record, self.device, self.path, self.precision = record, device, path, precision
        self.normalisation = Normalisation.from_json(record["normalisation"])
        self.localiser = localiser

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return forward_in(self.precision, self.module, x)


def save_model(model: LesionUNet, normalisation: Normalisation, path: Path, metadata: dict | None = None) -> Path:
    record = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "phase_channels": list(PHASE_CHANNELS),
              "classes": list(CLASSES), "spacing_mm": WORK_SPACING_MM, "normalisation": normalisation.to_json(),
              **(metadata or {})}
    return model_files.save_torchscript(model, path, record)


def load_model(path: str | Path | None = None, device: str = "auto", localiser: str | Path | None = None,
               precision: str = "fp32") -> LoadedModel:
    """A model file; without `path`, the shipped model with the shipped localiser. `localiser`:
    a model that finds the liver on tall series first (see `pipeline.localise_liver`).
    `precision`: the networks' arithmetic, 'fp32' or 'bf16'."""
    if path is None:
        path, localiser = SHIPPED_MODEL, localiser or SHIPPED_LOCALISER
    dev = pick_device(device)
    module, record = model_files.load_archive(Path(path), dev, MODEL_FORMAT, MODEL_VERSION, "liver lesion segmentation")
    return LoadedModel(module, record, dev, Path(path), load_model(localiser, device, precision=precision) if localiser else None,
                       precision)
