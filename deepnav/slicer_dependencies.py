"""What a module needs inside Slicer, installed on first use with the user's confirmation and
never at import time, before any of its Lib code is imported: PyTorch through the PyTorch
extension (it picks the wheel for the GPU and driver it finds), the other packages the Lib imports
through pip. Only the Slicer modules import this file; it imports only what Slicer bundles.

Slicer 5.10 / 5.12 bundle numpy, scipy, SimpleITK, VTK and packaging (Slicer's
SuperBuild/External_python-numpy.cmake, External_python-scipy.cmake, External_SimpleITK.cmake,
External_python-pythonqt-requirements.cmake); nothing else the Libs import.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import slicer
from packaging.requirements import Requirement

# The packages each module's Lib imports (with the deepnav code it imports) that Slicer does not
# bundle, as pip requirements with pyproject.toml's pins; torch is not here (TORCH_REQUIREMENT).
# Testing/test_slicer_dependencies.py keeps this equal to the Libs' imports and to the pins.
REQUIREMENTS: dict[str, list[str]] = {
    "MRUSFusion": ["pyigtl==0.3.4", "fastcrc==0.5.0"],
    "FetalBiometry": ["scikit-image>=0.26,<0.27"],
    "LiverLesionSeg": ["monai==1.6.1"],
}
# import name where it differs from the distribution's
IMPORT_NAMES = {"scikit-image": "skimage"}
# The shipped models are TorchScript / torch.export archives written by torch 2.13; an older torch
# is not guaranteed to read them.
TORCH_REQUIREMENT = ">=2.13"

_ready: set[str] = set()  # modules whose dependencies were found this session


def missing(requirements: list[str]) -> list[str]:
    """The requirements that no installed distribution satisfies."""
    out = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(text)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            out.append(text)
    return out


def ensure_torch(who: str) -> None:
    """torch installed (through the PyTorch extension, after asking) and new enough."""
    if importlib.util.find_spec("torch") is not None:
        if missing([f"torch{TORCH_REQUIREMENT}"]):
            raise RuntimeError(f"{who} needs PyTorch {TORCH_REQUIREMENT} (installed: {importlib.metadata.version('torch')}): "
                               "update it in the PyTorch Utils module, then restart Slicer.")
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(f"{who} needs the PyTorch extension: install it from the Extensions Manager.") from None
    if not slicer.util.confirmOkCancelDisplay(f"{who} needs PyTorch. Install it now (a large download)?"):
        raise RuntimeError("PyTorch is required")
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        raise RuntimeError("PyTorch was not installed")


def ensure_dependencies(module: str, who: str) -> None:
    """Everything `module`'s Lib needs, before any of it is imported: torch, then the packages of
    REQUIREMENTS[module] that are missing, pip-installed after one confirmation."""
    if module in _ready:
        return
    ensure_torch(who)
    todo = missing(REQUIREMENTS[module])
    if todo:
        if not slicer.util.confirmOkCancelDisplay(f"{who} needs {', '.join(todo)}. Install now?"):
            raise RuntimeError(f"{', '.join(todo)} required")
        slicer.util.pip_install(todo)
        importlib.invalidate_caches()
    _ready.add(module)
