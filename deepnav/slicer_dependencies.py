"""What a module needs inside Slicer, installed on first use with the user's confirmation and
never at import time: PyTorch through the PyTorch extension (it picks the wheel for the GPU and
driver it finds), other wheels through pip. Only the Slicer modules import this file."""

from __future__ import annotations

import importlib.util

import slicer


def ensure_torch(who: str) -> None:
    if importlib.util.find_spec("torch") is not None:
        return
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(f"{who} needs the PyTorch extension: install it from the Extensions Manager.") from None
    if not slicer.util.confirmOkCancelDisplay(f"{who} needs PyTorch. Install it now (a large download)?"):
        raise RuntimeError("PyTorch is required")
    PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)


def ensure_package(module: str, requirement: str, who: str) -> None:
    """`module` importable, or pip-install `requirement` after asking."""
    if importlib.util.find_spec(module) is not None:
        return
    if not slicer.util.confirmOkCancelDisplay(f"{who} needs {requirement}. Install it now?"):
        raise RuntimeError(f"{requirement} is required")
    slicer.util.pip_install(requirement)
