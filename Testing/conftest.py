"""Shared fixtures. Tests make their own small data; none needs ../shared/data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "MRUSFusion", ROOT / "FetalBiometry", ROOT / "LiverLesionSeg"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from deepnav.imaging import Volume, rotation_matrix  # noqa: E402


@pytest.fixture(scope="session")
def patient():
    """One small synthetic patient (2 frames), shared by the tests that only read it."""
    from MRUSFusionLib.phantom import make_patient

    return make_patient(3, frames=2)  # odd seed: oblique MR


@pytest.fixture(scope="session")
def shipped_model():
    from MRUSFusionLib.model_io import load_model

    return load_model(None, "cpu")


def oblique_volume(array: np.ndarray, spacing=(0.8, 1.1, 1.7), angles_deg=(7.0, -5.0, 20.0),
                   origin=(-31.5, 12.25, 40.0)) -> Volume:
    return Volume(array, np.array(spacing), np.array(origin), rotation_matrix(np.deg2rad(angles_deg)))


def smooth_image(shape, seed=0) -> np.ndarray:
    """A smooth random image (sum of a few Gaussian blobs), float32."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    out = np.zeros(shape, np.float32)
    for _ in range(6):
        c = rng.uniform(0.2, 0.8, 3)
        out += rng.uniform(0.5, 1.0) * np.exp(-((k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2) / 0.03)
    return out
