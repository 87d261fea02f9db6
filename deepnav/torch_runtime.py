"""Torch device choice, thread count and seeding, shared by every module."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time

import numpy as np
import torch

from deepnav.errors import InputError

DEVICE_CHOICES = "auto, cpu, cuda (or gpu, TotalSegmentator's spelling), cuda:N"
PRECISIONS = ("fp32", "bf16")  # every command's --precision (deepnav.command_line.add_device_option)


def pick_device(requested: str = "auto") -> torch.device:
    """The one reading of every --device option and Slicer device selector: 'auto' takes the GPU
    when one is present; 'gpu' means 'cuda'; a device torch cannot use is a clear InputError."""
    name = requested.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise InputError(f"unknown device {requested!r}: choose {DEVICE_CHOICES}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {requested!r} asked for a GPU, but torch sees none here: use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise InputError(f"device {requested!r}: torch sees {torch.cuda.device_count()} GPU(s), numbered from 0")
    return torch.device(name)


def autocast(precision: str, device: torch.device | str):
    """The context a network's forward runs in, for every module's --precision: 'bf16' is torch's
    automatic mixed precision in bfloat16 (convolutions and matrix products in bf16, reductions and
    normalisations kept in fp32 by torch's own lists), on the GPU or the CPU; 'fp32' is nothing.
    Only the networks run in it: what they feed (warps, fields, losses, probabilities, contours)
    takes their outputs back to fp32 (`forward_in`), so geometry is never computed in bf16."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise InputError(f"unknown precision {precision!r}: choose {', '.join(PRECISIONS)}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def forward_in(precision: str, module, *inputs: torch.Tensor) -> torch.Tensor:
    """module(*inputs) with its forward in `precision`, the output in fp32."""
    with autocast(precision, inputs[0].device):
        out = module(*inputs)
    return out.float()


def configure_threads() -> int:
    """Use every core for intra-op parallelism (torch's default can leave some idle in
    containers); DEEPNAV_THREADS overrides."""
    n = int(os.environ.get("DEEPNAV_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """Adam with the fused kernel: torch's default (foreach) implementation takes ~200 ms a step
    for the MRUSFusion rigid network's 0.7 M parameters on two CPU cores, the fused one ~1 ms."""
    return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy Generator for explicit use."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def machine_description() -> dict:
    """What a benchmark ran on, stored beside its numbers."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
