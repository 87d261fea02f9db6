"""Saving and loading the trained cascade: TorchScript (.pt) and torch.export (.pt2), each with
its `deepnav.json` record (format, version, grid, training summary; see deepnav.model_files)."""

from __future__ import annotations

from pathlib import Path

import torch

from deepnav import model_files
from deepnav.torch_runtime import pick_device
from MRUSFusionLib.networks import GRID, Cascade

MODEL_FORMAT = "deepnav.mrusfusion.cascade"
MODEL_VERSION = 1
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "mrusfusion_default.pt"


def _record(metadata: dict | None) -> dict:
    return {"format": MODEL_FORMAT, "version": MODEL_VERSION, "grid": GRID, "spacing_mm": 1.0, **(metadata or {})}


def save_torchscript(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    return model_files.save_torchscript(model, path, _record(metadata))


def save_exported(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    model = model.eval().cpu()
    # two distinct tensors: passing one tensor twice makes torch.export alias the inputs, and the
    # exported graph then reads the fixed image where the moving one should be
    fixed, moving = torch.zeros(1, 1, GRID, GRID, GRID), torch.zeros(1, 1, GRID, GRID, GRID)
    program = torch.export.export(model, (fixed, moving))
    # the program keeps its example inputs (16 MB of zeros) and save() would store them
    program._example_inputs = None
    return model_files.save_exported(program, path, _record(metadata))


class LoadedModel:
    """A loaded cascade on a device: `model(fixed, moving)` -> (warped, disp, matrix, bspline)."""

    def __init__(self, module, metadata: dict, device: torch.device, path: Path):
        self.module = module
        self.metadata = metadata
        self.device = device
        self.path = path

    @torch.no_grad()
    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor):
        return self.module(fixed.to(self.device), moving.to(self.device))

    def eager(self) -> Cascade:
        """An eager Cascade with these weights (to fine-tune per patient)."""
        model = Cascade()
        learned = model.state_dict().keys()  # a scripted module also lists the derived buffers
        model.load_state_dict({k: v for k, v in self.module.state_dict().items() if k in learned})
        return model


def load_model(path: str | Path | None = None, device: str = "auto") -> LoadedModel:
    """Load a .pt (TorchScript) or .pt2 (torch.export) cascade; the shipped model by default."""
    path = Path(path) if path is not None else SHIPPED_MODEL
    dev = pick_device(device)
    module, metadata = model_files.load_archive(path, dev, MODEL_FORMAT, MODEL_VERSION, "MR-US fusion cascade")
    return LoadedModel(module, metadata, dev, path)
