"""Model files of every module: TorchScript (.pt) or torch.export (.pt2) archives that carry a
`deepnav.json` record (format name, version, whatever the module needs to run the model), so a
loader refuses a file of another kind or version with a message, not a shape error deep inside
torch. `torch.jit` emits a DeprecationWarning in torch 2.13; the design asks for TorchScript,
so it is silenced here only.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import torch

from deepnav.errors import InputError

METADATA_NAME = "deepnav.json"


def save_torchscript(module: torch.nn.Module, path: Path, record: dict) -> Path:
    """Script `module` (eval, CPU) and write it atomically with `record`."""
    module = module.eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        tmp = path.with_name(".partial-" + path.name)
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_NAME: json.dumps(record, indent=2)})
    tmp.replace(path)
    return path


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file, so an interrupted write never leaves a half checkpoint."""
    tmp = path.with_name(".partial-" + path.name)
    torch.save(obj, tmp)
    tmp.replace(path)


def save_exported(program, path: Path, record: dict) -> Path:
    """Write a torch.export program atomically with `record`."""
    tmp = path.with_name(".partial-" + path.name)
    torch.export.save(program, str(tmp), extra_files={METADATA_NAME: json.dumps(record, indent=2)})
    tmp.replace(path)
    return path


def _check_record(text: str, path: Path, model_format: str, version: int, what: str) -> dict:
    if not text:
        raise InputError(f"{path} has no DeepNav model record: it is not a DeepNav {what} model")
    record = json.loads(text)
    if record.get("format") != model_format:
        raise InputError(f"{path} is a '{record.get('format')}' model, not a {what} model")
    if record.get("version") != version:
        raise InputError(f"{path} is model version {record.get('version')}; this DeepNav runs version {version}")
    return record


def load_archive(path: Path, device: torch.device, model_format: str, version: int, what: str):
    """(module on `device` in eval mode, record) from a .pt or .pt2 file; InputError otherwise."""
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path} is not a torch model archive (.pt or .pt2)")
    extra = {METADATA_NAME: ""}
    try:
        if path.suffix == ".pt2":
            program = torch.export.load(str(path), extra_files=extra)
            record = _check_record(extra[METADATA_NAME], path, model_format, version, what)
            return program.module().to(device), record
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
        record = _check_record(extra[METADATA_NAME], path, model_format, version, what)
        return module.eval(), record
    except InputError:
        raise
    except Exception as exc:  # torch raises many types for foreign archives
        raise InputError(f"cannot load {path} as a DeepNav model: {str(exc).splitlines()[0]}") from exc
