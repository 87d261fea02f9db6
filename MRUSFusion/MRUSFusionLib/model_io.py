"""Saving and loading the trained cascade: TorchScript (.pt) and torch.export (.pt2).

Both files carry a `deepnav.json` record (format name, version, grid, training summary), so a
loader can refuse a file that is not a DeepNav MR-US cascade, or is of a version it cannot run,
with a message rather than a shape error deep inside torch. `torch.jit` emits a
DeprecationWarning in torch 2.13; the design asks for TorchScript, so it is silenced here only.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch

from deepnav.errors import InputError
from deepnav.torch_runtime import pick_device
from MRUSFusionLib.networks import GRID, Cascade

MODEL_FORMAT = "deepnav.mrusfusion.cascade"
MODEL_VERSION = 1
METADATA_NAME = "deepnav.json"
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "mrusfusion_default.pt"


def _record(metadata: dict | None) -> str:
    return json.dumps({"format": MODEL_FORMAT, "version": MODEL_VERSION, "grid": GRID,
                       "spacing_mm": 1.0, **(metadata or {})}, indent=2)


def save_torchscript(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
        tmp = path.with_name(".partial-" + path.name)
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: _record(metadata)})
    tmp.replace(path)
    return path


def save_exported(model: Cascade, path: Path, metadata: dict | None = None) -> Path:
    model = model.eval().cpu()
    # two distinct tensors: passing one tensor twice makes torch.export alias the inputs, and the
    # exported graph then reads the fixed image where the moving one should be
    fixed, moving = torch.zeros(1, 1, GRID, GRID, GRID), torch.zeros(1, 1, GRID, GRID, GRID)
    program = torch.export.export(model, (fixed, moving))
    # the program keeps its example inputs (16 MB of zeros) and save() would store them
    program._example_inputs = None
    tmp = path.with_name(".partial-" + path.name)
    torch.export.save(program, str(tmp), extra_files={METADATA_NAME: _record(metadata)})
    tmp.replace(path)
    return path


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


def _check_metadata(text: str | None, path: Path) -> dict:
    if not text:
        raise InputError(f"{path} has no DeepNav model record: it is not a DeepNav MR-US fusion model")
    metadata = json.loads(text)
    if metadata.get("format") != MODEL_FORMAT:
        raise InputError(f"{path} is a '{metadata.get('format')}' model, not an MR-US fusion cascade")
    if metadata.get("version") != MODEL_VERSION:
        raise InputError(f"{path} is model version {metadata.get('version')}; this DeepNav runs version {MODEL_VERSION}")
    return metadata


def load_model(path: str | Path | None = None, device: str = "auto") -> LoadedModel:
    """Load a .pt (TorchScript) or .pt2 (torch.export) cascade; the shipped model by default."""
    path = Path(path) if path is not None else SHIPPED_MODEL
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a torch model archive (.pt or .pt2)")
    dev = pick_device(device)
    extra = {METADATA_NAME: ""}
    try:
        if path.suffix == ".pt2":
            program = torch.export.load(str(path), extra_files=extra)
            metadata = _check_metadata(extra[METADATA_NAME], path)
            module = program.module().to(dev)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location=dev, _extra_files=extra)
            metadata = _check_metadata(extra[METADATA_NAME], path)
            module.eval()
    except InputError:
        raise
    except Exception as exc:  # torch raises many types for foreign archives
        raise InputError(f"cannot load {path} as a DeepNav model: {str(exc).splitlines()[0]}") from exc
    return LoadedModel(module, metadata, dev, path)
