"""Saving and loading the trained cascade: TorchScript (.pt) and torch.export (.pt2), each with
its `deepnav.json` record (format, version, grid, training summary; see deepnav.model_files)."""

from __future__ import annotations

import copy
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


def _for_file(model: Cascade) -> Cascade:
    """A copy with contiguous fp32 weights: a trained cascade's are channels-last 3D, which
    torch.export's archive stores as partial tensors (with a warning at each load)."""
    return copy.deepcopy(model).to(memory_format=torch.contiguous_format).set_precision("fp32")


def save_torchscript(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    return model_files.save_torchscript(_for_file(model), path, _record(metadata))


def save_exported(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    model = _for_file(model).eval().cpu()
    # two distinct tensors: passing one tensor twice makes torch.export alias the inputs, and the
    # exported graph then reads the fixed image where the moving one should be
    fixed, moving = torch.zeros(1, 1, GRID, GRID, GRID), torch.zeros(1, 1, GRID, GRID, GRID)
    program = torch.export.export(model, (fixed, moving))
    # the program keeps its example inputs (16 MB of zeros) and save() would store them
    program._example_inputs = None
    return model_files.save_exported(program, path, _record(metadata))


class LoadedModel:
    """A loaded cascade on a device: `model(fixed, moving)` -> (warped, disp, matrix, bspline).
    With precision 'bf16' the networks run in bf16 autocast and the geometry in fp32: the file's
    weights in an eager Cascade (a scripted or exported cascade cannot switch autocast)."""

    def __init__(self, module, metadata: dict, device: torch.device, path: Path, precision: str = "fp32"):
        self.module = module
        self.metadata = metadata
        self.device = device
        self.path = path
        self.precision = precision
        if precision != "fp32":
            self.module = self.eager().to(device).eval().set_precision(precision)
        # channels-last 3D weights: the networks' convolutions take ~0.7x the time on this CPU
        # (oneDNN), the whole forward with the warps ~0.88x, faster in 10 and 9 of 10 paired runs
        # (benchmarks/mixed_precision.py, results/channels_last_cpu.json); the same outputs to float rounding
        self.module = self.module.to(memory_format=torch.channels_last_3d)

    @torch.no_grad()
    def __call__(self, fixed: torch.Tensor, moving: torch.Tensor):
        return self.module(fixed.to(self.device), moving.to(self.device))

    def eager(self) -> Cascade:
        """An eager Cascade with these weights (to fine-tune per patient)."""
        model = Cascade()
        learned = model.state_dict().keys()  # a scripted module also lists the derived buffers
        model.load_state_dict({k: v for k, v in self.module.state_dict().items() if k in learned})
        return model


def load_model(path: str | Path | None = None, device: str = "auto", precision: str = "fp32") -> LoadedModel:
    """Load a .pt (TorchScript) or .pt2 (torch.export) cascade; the shipped model by default;
    `precision`: the networks' arithmetic, 'fp32' or 'bf16' (deepnav.torch_runtime.autocast)."""
    path = Path(path) if path is not None else SHIPPED_MODEL
    dev = pick_device(device)
    module, metadata = model_files.load_archive(path, dev, MODEL_FORMAT, MODEL_VERSION, "MR-US fusion cascade")
    return LoadedModel(module, metadata, dev, path, precision)
